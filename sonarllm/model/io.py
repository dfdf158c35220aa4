"""Checkpoint I/O of the concept transformer: ``save_pretrained`` / ``load_pretrained`` (a
directory with ``config.json`` and ``model.safetensors``, whose metadata repeats the config, each
written to a temporary file and renamed into place) and ``load_official`` (the paper's released
checkpoints, through sonarllm/official.py). ``SonarLLM``'s methods call these.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sonarllm.config import SonarLLMConfig
from sonarllm.files import atomic_write as _atomic_write
from sonarllm_kernels.embedding_projection import check_normalizer_values

if TYPE_CHECKING:
    from sonarllm.model.transformer import SonarLLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_METADATA_KEY = "sonarllm_config"


def save_pretrained(model: SonarLLM, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    Each file is written to a temporary file in the same directory, flushed to disk and
    renamed over the old one (``os.replace``), so an interrupted save never leaves a
    half-written file; the weights' metadata repeats the config, so ``from_pretrained``
    notices a config.json from another save. Returns the directory.
    """
    path = Path(directory)
    if model.input_proj.weight.device.type == "meta":
        raise ValueError("cannot save a model on the meta device (it has no weights)")
    path.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", _METADATA_KEY: config_json}
    _atomic_write(
        path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata=metadata)
    )
    _atomic_write(path / CONFIG_NAME, lambda tmp: tmp.write_text(config_json + "\n"))
    return path

def load_pretrained(
    cls: type[SonarLLM],
    directory: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> SonarLLM:
    """Load a ``save_pretrained`` directory, in eval mode.

    Args:
        directory: holds ``config.json`` and ``model.safetensors``.
        device: where to put the model (default CPU).
        dtype: cast floating parameters to it (default: as stored); the normalizer stays float32.
        config_overrides: fields replaced in the loaded config, e.g. ``kernel_impl="torch"``.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: config.json is unreadable or invalid, the weights file is corrupted, or the
            config does not match the weights (missing / unexpected keys, shape mismatches are
            named).
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} does not exist (or is not a directory)"
        )
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"checkpoint file {str(p)!r} is missing (a save_pretrained directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    if dtype is not None and (
        not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
    ):
        raise TypeError(f"dtype must be a float torch.dtype or None, got {dtype!r}")
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(values).__name__}")
    try:
        config = SonarLLMConfig.from_dict({**values, **config_overrides})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} (with overrides {config_overrides}): {exc}") from exc

    def corrupted(exc: Exception) -> ValueError:
        return ValueError(
            f"{weights_path} is corrupted or not a safetensors file: {type(exc).__name__}: {exc}"
        )

    try:  # safetensors raises its own SafetensorError (neither OSError nor ValueError)
        handle = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as exc:
        raise corrupted(exc) from exc
    with handle as f:
        try:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:
            raise corrupted(exc) from exc
        with torch.device("meta"):
            model = cls(config)
        _check_state_shapes(model, shapes, config_path, weights_path)
        try:
            state = {k: f.get_tensor(k) for k in shapes}
        except Exception as exc:
            raise corrupted(exc) from exc
    saved = {k: v for k, v in config.to_dict().items() if k not in config_overrides}
    _warn_config_drift(metadata.get(_METADATA_KEY), saved, config_path, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    for p in (model.input_proj, model.output_proj):
        if p.center is not None:
            try:
                check_normalizer_values(p.center, p.scale)
            except ValueError as exc:
                raise ValueError(
                    f"{weights_path}: normalizer of {'input_proj' if p is model.input_proj else 'output_proj'}: {exc}"
                ) from exc
    model.to(device=device or "cpu", dtype=dtype)
    return model.eval()

def load_official(
    cls: type[SonarLLM],
    path: str | os.PathLike,
    config: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
    **config_overrides: Any,
) -> SonarLLM:
    """Load one of the SONAR-LLM paper's released checkpoints, in eval mode (sonarllm/official.py).

    Its predictions equal the official ``reverse_proj(llama(inputs_embeds=forward_proj(e))
    .hidden_states[-1])``.

    Args:
        path: the GitHub-release ``torch.save`` file (``model_state_dict`` with
            ``llama_model.*``, ``forward_proj.linear.*``, ``reverse_proj.linear.*``,
            ``sonar_decoder.*``), or a Hugging Face directory (``config.json`` with
            ``llama_config``, ``embed_dim``, ``add_begin``; ``pytorch_model.bin``).
        config: the official configuration: a path to ``SonarLLM_{100M,...}.json``, a dict
            (``{"llama_config": {...}}`` or the bare llama config) or a ``LlamaConfig``.
            Required for a release file; for a directory it replaces its ``config.json``.
        device: where to put the model (default CPU).
        dtype: floating dtype of the parameters (default: as stored when all stored tensors
            share one, else float32).
        trust: unpickle any object of the file (only for files you trust); by default only
            tensors, plain containers and NumPy arrays (the release files' RNG states).
        config_overrides: fields of ``SonarLLMConfig`` to replace, e.g. ``kernel_impl="torch"``.

    Raises:
        CheckpointError: a missing or unreadable file, a config that is missing, does not
            fit the weights (layer count, shapes) or asks for something not implemented
            (grouped-query attention, biases, other activations or RoPE types), unknown
            keys in the state dict; each named.
    """
    from sonarllm.official import (
        check_official_shapes,
        locate_official,
        official_to_config,
        official_to_state,
        read_official_state,
    )
    from sonarllm.sonar.checkpoint import CheckpointError

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a float torch.dtype or None, got {dtype!r}")
    weights_path, dir_config = locate_official(path)
    if config is None:
        if dir_config is None:
            raise CheckpointError(
                f"{path} records no configuration: pass config= (the official SonarLLM_{{100M,300M,600M,900M}}.json "
                "that matches it)"
            )
        config = dir_config
    cfg = official_to_config(config, **config_overrides)
    state = official_to_state(read_official_state(weights_path, trust=trust), cfg, str(weights_path))
    with torch.device("meta"):
        model = cls(cfg)
    check_official_shapes(model, state, str(weights_path))
    stored = {v.dtype for v in state.values()}
    target = dtype or (stored.pop() if len(stored) == 1 and next(iter(stored)).is_floating_point else torch.float32)
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)
    model.to(device=device or "cpu")
    return model.eval()


def _check_state_shapes(
    model: SonarLLM, shapes: dict[str, tuple], config_path: Path, weights_path: Path
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{k}: {shapes[k]} in the file, {expected[k]} for the config"
        for k in sorted(set(expected) & set(shapes))
        if shapes[k] != expected[k]
    ]
    if missing or unexpected or wrong:
        show = lambda items: f"{len(items)}: {items[:6]}{' ...' if len(items) > 6 else ''}"
        parts = [f"missing keys ({show(missing)})"] if missing else []
        parts += [f"unexpected keys ({show(unexpected)})"] if unexpected else []
        parts += [f"shape mismatches ({show(wrong)})"] if wrong else []
        raise ValueError(
            f"{config_path} does not match the weights in {weights_path}: " + "; ".join(parts)
        )


def _warn_config_drift(
    saved_json: str | None, loaded: dict, config_path: Path, weights_path: Path
) -> None:
    """Warn when config.json differs from the config saved with the weights (edited, or a
    config.json from another save: save_pretrained renames the weights first). ``loaded`` is
    the resolved config minus the caller's overrides; kernel_impl is not compared."""
    if saved_json is None:
        return
    try:
        saved = SonarLLMConfig.from_dict(json.loads(saved_json)).to_dict()
    except (json.JSONDecodeError, TypeError, ValueError):
        return
    differ = sorted(k for k in loaded if k != "kernel_impl" and saved.get(k) != loaded[k])
    if differ:
        warnings.warn(
            f"{config_path} differs from the config saved with {weights_path} in {differ}; using {config_path}",
            RuntimeWarning,
            stacklevel=3,
        )
