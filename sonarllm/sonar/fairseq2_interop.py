"""fairseq2 -> ours: a loaded sonar-space / fairseq2 SONAR text decoder or encoder as our model,
sharing its weights, with every size, length and the pad index read off the fairseq2 modules.

What is read where (module layouts of fairseq2 0.3/0.4 with sonar-space 0.4, which the official
SONAR-LLM code and Meta's LCM run, and of fairseq2 >= 0.5 with sonar-space 0.5; the same except
where noted):

* sizes: the state dict (embedding ``[V, D]``, layers, FFN width);
* heads: ``{decoder,encoder}.layers[i].self_attn.num_heads``;
* pad index and lengths: ``{decoder,encoder}_frontend.pos_encoder``, a ``SinusoidalPositionEncoder``
  whose table covers ``max_seq_len`` tokens from step ``sin_offset`` = pad index + 1 (an encoder's
  ``max_seq_len`` already includes the ``pad_idx + 1`` that ``_from_fairseq`` adds); the decoder's
  ``max_target_seq_len`` caps its length too. fairseq2 0.3/0.4 name that offset ``_sin_offset``;
  fairseq2 >= 0.5 ``sin_offset``;
* dropout: the layers' residual ``self_attn_dropout`` (None when 0), which sonar's factories build
  from ``attention_dropout_p``, as ``from_fairseq2_config`` reads it. Our models have one dropout
  rate for embeddings, attention weights, residual branches and FFN activations; SONAR's released
  configs set all of fairseq2's rates to the same 0.1, and the attention rate is the one fairseq2
  applies in most places (attention weights and every residual branch). It matters only with
  ``train_dropout=True``;
* LayerNorm epsilon, embedding scale (``no_scale_embedding``), FFN activation, and what SONAR
  does not use (decoder ``normalize_emb`` / ``post_sentemb_proj``, encoder pooling other than mean).

A model that is not a SONAR text decoder (encoder) raises TypeError naming what was expected.

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


EXPECTED = {"decoder": "ConditionalTransformerDecoderModel", "encoder": "SonarTextTransformerEncoderModel"}


def _check_model(model, kind: str) -> None:
    """TypeError naming the expected fairseq2 class unless ``model`` has its module layout."""
    other = "encoder" if kind == "decoder" else "decoder"
    parts = (f"{kind}_frontend", kind)
    if isinstance(model, torch.nn.Module) and all(isinstance(getattr(model, p, None), torch.nn.Module) for p in parts):
        if isinstance(getattr(getattr(model, kind), "layers", None), torch.nn.ModuleList):
            return
    hint = ""
    if isinstance(model, torch.nn.Module) and isinstance(getattr(model, f"{other}_frontend", None), torch.nn.Module):
        hint = f" (this is a SONAR {other}: use {other}_from_fairseq2)"
    raise TypeError(
        f"model must be a loaded fairseq2/sonar {EXPECTED[kind]} (with {parts[0]} and {parts[1]}.layers), "
        f"got {type(model).__module__}.{type(model).__name__}{hint}"
    )


def _sin_offset(pos) -> int | None:
    """The first position step of a fairseq2 ``SinusoidalPositionEncoder``: ``sin_offset`` in
    fairseq2 >= 0.5, ``_sin_offset`` in 0.3/0.4; None for any other position encoder."""
    for name in ("sin_offset", "_sin_offset"):
        offset = getattr(pos, name, None)
        if isinstance(offset, int) and not isinstance(offset, bool):
            return offset
    return None


def _dropout_p(layers, kind: str) -> float:
    """The attention dropout rate of the layers (their residual ``self_attn_dropout``, None = 0)."""
    rates = {float(getattr(getattr(layer, "self_attn_dropout", None), "p", 0.0)) for layer in layers}
    if len(rates) > 1:
        raise _unsupported(kind, f"layers with different attention dropout rates {sorted(rates)}")
    return rates.pop() if rates else 0.0


def fairseq2_model_config(model, kind: str) -> SonarTextConfig:
    """Our config of a fairseq2 ``ConditionalTransformerDecoderModel`` (kind "decoder") or
    ``SonarTextTransformerEncoderModel`` (kind "encoder"), fairseq2 0.3/0.4 or >= 0.5, read off
    the model (see module doc)."""
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    _check_model(model, kind)
    frontend, stack = getattr(model, f"{kind}_frontend"), getattr(model, kind)
    sizes = weight_sizes(to_fairseq2_state_dict(model.state_dict(), kind), kind)
    pos = getattr(frontend, "pos_encoder", None)
    offset = _sin_offset(pos)
    if offset is None:
        raise _unsupported(kind, f"positions {type(pos).__name__} (SONAR: sinusoidal, from step pad_idx + 1)")
    if offset < 1:
        raise _unsupported(kind, "no pad index (vocab_info.pad_idx None: sinusoidal positions from step 0); SONAR's "
                                 "positions start at step pad_idx + 1 (pad index 1 in SONAR)")  # fmt: skip
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
    pad_idx = offset - 1
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
        max_seq_len, final_norm = pos.max_seq_len - offset, model.layer_norm
    return SonarTextConfig(**sizes, num_heads=heads.pop(), max_seq_len=max_seq_len, legacy_pad_idx=pad_idx,
                           dropout_p=_dropout_p(layers, kind), layer_norm_eps=final_norm.eps)  # fmt: skip


def _wrap(cls, model, kind: str, **kwargs):
    cfg = fairseq2_model_config(model, kind)
    with torch.device("meta"):
        ours = cls(cfg, **kwargs)
    load_state(ours, to_fairseq2_state_dict(model.state_dict(), kind), assign=True)
    ours.reset_buffers(next(model.parameters()).device)
    return ours.requires_grad_(False)


def decoder_from_fairseq2(model, **kwargs) -> SonarDecoder:
    """Our ``SonarDecoder`` for a loaded fairseq2/sonar ``ConditionalTransformerDecoderModel``
    (fairseq2 0.3/0.4 or >= 0.5), sharing its weights (no copy); keyword arguments go to
    ``SonarDecoder``. Raises TypeError for another kind of model, CheckpointError for a
    decoder these models do not implement."""
    return _wrap(SonarDecoder, model, "decoder", **kwargs)


def encoder_from_fairseq2(model, **kwargs) -> SonarEncoder:
    """Our ``SonarEncoder`` for a loaded fairseq2/sonar ``SonarTextTransformerEncoderModel``
    (fairseq2 0.3/0.4 or >= 0.5), sharing its weights (no copy); keyword arguments go to
    ``SonarEncoder``. Raises TypeError for another kind of model, CheckpointError for an
    encoder these models do not implement."""
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
