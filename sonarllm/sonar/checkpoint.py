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
or a file that cannot be read raises ``CheckpointError`` naming the problem. So does one whose
configuration cannot be known: fairseq2 files record none, and only the released architecture
is recognised by its sizes (see ``load_sonar_decoder``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch

from sonarllm.sonar.config import SONAR_CONFIGS, SonarTextConfig, sonar_config
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder
from sonarllm.sonar.layers import sinusoidal_table

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


def weight_sizes(sd: dict, kind: str) -> dict:
    """The sizes a fairseq2-layout state dict determines: model_dim, num_layers, ffn_dim, vocab_size."""
    embed = sd[f"{kind}_frontend.embed.weight"]
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{kind}\.layers\.(\d+)\.", k))}
    ffn = sd.get(f"{kind}.layers.0.ffn.inner_proj.weight")
    if not layer_ids or ffn is None:
        raise CheckpointError(f"the {kind} checkpoint has no layers ({kind}.layers.0.ffn.inner_proj.weight missing)")
    return {"model_dim": embed.shape[1], "num_layers": max(layer_ids) + 1, "ffn_dim": ffn.shape[0], "vocab_size": embed.shape[0]}


def stored_positions(sd: dict, kind: str) -> int | None:
    """Token positions covered by a sinusoidal table that a fairseq1 / Hugging Face file stores
    (``embed_positions.weights``: row s encodes step s, rows 0-1 unused), or None without one.
    A table of other values (learned positions) raises: these models cannot use it."""
    for key, table in _unwrap(sd).items():
        m = re.fullmatch(r"(?:model\.)?(?:(encoder|decoder)\.)?embed_positions\.weights?", key)
        if m and m.group(1) in (None, kind) and table.dim() == 2:
            expected = sinusoidal_table(table.shape[0] - 2, table.shape[1], 2)
            tol = max(1e-4, 2 * torch.finfo(table.dtype).eps) if table.is_floating_point() else 0
            if table.shape[0] < 3 or not torch.allclose(table[2:].float(), expected, atol=tol, rtol=0):
                raise CheckpointError(f"{key} is not SONAR's sinusoidal position table (learned positions?); "
                                      "these models use fixed sinusoidal positions")  # fmt: skip
            return table.shape[0] - 2
    return None


def infer_config(sd: dict, kind: str, *, known: dict | None = None) -> SonarTextConfig:
    """The configuration of a checkpoint that records none.

    The weights determine the sizes; ``known`` adds values from elsewhere (a ``sonar.json`` beside
    the file, the fairseq1 layout's pad index, a stored position table). The head count, length
    and pad index are not in fairseq2 files: a released SONAR architecture (``basic``) is
    recognised by its exact sizes, and any other checkpoint without them raises CheckpointError
    naming them (guessing gives wrong outputs without an error).
    """
    values = weight_sizes(sd, kind) | (known or {})
    missing = [name for name in ("num_heads", "max_seq_len", "legacy_pad_idx") if name not in values]
    released = SONAR_CONFIGS["basic"]
    if missing and all(getattr(released, k) == v for k, v in values.items()):
        return released
    if not missing:
        return SonarTextConfig.from_dict(values)
    given = ", ".join(f"{k}={v}" for k, v in values.items())
    raise CheckpointError(
        f"the SONAR {kind} checkpoint records no configuration and is not a released SONAR architecture "
        f"({given}), so its {', '.join(missing)} cannot be known; pass config=SonarTextConfig({given}, "
        f"{', '.join(f'{m}=...' for m in missing)}), or put a sonar.json beside the file whose \"{kind}\" entry "
        f"names it and whose \"{kind}_config\" gives {', '.join(missing)}"
    )


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


def _read_source(source, kind: str, trust: bool) -> tuple[Path, dict]:
    """The file a path, asset name or URL names (assets and URLs downloaded), and its contents."""
    text = os.fspath(source)
    if not Path(text).exists():
        from sonarllm.sonar.download import ASSETS, fetch

        if text in ASSETS or "://" in text:
            if text in ASSETS and ASSETS[text].kind != kind:
                raise CheckpointError(f"asset {text!r} is a SONAR {ASSETS[text].kind}, not a {kind}")
            text = os.fspath(fetch(text))
    return Path(text), read_checkpoint_file(text, trust=trust)


def config_beside(path: Path, kind: str) -> dict:
    """The ``{kind}_config`` values of a ``sonar.json`` in the checkpoint's directory whose ``{kind}``
    entry names that checkpoint (a SonarSpec, see pipeline.py), else {}."""
    spec_path = path.parent / "sonar.json"
    if not spec_path.is_file():
        return {}
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{spec_path} is not readable JSON: {exc}") from exc
    named, values = spec.get(kind), spec.get(f"{kind}_config")
    if values is None or named is None or "://" in named or (spec_path.parent / named).resolve() != path.resolve():
        return {}
    names = {f.name for f in fields(SonarTextConfig)}
    if not isinstance(values, dict) or not set(values) <= names:
        raise CheckpointError(f"{spec_path}: {kind}_config must be an object of SonarTextConfig fields {sorted(names)}, got {values!r}")
    return values


def _resolve(kind, source, config, trust):
    """(config, fairseq2 state dict) of a checkpoint from any source, the config resolved in
    order: an explicit one, the one the checkpoint records, a ``sonar.json`` beside the file, the
    weights (see ``load_sonar_decoder``)."""
    path, obj = (None, source) if isinstance(source, dict) else _read_source(source, kind, trust)
    sd = to_fairseq2_state_dict(obj, kind)
    given, config = (config, None) if isinstance(config, Mapping) else ({}, config)
    if config is None and not given and obj.get("sonar_config") is not None:
        config = SonarTextConfig.from_dict(obj["sonar_config"])
    positions = stored_positions(obj, kind)  # checked even with a config: a learned table is refused
    if config is None:
        known = {} if f"{kind}_frontend.embed.weight" in _unwrap(obj) else {"legacy_pad_idx": 1}  # fairseq1 layout
        if positions is not None:  # tables are only in fairseq1 layouts; ours adds pad + 1 for the encoder
            known["max_seq_len"] = positions - (2 if kind == "encoder" else 0)
        given = given or (config_beside(path, kind) if path is not None else {})
        config = infer_config(sd, kind, known=known | dict(given))
    return sonar_config(config), sd


def checkpoint_config(source, kind: str, *, config: str | SonarTextConfig | Mapping | None = None,
                      trust: bool = False) -> SonarTextConfig:  # fmt: skip
    """The configuration ``load_sonar_decoder`` (kind "decoder") or ``load_sonar_encoder``
    ("encoder") would build ``source`` with, without building it (e.g. the decoder's
    ``max_seq_len`` before data preparation cuts target sequences)."""
    return _resolve(kind, source, config, trust)[0]


def _build(cls, kind, source, config, device, dtype, trust, **kwargs):
    """The model from any source (see ``load_sonar_decoder``)."""
    config, sd = _resolve(kind, source, config, trust)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = cls(config, **kwargs)
    load_state(model, {k: v.contiguous() for k, v in sd.items()}, assign=True)
    model.reset_buffers()  # the position tables are not in checkpoints
    return model.to(device=device, dtype=dtype)


def load_sonar_decoder(source, *, config: str | SonarTextConfig | Mapping | None = None, device=None, dtype=None,
                       trust: bool = False, **kwargs) -> SonarDecoder:  # fmt: skip
    """A frozen ``SonarDecoder`` from a file path, an asset name (``text_sonar_basic_decoder``,
    downloaded to the cache), a URL or a state dict, in any accepted layout.

    ``config`` is a SonarTextConfig, a name ("basic", "toy"), or a dict of SonarTextConfig fields
    that completes the sizes read off the weights. It defaults to the one the checkpoint records
    (this package's files carry a ``sonar_config`` entry), else to the ``decoder_config`` of a
    ``sonar.json`` beside the file that names it (a SonarSpec), else to the released architecture
    when the weights have its exact sizes; any other checkpoint raises CheckpointError naming the
    fields only a config can give (``num_heads``, ``max_seq_len``, ``legacy_pad_idx``: fairseq2
    files record no configuration). Extra keyword arguments (``train_dropout``, ``kernel_impl``)
    go to ``SonarDecoder``.
    """
    return _build(SonarDecoder, "decoder", source, config, device, dtype, trust, **kwargs)


def load_sonar_encoder(source, *, config: str | SonarTextConfig | Mapping | None = None, device=None, dtype=None,
                       trust: bool = False, **kwargs) -> SonarEncoder:  # fmt: skip
    """A frozen ``SonarEncoder`` (see ``load_sonar_decoder``; asset ``text_sonar_basic_encoder``,
    ``encoder_config`` in a ``sonar.json``)."""
    return _build(SonarEncoder, "encoder", source, config, device, dtype, trust, **kwargs)
