"""Loading the SONAR-LLM paper's released checkpoints (github FusionBrainLab/SONAR-LLM and the
Hugging Face models ``raxtemur/sonar-llm-*``) into our concept transformer.

The paper's model is a wrapper (``SonarLossWrapper`` / ``SonarInferenceWrapper``) around an HF
``LlamaForCausalLM`` fed through ``inputs_embeds``:

    pred = reverse_proj.linear(llama_model(inputs_embeds=forward_proj.linear(e)).hidden_states[-1])

``hidden_states[-1]`` is the final RMSNorm's output, so this is exactly ``SonarLLM.forward``.
Two layouts are read (docs/sonar-llm.md §1.3):

* **release file**: a ``torch.save`` dict ``{"model_state_dict": {...}, "optimizer_state_dict":
  ..., "numpy_rng_state": ..., ...}``; the configuration is a separate JSON,
  ``SonarLLM_{100M,300M,600M,900M}.json`` = ``{"pretrained_model_name_or_path": ...,
  "llama_config": {...}}``, which the caller gives;
* **Hugging Face directory**: ``config.json`` (``llama_config``, ``embed_dim``, ``add_begin``) and
  ``pytorch_model.bin`` (or ``model.safetensors``), the state dict bare or under
  ``model_state_dict``.

Weights (state dict key -> ours): ``llama_model.model.layers.N.*`` -> ``layers.N.*`` (HF's
names are ours), ``llama_model.model.norm.weight`` -> ``norm.weight``,
``forward_proj.linear.*`` -> ``input_proj.*``, ``reverse_proj.linear.*`` -> ``output_proj.*``
(a bare ``LlamaModel`` backbone's ``llama_model.layers.*`` / ``llama_model.norm.*`` too).
The frozen ``sonar_decoder.*``, the unused 128k token table ``llama_model.model.embed_tokens``,
its tied ``llama_model.lm_head`` and RoPE ``inv_freq`` buffers are ignored (listed in one log
line of the ``sonarllm.official`` logger). A DDP ``module.`` prefix is removed.

Configuration (``llama_config`` -> ``SonarLLMConfig``; missing fields take ``LlamaConfig``'s
defaults, as the official code's ``LlamaConfig(**llama_config)`` does): ``hidden_size`` ->
model_dim, ``intermediate_size`` -> ffn_dim, ``num_hidden_layers`` -> num_layers,
``num_attention_heads`` -> num_heads, ``head_dim``, ``rms_norm_eps``, ``rope_theta``,
``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5, which also holds
``rope_theta``), ``initializer_range`` -> init_std, ``max_position_embeddings`` -> max_seq_len
(capped at 4096 sentences: documents have at most 33), ``embed_dim`` -> sonar_dim (default
1024), ``add_begin``. What our model does not implement is refused with ``CheckpointError``:
grouped-query attention (``num_key_value_heads`` != heads), an activation other than SiLU,
attention or MLP biases, RoPE scalings other than llama3. The caller's dicts are never modified
(transformers 5's ``LlamaConfig(**d)`` writes ``rope_theta`` into the ``rope_scaling`` dict it
is given; both that form and the original are accepted).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sonarllm.config import SonarLLMConfig
from sonarllm.sonar.checkpoint import CheckpointError, read_checkpoint_file

logger = logging.getLogger("sonarllm.official")

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAMES = ("pytorch_model.bin", "model.safetensors")
MAX_SEQ_LEN_CAP = 4096
"""Largest ``max_seq_len`` given to a loaded model (the RoPE table and KV cache bound)."""

# LlamaConfig's defaults for the fields that shape the network (transformers 4.4x / 5.x).
_LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
}
_LAYER_RE = re.compile(r"^llama_model\.model\.layers\.(\d+)\.(.+)$")
_IGNORED_PREFIXES = ("sonar_decoder.", "llama_model.model.embed_tokens.", "llama_model.lm_head.")


# ---------------------------------------------------------------------------------------------
# Configuration


def read_official_config(config: Any) -> dict:
    """The official configuration as a fresh dict ``{"llama_config": {...}, ...}``.

    ``config``: a path to the JSON file, a dict in the wrapper form (``{"llama_config": ...,
    "embed_dim": ..., "add_begin": ...}``) or a bare ``llama_config`` dict, or a transformers
    ``LlamaConfig``. Deep-copied: the caller's objects are never modified.
    """
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise CheckpointError(f"official config file not found: {path}")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"official config {path} is not valid JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise CheckpointError(f"official config {path} must hold a JSON object, got {type(values).__name__}")
        config = values
    elif hasattr(config, "to_dict") and not isinstance(config, Mapping):  # a transformers config
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a path to the official JSON, a dict or a LlamaConfig, got {type(config).__name__}"
        )
    values = copy.deepcopy(dict(config))
    if "llama_config" not in values:
        if "model_dim" in values and "sonar_dim" in values:
            raise CheckpointError(
                "this is sonarllm's own configuration, not the paper's: load the directory with SonarLLM.from_pretrained"
            )
        if "hidden_size" not in values:
            raise CheckpointError(
                "the official config has neither 'llama_config' (SonarLLM_*.json, the Hugging Face config.json) "
                f"nor 'hidden_size' (a bare llama config); keys: {sorted(values)[:12]}"
            )
        values = {"llama_config": values}
    if not isinstance(values["llama_config"], Mapping):
        raise CheckpointError(f"the official config's 'llama_config' must be an object, got {values['llama_config']!r}")
    values["llama_config"] = dict(values["llama_config"])
    return values


def _rope(llama: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either transformers generation's fields."""
    forms = {k: llama[k] for k in ("rope_scaling", "rope_parameters") if llama.get(k) is not None}
    for key, value in forms.items():
        if not isinstance(value, Mapping):
            raise CheckpointError(f"llama_config['{key}'] must be an object or null, got {value!r}")
    if len(forms) == 2 and dict(forms["rope_scaling"]) != dict(forms["rope_parameters"]):
        drop = lambda d: {k: v for k, v in d.items() if k != "rope_theta"}
        if drop(forms["rope_scaling"]) != drop(forms["rope_parameters"]):
            raise CheckpointError(
                f"llama_config's rope_scaling {forms['rope_scaling']} and rope_parameters {forms['rope_parameters']} disagree"
            )
    params = dict(next(iter(forms.values()))) if forms else {}
    thetas = {float(v) for v in (llama.get("rope_theta"), *(f.get("rope_theta") for f in forms.values())) if v is not None}
    if len(thetas) > 1:
        raise CheckpointError(f"llama_config gives different rope_theta values {sorted(thetas)}")
    theta = thetas.pop() if thetas else 10000.0  # LlamaConfig's default
    params.pop("rope_theta", None)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default" and not params:
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            f"llama_config's RoPE type {rope_type!r} is not implemented (sonarllm: plain RoPE or 'llama3' scaling)"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    unknown, missing = sorted(set(params) - set(keys)), sorted(set(keys) - set(params))
    if unknown or missing:
        raise CheckpointError(f"llama_config's llama3 RoPE scaling has unknown keys {unknown} / missing keys {missing}")
    return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}


def official_to_config(config: Any, **overrides: Any) -> SonarLLMConfig:
    """Our ``SonarLLMConfig`` for an official configuration (see ``read_official_config`` for
    the accepted forms and the module docstring for the mapping); ``overrides`` replace fields."""
    values = read_official_config(config)
    llama = {**_LLAMA_DEFAULTS, **{k: v for k, v in values["llama_config"].items() if v is not None or k in _LLAMA_DEFAULTS}}
    heads = llama["num_attention_heads"]
    kv_heads = llama["num_key_value_heads"]
    if kv_heads is not None and kv_heads != heads:
        raise CheckpointError(
            f"llama_config has num_key_value_heads = {kv_heads} != num_attention_heads = {heads}: grouped-query "
            "attention is not implemented by sonarllm's concept transformer (the paper's models use plain MHA)"
        )
    if llama["hidden_act"] != "silu":
        raise CheckpointError(f"llama_config has hidden_act = {llama['hidden_act']!r}; sonarllm implements 'silu' only")
    for key in ("attention_bias", "mlp_bias"):
        if llama[key]:
            raise CheckpointError(f"llama_config has {key} = true; sonarllm's concept transformer has no such biases")
    theta, scaling = _rope(llama)
    add_begin = values.get("add_begin", False)
    if not isinstance(add_begin, bool):
        raise CheckpointError(f"the official config's add_begin must be true or false, got {add_begin!r}")
    max_pos = llama["max_position_embeddings"]
    fields = dict(
        sonar_dim=values.get("embed_dim", 1024),
        model_dim=llama["hidden_size"],
        ffn_dim=llama["intermediate_size"],
        num_layers=llama["num_hidden_layers"],
        num_heads=heads,
        head_dim=llama["head_dim"],
        rms_norm_eps=llama["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=min(max_pos, MAX_SEQ_LEN_CAP) if isinstance(max_pos, int) else max_pos,
        init_std=llama["initializer_range"],
        add_begin=add_begin,
    )
    try:
        return SonarLLMConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the official config does not give a valid model: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Weights


def _numpy_globals() -> list:
    """What a release file's ``numpy_rng_state`` pickles (an ndarray), for weights-only loading."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    names = ["numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"]
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}
    return [np.ndarray, np.dtype, *dtypes, *((_reconstruct, n) for n in names)]


def read_official_state(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The wrapper's state dict from a release file or a Hugging Face weights file.

    The release file also holds optimizer, scheduler and RNG states (NumPy's included); they
    are read weights-only with NumPy arrays allowed, and dropped. ``trust=True`` unpickles
    anything (only for files you trust).
    """
    with torch.serialization.safe_globals(_numpy_globals()):
        obj = read_checkpoint_file(path, trust=trust)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a SONAR-LLM checkpoint: no 'model_state_dict' of tensors (non-tensor entries {bad[:6]})"
        )
    return state


def _ignored(key: str) -> bool:
    return key.startswith(_IGNORED_PREFIXES) or key.endswith((".inv_freq", ".original_inv_freq"))


def official_to_state(state: Mapping[str, torch.Tensor], config: SonarLLMConfig, source: str = "the checkpoint") -> dict:
    """Rename an official state dict to ours; raises CheckpointError naming unknown keys and a
    layer count that differs from the config. Ignored tensors are logged in one line."""
    ours, unknown, ignored, layers = {}, [], [], set()
    for key, value in state.items():
        if key.startswith("llama_model.") and not key.startswith(("llama_model.model.", "llama_model.lm_head.")):
            key = "llama_model.model." + key[len("llama_model."):]  # a bare LlamaModel backbone
        if _ignored(key):
            ignored.append(key)
        elif match := _LAYER_RE.match(key):
            layers.add(int(match[1]))
            ours[f"layers.{match[1]}.{match[2]}"] = value
        elif key == "llama_model.model.norm.weight":
            ours["norm.weight"] = value
        elif key.startswith(("forward_proj.linear.", "reverse_proj.linear.")):
            side, name = key.split(".linear.", 1)
            ours[f"{'input' if side == 'forward_proj' else 'output'}_proj.{name}"] = value
        else:
            unknown.append(key)
    if unknown:
        more = f" ... ({len(unknown)} in all)" if len(unknown) > 6 else ""
        raise CheckpointError(
            f"{source} has keys that are not part of a SONAR-LLM model: {sorted(unknown)[:6]}{more} (expected "
            "llama_model.model.layers.*, llama_model.model.norm.weight, forward_proj.linear.*, reverse_proj.linear.*, "
            "ignored: sonar_decoder.*, llama_model.model.embed_tokens.*, llama_model.lm_head.*)"
        )
    if layers and layers != set(range(config.num_layers)):
        raise CheckpointError(
            f"the config does not fit the weights of {source}: num_hidden_layers = {config.num_layers} but the weights "
            f"have layers {min(layers)}..{max(layers)} ({len(layers)} layers)"
        )
    if ignored:
        decoder = [k for k in ignored if k.startswith("sonar_decoder.")]
        others = sorted(k for k in ignored if not k.startswith("sonar_decoder."))
        parts = ([f"sonar_decoder.* ({len(decoder)} tensors)"] if decoder else []) + others
        logger.info("ignored %d tensors of %s that the concept transformer does not use: %s",
                    len(ignored), source, ", ".join(parts))  # fmt: skip
    return ours


def check_official_shapes(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming missing tensors and shape mismatches ("the config does not fit")."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {expected[k]} for the config"
             for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]  # fmt: skip
    if missing or wrong:
        parts = [f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else []
        parts += [f"shape mismatches {wrong[:4]}{' ...' if len(wrong) > 4 else ''}"] if wrong else []
        raise CheckpointError(f"the config does not fit the weights of {source}: " + "; ".join(parts))


def locate_official(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, the directory's config.json or None) of a release file or HF directory."""
    path = Path(path)
    if path.is_dir():
        config = path / HF_CONFIG_NAME
        weights = next((path / n for n in HF_WEIGHTS_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"{path} is not a SONAR-LLM Hugging Face directory: it has none of {list(HF_WEIGHTS_NAMES)}"
            )
        return weights, config if config.is_file() else None
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    return path, None
