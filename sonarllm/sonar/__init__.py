"""Our own SONAR text encoder, decoder and tokenizer, weight-compatible with the released
checkpoints (``text_sonar_basic_encoder`` / ``text_sonar_basic_decoder``) and with fairseq2.
"""

from sonarllm.sonar.checkpoint import (
    CheckpointError,
    decoder_from_fairseq2,
    load_sonar_decoder,
    load_sonar_encoder,
)
from sonarllm.sonar.config import SONAR_CONFIGS, SonarTextConfig, sonar_config
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder
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
    "load_sonar_decoder",
    "load_sonar_encoder",
    "sonar_config",
]
