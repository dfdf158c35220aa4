"""SONAR-LLM: a concept transformer over SONAR sentence embeddings, trained with token
cross-entropy through the frozen SONAR text decoder (arXiv 2508.05305)."""

from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.sonar import (
    SonarDecoder,
    SonarEncoder,
    SonarTextConfig,
    SonarTokenizer,
    decoder_from_fairseq2,
    load_sonar_decoder,
    load_sonar_encoder,
)
from sonarllm.sonar.pipeline import SonarPipeline

__all__ = [
    "SonarDecoder",
    "SonarEncoder",
    "SonarPipeline",
    "SonarTargets",
    "SonarTextConfig",
    "SonarTokenLoss",
    "SonarTokenizer",
    "decoder_from_fairseq2",
    "load_sonar_decoder",
    "load_sonar_encoder",
]
