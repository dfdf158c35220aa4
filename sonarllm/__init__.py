"""SONAR-LLM: a concept transformer over SONAR sentence embeddings, trained with token
cross-entropy through the frozen SONAR text decoder (arXiv 2508.05305).

The generation and evaluation functions live in their modules (``from sonarllm.generate import
generate``, ``from sonarllm.evaluate import evaluate``); exporting them here would hide those
modules behind functions of the same name."""

from sonarllm.bundle import Bundle, load_bundle, save_bundle
from sonarllm.config import SONARLLM_CONFIGS, SonarLLMConfig
from sonarllm.evaluate import EvalOptions
from sonarllm.generate import GenerationOptions
from sonarllm.loss import SonarMSELoss, SonarTargets, SonarTokenLoss
from sonarllm.model import KVCache, SonarLLM
from sonarllm.mse_loss import NextSentenceMSELoss, next_sentence_mse
from sonarllm.normalizer import SonarNormalizer
from sonarllm.sonar import (
    SonarDecoder,
    SonarEncoder,
    SonarTextConfig,
    SonarTokenizer,
    decoder_from_fairseq2,
    encoder_from_fairseq2,
    load_sonar_decoder,
    load_sonar_encoder,
)
from sonarllm.sonar.pipeline import SonarPipeline

__all__ = [
    "Bundle",
    "EvalOptions",
    "GenerationOptions",
    "load_bundle",
    "save_bundle",
    "KVCache",
    "NextSentenceMSELoss",
    "SONARLLM_CONFIGS",
    "SonarLLM",
    "SonarLLMConfig",
    "SonarNormalizer",
    "next_sentence_mse",
    "SonarDecoder",
    "SonarEncoder",
    "SonarPipeline",
    "SonarTargets",
    "SonarTextConfig",
    "SonarTokenLoss",
    "SonarMSELoss",
    "SonarTokenizer",
    "decoder_from_fairseq2",
    "encoder_from_fairseq2",
    "load_sonar_decoder",
    "load_sonar_encoder",
]
