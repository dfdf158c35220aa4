"""Will the concept transformer's training state fit? An estimate made at start-up, before the
model is built, so that a model too large for the machine is refused in one line naming its
size instead of ending in an allocator's traceback (or the kernel's OOM killer) minutes later.

The estimate is the ZeRO paper's model-state memory (Rajbhandari et al. 2020, §3.1): per
trainable parameter, its weight, its gradient and AdamW's states -- fp32: 4 + 4 + 8 bytes;
bf16/fp16: 2 + 2 + 12 bytes (the fp32 master weight and the two moments). ZeRO stage 1 shards
the optimizer states over the processes, stage 2 also the gradients, stage 3 also the weights.
Activations, the frozen SONAR decoder and the framework are left out, so the estimate is a lower
bound: what it refuses cannot train, while what it accepts may still run out of memory later
(train.py then reports the allocation failure in one line).

Available memory: on CUDA the free memory of the process's device (``torch.cuda.mem_get_info``);
on CPU the host's available memory (``psutil.virtual_memory().available``), shared by the
processes of the node, which each hold their own state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.config import ConfigError

BYTES_PER_PARAMETER = {  # (weight, gradient, optimizer state) per trainable parameter
    "fp32": (4, 4, 8),
    "bf16": (2, 2, 12),
    "fp16": (2, 2, 12),
}


def trainable_parameters(mcfg) -> int:
    """Trainable parameters of ``SonarLLM(mcfg)``, counted from its configuration (nothing is
    allocated): the E <-> D projections with their biases, per layer two RMSNorms, q/k/v/o and the
    SwiGLU block, and the final RMSNorm."""
    e, d, a, f = mcfg.sonar_dim, mcfg.model_dim, mcfg.num_heads * mcfg.head_dim, mcfg.ffn_dim
    per_layer = 2 * d + 4 * d * a + 3 * d * f
    return 2 * (e * d) + e + d + d + mcfg.num_layers * per_layer


@dataclass(frozen=True)
class Estimate:
    """Bytes of model state one process holds, and what it is made of."""

    parameters: int
    per_process: int
    how: str


def model_state_bytes(parameters: int, precision: str, zero_stage: int, world: int) -> Estimate:
    """Model-state bytes per process of ``parameters`` trainable parameters trained with AdamW in
    ``precision`` under ZeRO ``zero_stage`` over ``world`` processes."""
    weight, grad, optim = BYTES_PER_PARAMETER[precision]
    shards = (world if zero_stage >= 3 else 1, world if zero_stage >= 2 else 1, world if zero_stage >= 1 else 1)
    per_process = sum(-(-parameters * b // n) for b, n in zip((weight, grad, optim), shards, strict=True))
    sharded = [name for name, n in zip(("weights", "gradients", "optimizer states"), shards, strict=True) if n > 1]
    how = (f"{weight + grad + optim} bytes per parameter in {precision} (weight {weight}, gradient {grad}, "
           f"AdamW states {optim})" + (f", {' and '.join(sharded)} sharded over {world} processes by ZeRO stage "
                                       f"{zero_stage}" if sharded else ""))  # fmt: skip
    return Estimate(parameters, per_process, how)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes free for this process's model state, where) -- see the module docstring."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({torch.cuda.get_device_name(device)})"
    import psutil

    return psutil.virtual_memory().available, "available on this machine"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(mcfg, cfg, *, world: int, local_world: int, device: torch.device, available: int | None = None) -> Estimate:
    """ConfigError when the model state of this run cannot fit in memory (``available``: the
    measured free bytes, for tests). On CPU the node's ``local_world`` processes share the memory."""
    estimate = model_state_bytes(trainable_parameters(mcfg), cfg.system.precision, cfg.system.zero_stage, world)
    if available is None:
        available, where = available_bytes(device)
    else:
        where = "available"
    sharing = 1 if device.type == "cuda" else local_world
    needed = estimate.per_process * sharing
    if needed > available:
        who = f"{sharing} processes x {_gib(estimate.per_process)}" if sharing > 1 else "one process"
        overrides = f" with model.overrides {cfg.model.overrides}" if cfg.model.overrides else ""
        raise ConfigError(
            f"the model (model.preset {cfg.model.preset!r}{overrides}) has {estimate.parameters:,} trainable parameters; "
            f"training it needs at least {_gib(needed)} for weights, gradients and optimizer states ({who}; "
            f"{estimate.how}) but {_gib(available)} is {where}; choose a smaller model, or shard it over more "
            f"processes or devices with system.zero_stage 3"
        )
    return estimate
