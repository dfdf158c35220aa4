"""A stand-in for the parts of sonar-space 0.5.0 / fairseq2 0.8.1 (and of sonar-space 0.4 /
fairseq2 0.3-0.4, ``generation="0.4"``) that the fairseq2 -> sonarllm path touches, so that CI
(where fairseq2 cannot be installed) tests that path on real layouts.

Faithful where it matters, written from their sources (tests/fixtures/README.md §3-4, §9):

* config dataclasses with sonar 0.5.0's field names (checked against real_configs.json), and
  ``SonarTextEncoderFactory`` adding ``pad_idx + 1`` to ``max_seq_len`` in place when
  ``_from_fairseq`` is set;
* ``VocabularyInfo``: a frozen dataclass (size, unk/bos/eos/pad, boh/eoh), pad dropped when = eos;
* module names, parameter names and the attributes read by the converter: ``embed.pad_idx``,
  ``pos_encoder.max_seq_len`` / ``sin_offset`` (= pad index + 1) with a ``max_seq_len + 1`` row
  table whose row 0 is padding, ``frontend.scale``, ``self_attn.num_heads``,
  ``ffn.inner_activation``, the decoder's ``max_target_seq_len`` / ``normalize_emb`` /
  ``post_sentemb_proj`` and tied ``final_proj``, the encoder's ``pooling`` / ``layer_norm``;
  each layer's residual ``self_attn_dropout`` (``Dropout(attention_dropout_p)``, None at 0), as
  sonar's factories build it in both generations;
* the two generations of ``SinusoidalPositionEncoder`` (read from fairseq2's tags v0.3.0, v0.4.6,
  v0.5.0): fairseq2 0.3/0.4 (``src/fairseq2/nn/_position_encoder.py``) keeps the offset in
  ``_sin_offset`` and a ``max_seq_len``-row table starting at that step; fairseq2 >= 0.5 names it
  ``sin_offset`` (public) and adds a padding row 0. Both encode the same positions. The 0.3/0.4
  decoder model (an ``EncoderDecoderModel``) also carries ``target_vocab_info``.

Only the embedding frontend runs (``frontend(tokens)``, unpadded batches); the layers hold weights.
The live tests (tests/sonarllm/test_sonar_fairseq2.py) check these facts against the real thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


@dataclass(frozen=True)
class VocabularyInfo:
    size: int
    unk_idx: int | None
    bos_idx: int | None
    eos_idx: int | None
    pad_idx: int | None
    boh_idx: int | None = None
    eoh_idx: int | None = None

    def __post_init__(self) -> None:
        if self.pad_idx == self.eos_idx:
            object.__setattr__(self, "pad_idx", None)


@dataclass
class SonarTextDecoderConfig:
    model_dim: int
    max_seq_len: int
    vocab_info: VocabularyInfo
    activation_fn: str
    no_scale_embedding: bool
    no_token_positional_embeddings: bool
    learned_pos: bool
    emb_dropout_p: float
    attention_dropout_p: float
    activation_dropout_p: float
    normalize_before: bool
    num_encoder_layers: int
    num_decoder_layers: int
    num_encoder_attn_heads: int
    num_decoder_attn_heads: int
    ffn_inner_dim: int
    input_dim: int | None = None


@dataclass
class SonarTextEncoderConfig:
    model_dim: int
    max_seq_len: int
    vocab_info: VocabularyInfo
    num_encoder_layers: int
    num_decoder_layers: int
    num_encoder_attn_heads: int
    num_decoder_attn_heads: int
    ffn_inner_dim: int
    pooling: str
    embedding_dim: int | None = None
    decoder_ffn_inner_dim: int | None = None
    activation_fn: str = "ReLU"
    no_scale_embedding: bool = False
    no_token_positional_embeddings: bool = False
    learned_pos: bool = False
    emb_dropout_p: float = 0.1
    attention_dropout_p: float = 0.1
    activation_dropout_p: float = 0.1
    normalize_before: bool = False
    _from_fairseq: bool = False


def config_from_dict(values: dict, cls):
    """A config dataclass from a fixture dict (``vocab_info`` as a dict)."""
    return cls(**{**values, "vocab_info": VocabularyInfo(**values["vocab_info"])})


class StandardEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embed_dim: int, pad_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embed_dim, self.pad_idx = num_embeddings, embed_dim, pad_idx
        self.weight = nn.Parameter(torch.randn(num_embeddings, embed_dim) * embed_dim**-0.5)

    def forward(self, x):
        return nn.functional.embedding(x, self.weight, self.pad_idx)


GENERATIONS = ("0.4", "0.5")  # fairseq2 0.3/0.4 (sonar-space <= 0.4) and fairseq2 >= 0.5 (sonar-space 0.5)


class SinusoidalPositionEncoder(nn.Module):
    def __init__(self, encoding_dim: int, max_seq_len: int, *, _legacy_pad_idx: int | None = None, generation: str = "0.5"):
        super().__init__()
        self.encoding_dim, self.max_seq_len = encoding_dim, max_seq_len
        offset = 0 if _legacy_pad_idx is None else 1 + _legacy_pad_idx
        if generation == "0.4":
            self._sin_offset = offset  # fairseq2 0.3/0.4: private
        else:
            self.sin_offset = offset
        self._first_row = 0 if generation == "0.4" else 1  # >= 0.5: row 0 is padding
        freqs = torch.zeros(max_seq_len + self._first_row, encoding_dim)
        steps = torch.arange(offset, offset + max_seq_len, dtype=torch.float32)
        num_sin = encoding_dim // 2
        angles = torch.outer(steps, torch.exp(torch.arange(num_sin, dtype=torch.float32) * -math.log(10000.0) / (num_sin - 1)))
        freqs[self._first_row :, :num_sin], freqs[self._first_row :, num_sin:] = angles.sin(), angles.cos()
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, seqs):
        return seqs.float() + self.freqs[self._first_row : self._first_row + seqs.shape[-2]]


class TransformerEmbeddingFrontend(nn.Module):
    def __init__(self, model_dim: int, embed, pos_encoder, *, no_scale: bool = False, dropout_p: float = 0.0):
        super().__init__()
        self.embed = embed
        self.scale = 1.0 if no_scale else math.sqrt(model_dim)
        self.register_module("pos_encoder", pos_encoder)
        self.register_module("dropout", nn.Dropout(dropout_p) if dropout_p > 0.0 else None)

    def forward(self, tokens):
        seqs = self.embed(tokens) * self.scale
        return seqs if self.pos_encoder is None else self.pos_encoder(seqs)


class StandardMultiheadAttention(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.model_dim, self.num_heads = model_dim, num_heads
        self.q_proj = nn.Linear(model_dim, model_dim)
        self.k_proj, self.v_proj = nn.Linear(kv_dim or model_dim, model_dim), nn.Linear(kv_dim or model_dim, model_dim)
        self.output_proj = nn.Linear(model_dim, model_dim)


class StandardFeedForwardNetwork(nn.Module):
    def __init__(self, model_dim: int, inner_dim: int, activation: str = "ReLU"):
        super().__init__()
        self.inner_proj = nn.Linear(model_dim, inner_dim)
        self.inner_activation = getattr(nn, activation)()
        self.output_proj = nn.Linear(inner_dim, model_dim)


def _dropout(p: float):
    return nn.Dropout(p) if p > 0.0 else None


class StandardTransformerDecoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn_dim, activation, input_dim=None, dropout_p=0.0):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = StandardMultiheadAttention(dim, heads), nn.LayerNorm(dim)
        self.register_module("self_attn_dropout", _dropout(dropout_p))
        self.encoder_decoder_attn = StandardMultiheadAttention(dim, heads, kv_dim=input_dim)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(dim)
        self.ffn, self.ffn_layer_norm = StandardFeedForwardNetwork(dim, ffn_dim, activation), nn.LayerNorm(dim)


class StandardTransformerEncoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn_dim, activation, dropout_p=0.0):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = StandardMultiheadAttention(dim, heads), nn.LayerNorm(dim)
        self.register_module("self_attn_dropout", _dropout(dropout_p))
        self.ffn, self.ffn_layer_norm = StandardFeedForwardNetwork(dim, ffn_dim, activation), nn.LayerNorm(dim)


class StandardTransformerDecoder(nn.Module):
    def __init__(self, layers, layer_norm):
        super().__init__()
        self.layers, self.layer_norm = nn.ModuleList(layers), layer_norm


class StandardTransformerEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class TiedProjection(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # the embedding's Parameter: state_dict() holds it under both names


class ConditionalTransformerDecoderModel(nn.Module):
    def __init__(self, decoder_frontend, decoder, final_proj, max_target_seq_len, normalize_emb=False, post_sentemb_proj=None):
        super().__init__()
        self.max_source_seq_len, self.max_target_seq_len = 0, max_target_seq_len
        self.decoder_frontend, self.decoder, self.final_proj = decoder_frontend, decoder, final_proj
        self.normalize_emb = normalize_emb
        self.register_module("post_sentemb_proj", post_sentemb_proj)


class Pooling(Enum):
    MAX = 1
    MEAN = 2
    LAST = 3
    ATTENTION = 4


class SonarTextTransformerEncoderModel(nn.Module):
    def __init__(self, encoder_frontend, encoder, max_source_seq_len, layer_norm=None, pooling=Pooling.LAST, pooler=None):
        super().__init__()
        self.encoder_frontend, self.encoder, self.layer_norm = encoder_frontend, encoder, layer_norm
        self.pooling, self.pooler = pooling, pooler


def _frontend(cfg, max_seq_len: int, generation: str) -> TransformerEmbeddingFrontend:
    pad = cfg.vocab_info.pad_idx
    embed = StandardEmbedding(cfg.vocab_info.size, cfg.model_dim, pad)
    pos = SinusoidalPositionEncoder(cfg.model_dim, max_seq_len, _legacy_pad_idx=pad, generation=generation)
    return TransformerEmbeddingFrontend(cfg.model_dim, embed, pos, no_scale=cfg.no_scale_embedding, dropout_p=cfg.emb_dropout_p)


class SonarTextDecoderFactory:
    def __init__(self, config: SonarTextDecoderConfig, generation: str = "0.5"):
        self.config, self.generation = config, generation

    def create_model(self) -> ConditionalTransformerDecoderModel:
        c = self.config
        layers = [StandardTransformerDecoderLayer(c.model_dim, c.num_encoder_attn_heads, c.ffn_inner_dim, c.activation_fn,
                                                  c.input_dim, c.attention_dropout_p) for _ in range(c.num_decoder_layers)]  # fmt: skip
        frontend = _frontend(c, c.max_seq_len, self.generation)
        model = ConditionalTransformerDecoderModel(frontend, StandardTransformerDecoder(layers, nn.LayerNorm(c.model_dim)),
                                                   TiedProjection(frontend.embed.weight), c.max_seq_len)  # fmt: skip
        if self.generation == "0.4":  # an EncoderDecoderModel: no normalize_emb / post_sentemb_proj yet
            model.target_vocab_info = c.vocab_info
            del model.normalize_emb
            del model.post_sentemb_proj
        return model


class SonarTextEncoderFactory:
    def __init__(self, config: SonarTextEncoderConfig, generation: str = "0.5"):
        self.config, self.generation = config, generation
        if config._from_fairseq:
            config.max_seq_len += config.vocab_info.pad_idx + 1  # in place, as sonar does

    def create_model(self) -> SonarTextTransformerEncoderModel:
        c = self.config
        layers = [StandardTransformerEncoderLayer(c.model_dim, c.num_encoder_attn_heads, c.ffn_inner_dim, c.activation_fn,
                                                  c.attention_dropout_p) for _ in range(c.num_encoder_layers)]  # fmt: skip
        return SonarTextTransformerEncoderModel(_frontend(c, c.max_seq_len, self.generation), StandardTransformerEncoder(layers), c.max_seq_len,
                                                nn.LayerNorm(c.model_dim), getattr(Pooling, c.pooling.upper()))  # fmt: skip


def build(kind: str, config, state_dict=None, generation: str = "0.5"):
    """A mimic model of fairseq2 ``generation`` ("0.4": 0.3/0.4; "0.5": >= 0.5) from a config
    (dataclass or fixture dict), with ``state_dict`` loaded."""
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    cls, factory = {"decoder": (SonarTextDecoderConfig, SonarTextDecoderFactory),
                    "encoder": (SonarTextEncoderConfig, SonarTextEncoderFactory)}[kind]  # fmt: skip
    if isinstance(config, dict):
        config = config_from_dict(config, cls)
    model = factory(config, generation).create_model()
    if state_dict is not None:
        sd = dict(state_dict)
        if kind == "decoder":
            sd.setdefault("final_proj.weight", sd["decoder_frontend.embed.weight"])
        model.load_state_dict(sd, strict=True)
    return model.eval()
