"""Loading SONAR text encoder/decoder weights from every format they are published in.

Accepted layouts (detected from the keys; see tests/fixtures/README.md §6):

* **fairseq2** (this package's native names, and most likely the released ``.pt`` files):
  ``{"model": state_dict}`` or a bare state dict with ``decoder_frontend.embed.weight`` /
  ``encoder_frontend.embed.weight``; embedding rows in fairseq2 order (pad, unk, bos, eos).
* **fairseq1** (``{"state_dict": ...}`` or ``{"model": {"state_dict": ...}}``, keys
  ``embed_tokens``, ``layers.N.self_attn.out_proj``, ``encoder_attn``, ``fc1``, ``fc2``,
  ``final_layer_norm``, ``layer_norm``, ``output_projection``) and **Hugging Face M2M100 ports**
  (the same names under ``model.decoder.``/``model.encoder.``/``decoder.``/``encoder.`` prefixes,
  ``lm_head``, ``.safetensors`` or ``.bin``): renamed, and the first four embedding rows
  permuted from fairseq's (bos, pad, eos, unk) to fairseq2's (pad, unk, bos, eos) order.

A checkpoint with missing or unexpected weights, shapes that disagree with the configuration,
or a file that cannot be read raises ``CheckpointError`` naming the problem.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from sonarllm.sonar.config import SonarTextConfig
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder

# fairseq2 row r holds fairseq1/HF row FS1_TO_FS2[r] (fairseq1: <s>=0, <pad>=1, </s>=2, <unk>=3).
FS1_TO_FS2 = [1, 3, 0, 2]
_IGNORED_SUFFIXES = ("version", "embed_positions._float_tensor", "embed_positions.weights", "embed_positions.weight")
_LAYER_RENAMES = [
    (r"\.self_attn\.out_proj\.", ".self_attn.output_proj."),
    (r"\.encoder_attn\.out_proj\.", ".encoder_decoder_attn.output_proj."),
    (r"\.encoder_attn_layer_norm\.", ".encoder_decoder_attn_layer_norm."),
    (r"\.encoder_attn\.", ".encoder_decoder_attn."),
    (r"\.fc1\.", ".ffn.inner_proj."),
    (r"\.fc2\.", ".ffn.output_proj."),
    (r"\.final_layer_norm\.", ".ffn_layer_norm."),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_checkpoint_file(path: str | os.PathLike, *, trust: bool = False) -> dict:
    """Read a ``.pt``/``.bin`` (torch) or ``.safetensors`` file into a dict.

    ``trust=False`` unpickles only tensors and plain containers (``weights_only``); a training
    checkpoint that pickles configuration objects needs ``trust=True`` (only for files you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    try:
        try:  # memory-mapped: a 3 GB checkpoint is not copied into memory before use
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=not trust)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        if not trust and "weights_only" in str(exc):
            raise CheckpointError(
                f"{path} pickles objects other than tensors; if you trust the file, load it with trust=True "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted?): {exc}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted?): {exc}") from exc


def _unwrap(obj) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"a checkpoint must be a dict of tensors, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


def _from_fairseq1(sd: dict, kind: str) -> dict:
    """fairseq1 / HF M2M100 names -> fairseq2 names, embedding rows permuted."""
    prefix_re = re.compile(rf"^(model\.)?({kind}\.)?")
    stack = "decoder" if kind == "decoder" else "encoder"
    other = ("model.encoder.", "encoder.") if kind == "decoder" else ("model.decoder.", "decoder.", "lm_head.")
    full_port = any(k.startswith(("model.encoder.", "model.decoder.")) for k in sd)
    out = {}
    for key, value in sd.items():
        if key.endswith(_IGNORED_SUFFIXES) or key in ("model.shared.weight", "shared.weight"):
            continue
        if full_port and key.startswith(other):  # the other half of an M2M100ForConditionalGeneration
            continue
        name = prefix_re.sub("", key, count=1)
        if name.startswith("embed_tokens."):
            out[f"{stack}_frontend.embed." + name[len("embed_tokens."):]] = value
        elif name in ("output_projection.weight", "lm_head.weight"):
            out["final_proj.weight"] = value
        elif name.startswith("layers."):
            for pattern, repl in _LAYER_RENAMES:
                name = re.sub(pattern, repl, name)
            out[f"{stack}.{name}"] = value
        elif name.startswith("layer_norm."):
            out[f"decoder.{name}" if kind == "decoder" else name] = value
        else:
            out[name] = value  # reported as unexpected by the caller
    embed_key = f"{stack}_frontend.embed.weight"
    if embed_key in out:
        table = out[embed_key].clone()
        table[:4] = table[FS1_TO_FS2]
        out[embed_key] = table
    if "final_proj.weight" in out and embed_key in out:
        # The projection is tied to the embedding; a separate copy must be the same matrix.
        proj = out.pop("final_proj.weight")
        proj = proj.clone()
        proj[:4] = proj[FS1_TO_FS2]
        if proj.shape != out[embed_key].shape or not torch.equal(proj, out[embed_key]):
            raise CheckpointError("the checkpoint's output projection differs from its token embedding; SONAR ties them")
    return out


def to_fairseq2_state_dict(obj: dict, kind: str) -> dict:
    """Any accepted layout (see module docstring) -> fairseq2 names and row order."""
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    sd = _unwrap(obj)
    if f"{kind}_frontend.embed.weight" in sd:
        sd = dict(sd)
        proj = sd.pop("final_proj.weight", None) if kind == "decoder" else None
        if proj is not None and not torch.equal(proj, sd["decoder_frontend.embed.weight"]):
            raise CheckpointError("final_proj.weight differs from decoder_frontend.embed.weight; SONAR ties them")
        return sd
    if any(k.endswith("embed_tokens.weight") for k in sd):
        return _from_fairseq1(sd, kind)
    other = "encoder" if kind == "decoder" else "decoder"
    if f"{other}_frontend.embed.weight" in sd:
        raise CheckpointError(f"this is a SONAR {other} checkpoint, not a {kind} one")
    raise CheckpointError(
        f"unrecognised {kind} checkpoint layout (no {kind}_frontend.embed.weight or embed_tokens.weight); "
        f"first keys: {sorted(sd)[:5]}"
    )


def infer_config(sd: dict, kind: str) -> SonarTextConfig:
    """Sizes read off a fairseq2-layout state dict (SONAR's head size, 64, gives the heads)."""
    embed = sd[f"{kind}_frontend.embed.weight"]
    vocab, dim = embed.shape
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{kind}\.layers\.(\d+)\.", k))}
    ffn = sd.get(f"{kind}.layers.0.ffn.inner_proj.weight")
    if not layer_ids or ffn is None:
        raise CheckpointError(f"the {kind} checkpoint has no layers ({kind}.layers.0.ffn.inner_proj.weight missing)")
    return SonarTextConfig(model_dim=dim, num_layers=max(layer_ids) + 1, num_heads=max(1, dim // 64),
                           ffn_dim=ffn.shape[0], vocab_size=vocab)  # fmt: skip


def load_state(model: torch.nn.Module, sd: dict, *, assign: bool = False) -> None:
    """Strict load with errors naming missing/unexpected keys and mismatched shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)} keys), unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} keys)"
        )
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError("checkpoint shapes do not match the configuration: " + "; ".join(bad[:5]))
    model.load_state_dict(sd, assign=assign)


def _source_state(source, kind: str, trust: bool) -> tuple[dict, SonarTextConfig | None]:
    """State dict in fairseq2 layout, and the config the checkpoint records (our files do)."""
    if not isinstance(source, dict):
        source = _read_source(source, kind, trust)
    saved = source.get("sonar_config") if isinstance(source, dict) else None
    return to_fairseq2_state_dict(source, kind), None if saved is None else SonarTextConfig.from_dict(saved)


def _read_source(source, kind: str, trust: bool) -> dict:
    text = os.fspath(source)
    if not Path(text).exists():
        from sonarllm.sonar.download import ASSETS, fetch

        if text in ASSETS or "://" in text:
            if text in ASSETS and ASSETS[text].kind != kind:
                raise CheckpointError(f"asset {text!r} is a SONAR {ASSETS[text].kind}, not a {kind}")
            text = os.fspath(fetch(text))
    return read_checkpoint_file(text, trust=trust)


def _build(cls, kind, source, config, device, dtype, trust, **kwargs):
    sd, saved = _source_state(source, kind, trust)
    cfg = config if config is not None else saved if saved is not None else infer_config(sd, kind)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = cls(cfg, **kwargs)
    load_state(model, {k: v.contiguous() for k, v in sd.items()}, assign=True)
    model.reset_buffers()  # the position tables are not in checkpoints
    return model.to(device=device, dtype=dtype)


def load_sonar_decoder(source, *, config: str | SonarTextConfig | None = None, device=None, dtype=None,
                       trust: bool = False, **kwargs) -> SonarDecoder:  # fmt: skip
    """A frozen ``SonarDecoder`` from a file path, an asset name (``text_sonar_basic_decoder``,
    downloaded to the cache), a URL or a state dict, in any accepted layout.

    ``config`` defaults to the one the checkpoint records (this package's files carry a
    ``sonar_config`` entry), else to the sizes read off the weights; extra keyword arguments
    (``train_dropout``, ``kernel_impl``) go to ``SonarDecoder``.
    """
    return _build(SonarDecoder, "decoder", source, config, device, dtype, trust, **kwargs)


def load_sonar_encoder(source, *, config: str | SonarTextConfig | None = None, device=None, dtype=None,
                       trust: bool = False, **kwargs) -> SonarEncoder:  # fmt: skip
    """A frozen ``SonarEncoder`` (see ``load_sonar_decoder``; asset ``text_sonar_basic_encoder``)."""
    return _build(SonarEncoder, "encoder", source, config, device, dtype, trust, **kwargs)


def decoder_from_fairseq2(model, **kwargs) -> SonarDecoder:
    """Wrap a loaded fairseq2/sonar ``ConditionalTransformerDecoderModel`` without copying weights
    (our decoder's parameters become views of the same tensors)."""
    sd = to_fairseq2_state_dict(model.state_dict(), "decoder")
    cfg = infer_config(sd, "decoder")
    layer = model.decoder.layers[0].self_attn
    cfg = SonarTextConfig(**{**cfg.to_dict(), "num_heads": int(layer.num_heads),
                             "max_seq_len": int(getattr(model, "max_target_seq_len", cfg.max_seq_len))})  # fmt: skip
    param = next(model.parameters())
    with torch.device("meta"):
        ours = SonarDecoder(cfg, **kwargs)
    load_state(ours, sd, assign=True)
    ours.reset_buffers(param.device)
    return ours.requires_grad_(False)


def load_via_fairseq2(name: str, kind: str = "decoder", **kwargs):
    """Load a SONAR model by fairseq2 asset name through sonar-space/fairseq2 (when installed),
    then convert it: the fairseq2 card system resolves and caches the download."""
    try:
        from fairseq2.models import load_model
    except ImportError as exc:
        raise ImportError("loading by fairseq2 asset name needs sonar-space and fairseq2 (extra 'sonar')") from exc
    fs2 = load_model(name, device=torch.device("cpu"))
    if kind == "decoder":
        return decoder_from_fairseq2(fs2, **kwargs)
    return _build(SonarEncoder, "encoder", fs2.state_dict(), None, None, None, False, **kwargs)
