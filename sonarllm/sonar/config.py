"""Sizes of the SONAR text encoder and decoder.

SONAR's text models are pre-LayerNorm transformers (fairseq2 ``transformer_decoder`` /
``transformer_encoder`` families) with sinusoidal positions in fairseq's legacy layout (the first
position is step ``pad_idx + 1`` = 2), embeddings scaled by sqrt(model_dim), ReLU FFNs, biases
everywhere, one final LayerNorm, and — for the decoder — a tied output projection without bias.
``basic`` is the size of the released ``text_sonar_basic_encoder`` / ``text_sonar_basic_decoder``;
``toy`` is a tiny model of the same shape for tests and the embedded example.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class SonarTextConfig:
    """One SONAR text encoder or decoder."""

    model_dim: int = 1024
    """Width of the token states and of the sentence embedding."""
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 8192
    vocab_size: int = 256_206
    """NLLB SentencePiece pieces + <pad> + 202 language tags + 3 data tags."""
    max_seq_len: int = 512
    """Longest token sequence the position table covers (encoder: source tokens incl. the
    language tag and </s>; decoder: target tokens incl. the </s> and language-tag prefix)."""
    legacy_pad_idx: int = 1
    """fairseq's padding index of the checkpoint's embedding table: positions start at step
    legacy_pad_idx + 1, and that embedding row is zero in fairseq-trained checkpoints."""
    dropout_p: float = 0.1
    """Dropout of the released checkpoints (embeddings, attention weights, residual branches,
    FFN activations). Only applied when a model is built with ``train_dropout=True``."""
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("dropout_p", "layer_norm_eps"):
                if not (0.0 <= value < 1.0):
                    raise ValueError(f"SonarTextConfig.{f.name} must be in [0, 1), got {value}")
            elif f.name != "legacy_pad_idx" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"SonarTextConfig.{f.name} must be a positive int, got {value!r}")
        if self.model_dim % self.num_heads:
            raise ValueError(
                f"SonarTextConfig.model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.model_dim % 2:
            raise ValueError(f"SonarTextConfig.model_dim must be even (sinusoidal positions), got {self.model_dim}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SonarTextConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SonarTextConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def from_fairseq2_config(values: dict, kind: str) -> SonarTextConfig:
    """Our config from a fairseq2 ``SonarTextDecoderConfig`` / ``SonarTextEncoderConfig`` (as a
    dict). The decoder's attention uses ``num_encoder_attn_heads`` (a fairseq2 SONAR quirk)."""
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    vocab = values["vocab_info"]
    return SonarTextConfig(
        model_dim=values["model_dim"],
        num_layers=values["num_decoder_layers" if kind == "decoder" else "num_encoder_layers"],
        num_heads=values["num_encoder_attn_heads"],
        ffn_dim=values["ffn_inner_dim"],
        vocab_size=vocab["size"] if isinstance(vocab, dict) else vocab.size,
        max_seq_len=values["max_seq_len"],
        legacy_pad_idx=vocab["pad_idx"] if isinstance(vocab, dict) else vocab.pad_idx,
        dropout_p=values.get("attention_dropout_p", 0.1),
    )


SONAR_CONFIGS: dict[str, SonarTextConfig] = {
    "basic": SonarTextConfig(),
    "toy": SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=512, max_seq_len=128),
}


def sonar_config(name_or_config: str | SonarTextConfig) -> SonarTextConfig:
    """Look up a named configuration ("basic", "toy"), or pass a config through."""
    if isinstance(name_or_config, SonarTextConfig):
        return name_or_config
    try:
        return SONAR_CONFIGS[name_or_config]
    except KeyError:
        raise ValueError(f"unknown SONAR config {name_or_config!r}; known: {sorted(SONAR_CONFIGS)}") from None
