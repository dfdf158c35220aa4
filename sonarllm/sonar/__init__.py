"""Our own SONAR text encoder, decoder and tokenizer, weight-compatible with the released
checkpoints (``text_sonar_basic_encoder`` / ``text_sonar_basic_decoder``) and with fairseq2.
"""

from sonarllm.sonar.checkpoint import CheckpointError, load_sonar_decoder, load_sonar_encoder
from sonarllm.sonar.config import SONAR_CONFIGS, SonarTextConfig, from_fairseq2_config, sonar_config
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder
from sonarllm.sonar.fairseq2_interop import (
    decoder_from_fairseq2,
    encoder_from_fairseq2,
    load_via_fairseq2,
)
from sonarllm.sonar.packing import PackedBatch
from sonarllm.sonar.tokenizer import SonarTokenizer

__all__ = [
    "CheckpointError",
    "PackedBatch",
    "SONAR_CONFIGS",
    "SonarDecoder",
    "SonarEncoder",
    "SonarTextConfig",
    "SonarTokenizer",
    "decoder_from_fairseq2",
    "encoder_from_fairseq2",
    "from_fairseq2_config",
    "load_sonar_decoder",
    "load_sonar_encoder",
    "load_via_fairseq2",
    "sonar_config",
]
