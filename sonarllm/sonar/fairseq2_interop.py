"""fairseq2 -> ours: a loaded sonar-space / fairseq2 SONAR text decoder or encoder as our model,
sharing its weights, with every size, length and the pad index read off the fairseq2 modules.

What is read where (fairseq2 0.8.1 / sonar-space 0.5.0 module layout):

* sizes: the state dict (embedding ``[V, D]``, layers, FFN width);
* heads: ``{decoder,encoder}.layers[i].self_attn.num_heads``;
* pad index and lengths: ``{decoder,encoder}_frontend.pos_encoder``, a ``SinusoidalPositionEncoder``
  whose table covers ``max_seq_len`` tokens from step ``sin_offset`` = pad index + 1 (an encoder's
  ``max_seq_len`` already includes the ``pad_idx + 1`` that ``_from_fairseq`` adds); the decoder's
  ``max_target_seq_len`` caps its length too;
* LayerNorm epsilon, embedding scale (``no_scale_embedding``), FFN activation, and what SONAR
  does not use (decoder ``normalize_emb`` / ``post_sentemb_proj``, encoder pooling other than mean).

Anything these models do not implement raises CheckpointError naming it, never a silently
different model.
"""

from __future__ import annotations

import math

import torch

from sonarllm.sonar.checkpoint import (
    CheckpointError,
    load_state,
    to_fairseq2_state_dict,
    weight_sizes,
)
from sonarllm.sonar.config import SonarTextConfig
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder


def _unsupported(kind: str, what: str) -> CheckpointError:
    return CheckpointError(f"this fairseq2 SONAR {kind} has {what}, which sonarllm's {kind} does not implement")


def fairseq2_model_config(model, kind: str) -> SonarTextConfig:
    """Our config of a fairseq2 ``ConditionalTransformerDecoderModel`` (kind "decoder") or
    ``SonarTextTransformerEncoderModel`` (kind "encoder"), read off the model (see module doc)."""
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    frontend, stack = getattr(model, f"{kind}_frontend"), getattr(model, kind)
    sizes = weight_sizes(to_fairseq2_state_dict(model.state_dict(), kind), kind)
    pos = frontend.pos_encoder
    if pos is None or getattr(pos, "sin_offset", 0) < 1:
        raise _unsupported(kind, f"positions {type(pos).__name__} (SONAR: sinusoidal, from step pad_idx + 1)")
    if not math.isclose(frontend.scale, math.sqrt(sizes["model_dim"])):
        raise _unsupported(kind, f"embedding scale {frontend.scale} (SONAR: sqrt(model_dim))")
    if getattr(frontend, "layer_norm", None) is not None:
        raise _unsupported(kind, "an embedding LayerNorm")
    layers = list(stack.layers)
    heads = {layer.self_attn.num_heads for layer in layers}
    heads |= {layer.encoder_decoder_attn.num_heads for layer in layers if kind == "decoder"}
    if len(heads) != 1:
        raise _unsupported(kind, f"layers with different head counts {sorted(heads)}")
    activations = {type(layer.ffn.inner_activation).__name__ for layer in layers}
    if activations != {"ReLU"}:
        raise _unsupported(kind, f"FFN activation {sorted(activations)} (SONAR: ReLU)")
    pad_idx = pos.sin_offset - 1
    if kind == "decoder":
        if getattr(model, "normalize_emb", False) or getattr(model, "post_sentemb_proj", None) is not None:
            raise _unsupported(kind, "a normalised or projected sentence embedding (normalize_emb / post_sentemb_proj)")
        max_seq_len, final_norm = min(pos.max_seq_len, getattr(model, "max_target_seq_len", pos.max_seq_len)), stack.layer_norm
    else:
        pooling = getattr(model.pooling, "name", model.pooling)
        if str(pooling).upper() != "MEAN" or getattr(model, "pooler", None) is not None:
            raise _unsupported(kind, f"pooling {pooling} (SONAR: MEAN)")
        if model.layer_norm is None:
            raise _unsupported(kind, "no final LayerNorm")
        max_seq_len, final_norm = pos.max_seq_len - pos.sin_offset, model.layer_norm
    dropout = getattr(frontend, "dropout", None)
    return SonarTextConfig(**sizes, num_heads=heads.pop(), max_seq_len=max_seq_len, legacy_pad_idx=pad_idx,
                           dropout_p=dropout.p if dropout is not None else 0.0, layer_norm_eps=final_norm.eps)  # fmt: skip


def _wrap(cls, model, kind: str, **kwargs):
    cfg = fairseq2_model_config(model, kind)
    with torch.device("meta"):
        ours = cls(cfg, **kwargs)
    load_state(ours, to_fairseq2_state_dict(model.state_dict(), kind), assign=True)
    ours.reset_buffers(next(model.parameters()).device)
    return ours.requires_grad_(False)


def decoder_from_fairseq2(model, **kwargs) -> SonarDecoder:
    """Our ``SonarDecoder`` for a loaded fairseq2/sonar ``ConditionalTransformerDecoderModel``,
    sharing its weights (no copy); keyword arguments go to ``SonarDecoder``."""
    return _wrap(SonarDecoder, model, "decoder", **kwargs)


def encoder_from_fairseq2(model, **kwargs) -> SonarEncoder:
    """Our ``SonarEncoder`` for a loaded fairseq2/sonar ``SonarTextTransformerEncoderModel``,
    sharing its weights (no copy); keyword arguments go to ``SonarEncoder``."""
    return _wrap(SonarEncoder, model, "encoder", **kwargs)


def load_via_fairseq2(name: str, kind: str = "decoder", **kwargs):
    """Load a SONAR model by fairseq2 asset name through sonar-space/fairseq2 (when installed),
    then wrap it: the fairseq2 card system resolves and caches the download."""
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    try:
        from fairseq2.models import load_model
    except ImportError as exc:
        raise ImportError("loading by fairseq2 asset name needs sonar-space and fairseq2 (extra 'sonar')") from exc
    fs2 = load_model(name, device=torch.device("cpu"))
    return (decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2)(fs2, **kwargs)
