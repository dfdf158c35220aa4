"""Sizes of the SONAR text encoder and decoder.

SONAR's text models are pre-LayerNorm transformers (fairseq2 ``transformer_decoder`` /
``transformer_encoder`` families) with sinusoidal positions in fairseq's legacy layout (the first
position is step ``pad_idx + 1`` = 2), embeddings scaled by sqrt(model_dim), ReLU FFNs, biases
everywhere, one final LayerNorm, and — for the decoder — a tied output projection without bias.
``basic`` is the size of the released ``text_sonar_basic_encoder`` / ``text_sonar_basic_decoder``;
``toy`` is a tiny model of the same shape for tests and the embedded example.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        if not isinstance(self.legacy_pad_idx, int) or not 0 <= self.legacy_pad_idx < self.vocab_size:
            raise ValueError(f"SonarTextConfig.legacy_pad_idx must be a token id in [0, vocab_size), got {self.legacy_pad_idx!r}")
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


_MISSING = object()


def _fs2_value(config, name: str, kind: str, default=_MISSING):
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    if value is _MISSING:
        raise ValueError(f"the fairseq2 {kind} config has no field {name!r}; pass a SonarText{kind.title()}Config")
    return value


def _check_config_kind(config, kind: str, *, has_pooling: bool) -> None:
    """ValueError unless ``config`` is a fairseq2 config of ``kind``: by its class name when it is
    a ``SonarText{Decoder,Encoder}Config``, else by the encoder-only ``pooling`` field."""
    name = type(config).__name__
    if name in ("SonarTextDecoderConfig", "SonarTextEncoderConfig"):
        actual = "decoder" if name == "SonarTextDecoderConfig" else "encoder"
        why = f"a {name}"
    else:
        actual = "encoder" if has_pooling else "decoder"
        why = "it has a 'pooling' field, as encoder configs do" if has_pooling else \
            "it has no 'pooling' field, which every encoder config has"
    if actual != kind:
        raise ValueError(
            f"from_fairseq2_config(config, {kind!r}) got a fairseq2 {actual} config ({why}); "
            f"pass kind={actual!r}, or the {kind} config"
        )


def from_fairseq2_config(config, kind: str, *, after_factory: bool = False) -> SonarTextConfig:
    """Our config from a sonar/fairseq2 ``SonarTextDecoderConfig`` / ``SonarTextEncoderConfig``:
    the dataclass itself or a dict of its fields (``vocab_info`` a ``VocabularyInfo`` or a dict).

    Field names (fairseq2 -> ours): ``model_dim`` -> ``model_dim``; ``num_decoder_layers`` /
    ``num_encoder_layers`` -> ``num_layers``; ``num_encoder_attn_heads`` -> ``num_heads`` (the decoder's
    attention uses it too, a fairseq2 SONAR quirk); ``ffn_inner_dim`` -> ``ffn_dim``;
    ``vocab_info.size`` -> ``vocab_size``; ``vocab_info.pad_idx`` -> ``legacy_pad_idx``;
    ``attention_dropout_p`` -> ``dropout_p``; ``max_seq_len`` -> ``max_seq_len``. An encoder's
    position table covers ``max_seq_len + pad_idx + 1`` tokens when ``_from_fairseq`` is set, as ours.

    Args:
        after_factory: the encoder config went through fairseq2's ``SonarTextEncoderFactory``,
            which adds ``pad_idx + 1`` to ``max_seq_len`` *in place* when ``_from_fairseq`` is set
            (its model then has ``max_seq_len`` positions). The config does not record that;
            ``encoder_from_fairseq2(model)`` reads the lengths off the model instead.

    Raises ValueError naming a field whose value these models do not implement, and for a config
    of the other kind: an encoder config has a ``pooling`` field, a decoder config has none (the
    two share every other size field, and their ``max_seq_len`` counts differently).
    """
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    get = lambda name, default=_MISSING: _fs2_value(config, name, kind, default)  # noqa: E731
    _check_config_kind(config, kind, has_pooling=get("pooling", None) is not None)
    vocab = get("vocab_info")
    vocab_get = lambda name: _fs2_value(vocab, name, kind)  # noqa: E731
    model_dim, pad_idx = get("model_dim"), vocab_get("pad_idx")
    checks = [("activation_fn", ("ReLU",)), ("no_scale_embedding", (False,)), ("learned_pos", (False,)),
              ("no_token_positional_embeddings", (False,)), ("layernorm_embedding", (False,))]  # fmt: skip
    checks += [("input_dim", (None, model_dim))] if kind == "decoder" else [("pooling", ("mean",)), ("embedding_dim", (None, model_dim))]
    for name, allowed in checks:  # a field the config lacks has SONAR's value
        if (value := get(name, allowed[0])) not in allowed:
            raise ValueError(f"fairseq2 {kind} config {name}={value!r} is not implemented here (SONAR's is {allowed[0]!r})")
    if pad_idx is None:
        raise ValueError(f"fairseq2 {kind} config vocab_info.pad_idx is None; SONAR's positions need it (1 in SONAR)")
    max_seq_len = get("max_seq_len")
    if kind == "encoder" and (after_factory or not get("_from_fairseq", False)):
        max_seq_len -= pad_idx + 1  # the config counts every position; ours adds pad_idx + 1 to max_seq_len
    return SonarTextConfig(
        model_dim=model_dim,
        num_layers=get(f"num_{kind}_layers"),
        num_heads=get("num_encoder_attn_heads"),
        ffn_dim=get("ffn_inner_dim"),
        vocab_size=vocab_get("size"),
        max_seq_len=max_seq_len,
        legacy_pad_idx=pad_idx,
        dropout_p=get("attention_dropout_p", 0.1),
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
