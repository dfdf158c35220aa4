"""The DeepSpeed engine around the concept transformer.

Only the concept transformer's trainable parameters go to ``deepspeed.initialize``; the frozen
SONAR decoder stays outside the engine (replicated on every rank, never sharded or re-gathered,
kernels.md §4). The optimizer is a client ``torch.optim.AdamW`` (no JIT-compiled DeepSpeed op);
the schedule is linear warmup then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.
The DeepSpeed JSON supplies ZeRO settings only: batch sizes, precision and clipping always come
from the training configuration, so no "auto" value is ever left for DeepSpeed to guess.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from training.config import ConfigError, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _find_auto(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _find_auto(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _find_auto(v, f"{path}[{i}]")
    elif obj == "auto":
        yield path


OBJECT_SECTIONS = (
    "zero_optimization", "zero_optimization.offload_optimizer", "zero_optimization.offload_param", "bf16", "fp16",
    "amp", "optimizer", "optimizer.params", "scheduler", "scheduler.params", "activation_checkpointing",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "aio", "checkpoint",
    "data_types", "data_efficiency", "compression_training", "autotuning", "elasticity", "nebula", "pipeline",
)  # fmt: skip
"""The DeepSpeed configuration's sections that DeepSpeed reads as JSON objects (dotted: nested)."""


def _check_shape(ds, template: Path) -> None:
    """A template DeepSpeed can read: a JSON object whose known sections are objects and whose
    ZeRO stage is an integer (DeepSpeed's own reading ends in an AttributeError otherwise)."""
    if not isinstance(ds, dict):
        raise ConfigError(f"system.deepspeed_config {template} must hold a JSON object ({{...}}), "
                          f"got a {type(ds).__name__}")  # fmt: skip
    for dotted in OBJECT_SECTIONS:
        parent, _, name = dotted.rpartition(".")
        holder = ds.get(parent) if parent else ds
        if isinstance(holder, dict) and name in holder and not isinstance(holder[name], dict):
            raise ConfigError(f"system.deepspeed_config {template}: \"{dotted}\" must be a JSON object ({{...}}), "
                              f"got {json.dumps(holder[name])}")  # fmt: skip
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"system.deepspeed_config {template}: \"zero_optimization.stage\" must be an integer, "
                          f"got {json.dumps(stage)}")  # fmt: skip


def load_ds_template(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON template of ``cfg`` (``system.deepspeed_config``, or the shipped one of
    its ZeRO stage), checked: readable, of DeepSpeed's shape, no "auto", the configured stage.
    ConfigError naming system.deepspeed_config otherwise (config validation calls this)."""
    template = Path(cfg.system.deepspeed_config or CONFIG_DIR / f"zero{cfg.system.zero_stage}.json")
    try:
        ds = json.loads(template.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"system.deepspeed_config: cannot read {template}: {exc}") from exc
    _check_shape(ds, template)
    autos = list(_find_auto(ds))
    if autos:
        raise ConfigError(f"system.deepspeed_config {template} leaves {', '.join(autos)} as \"auto\"; give numbers")
    if cfg.system.deepspeed_config:
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage != cfg.system.zero_stage:
            raise ConfigError(f"system.zero_stage is {cfg.system.zero_stage} but {template} sets stage {stage}")
    return ds


def build_ds_config(cfg: TrainConfig, world_size: int, *, load_universal: bool = False) -> dict:
    """The full DeepSpeed configuration: ZeRO settings from the JSON template, the rest from cfg.
    ``load_universal``: the checkpoint to load is a universal one (training/universal.py)."""
    ds = load_ds_template(cfg)
    ds.setdefault("zero_optimization", {})["stage"] = cfg.system.zero_stage
    loop = cfg.loop
    ds.update({
        "train_micro_batch_size_per_gpu": loop.micro_batch_documents,
        "gradient_accumulation_steps": loop.grad_accum_steps,
        "train_batch_size": loop.micro_batch_documents * loop.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.system.precision == "bf16"},
        "fp16": {"enabled": cfg.system.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })  # fmt: skip
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal  # the trainer decides, not the template
    return ds


def check_precision(precision: str) -> None:
    """Refuse a precision that DeepSpeed's accelerator does not support, at start-up and in one
    line, instead of DeepSpeed's traceback inside ``deepspeed.initialize`` (e.g. fp16 on a CPU
    without AVX512-FP16). Asks the accelerator what DeepSpeed's engine asks."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": bool(accelerator.is_bf16_supported()),
                 "fp16": bool(accelerator.is_fp16_supported())}  # fmt: skip
    if not supported[precision]:
        alternatives = " or ".join(p for p in ("bf16", "fp16", "fp32") if supported[p] and p != precision)
        raise ConfigError(
            f"system.precision {precision} is not supported by DeepSpeed's {accelerator.device_name()} accelerator "
            f"on this machine; use {alternatives}"
        )


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the base lr at optimizer step s (0-based): warmup, then cosine."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.loop.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int, *, load_universal: bool = False):
    """deepspeed.initialize with the trainable parameters, AdamW and the schedule; ``load_universal``:
    the engine will load a universal checkpoint."""
    config = build_ds_config(cfg, world_size, load_universal=load_universal)
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=params, config=config)  # fmt: skip
    return engine
