"""What defines a training run: recorded in every checkpoint, compared when a run resumes.

A resumed run must continue the same run: the same data (the prepared manifest's options: the
corpus digest, the SONAR tokenizer/encoder/decoder identity, the sentence and token limits), the
same model, objective and label convention, the same data order (seed and global batch), and an
optimizer state DeepSpeed can load (the same precision). The data order depends on the global
batch alone, so the number of processes may change with it kept: freely under ZeRO stage 0 in
fp32, where every process holds the whole optimizer state, and between ZeRO stages 1-3 (where
DeepSpeed splits it per process) through a universal checkpoint conversion (training/universal.py),
which also lets the ZeRO stage change. Everything else (max_steps, evaluation, logging, checkpoint cadence,
kernels, the device) may change between invocations.
"""

from __future__ import annotations

from training.config import TrainConfig

PROCESSES = "processes"
ZERO_STAGE = "system.zero_stage"


def run_identity(cfg: TrainConfig, data_options: dict, model_config: dict, world: int) -> dict:
    """The identity of a run (JSON-serialisable). ``data_options`` is the prepared manifest's
    ``options``; ``model_config`` the concept transformer's ``SonarLLMConfig.to_dict()``."""
    loop = cfg.loop
    return {
        "data": {k: v for k, v in data_options.items() if k not in ("source", "shard_documents")},
        # kernel_impl and add_begin (a generation-time prefix) do not change what is trained
        "model": {k: v for k, v in model_config.items() if k not in ("kernel_impl", "objective", "add_begin")},
        "model.objective": cfg.model.objective,
        **({"model.mse_weight": cfg.model.mse_weight} if cfg.model.objective == "sonar+mse" else {}),
        "data.duplicate_eos": cfg.data.duplicate_eos,
        "run.seed": cfg.run.seed,
        "global batch": loop.micro_batch_documents * loop.grad_accum_steps * world,
        ZERO_STAGE: cfg.system.zero_stage,
        "system.precision": cfg.system.precision,
        PROCESSES: world,
    }


def _changed(was: dict, now: dict) -> list[str]:
    return sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))


def _unpartitioned(identity: dict) -> bool:
    """Whether every process holds the whole optimizer state (ZeRO stage 0 in fp32)."""
    return identity.get(ZERO_STAGE) == 0 and identity.get("system.precision") == "fp32"


def compare(saved: dict, current: dict, *, universal: bool = False) -> tuple[list[str], list[str]]:
    """(what forbids resuming a checkpoint of identity ``saved`` in a run of identity
    ``current``, what differs but is resumed correctly), in words. ``universal``: whether a
    universal checkpoint conversion may resolve a change of the number of processes or of the ZeRO
    stage (then neither is listed: training/universal.py says what it converts)."""
    from training.universal import universal_changes

    convertible = bool(universal_changes(saved, current))
    hint = " (run.resume_universal true would convert it through a DeepSpeed universal checkpoint)"
    refused, allowed = [], []
    for key, now in current.items():
        was = saved.get(key)
        if was == now:
            continue
        if key == "data":
            refused.append(f"the prepared data ({', '.join(_changed(was or {}, now))} differ)")
        elif key == "model":
            changes = ", ".join(f"{k} {(was or {}).get(k)!r} -> {now.get(k)!r}" for k in _changed(was or {}, now))
            refused.append(f"the model ({changes})")
        elif key == "global batch":
            refused.append(f"the global batch (loop.micro_batch_documents x loop.grad_accum_steps x processes) {was} -> {now}")
        elif key == PROCESSES and _unpartitioned(saved) and _unpartitioned(current):
            allowed.append(f"the number of processes {was} -> {now} (ZeRO stage 0: every process holds the whole "
                           "optimizer state; the global batch and data order are unchanged)")  # fmt: skip
        elif key in (PROCESSES, ZERO_STAGE) and convertible and universal:
            continue
        elif key == PROCESSES and convertible:
            refused.append(f"the number of processes {was} -> {now}{hint}")
        elif key == PROCESSES:
            refused.append(f"the number of processes {was} -> {now} (DeepSpeed splits the optimizer state per process "
                           "except under ZeRO stage 0 in fp32, and converts it to another number of processes only "
                           "between ZeRO stages 1-3)")  # fmt: skip
        elif key == ZERO_STAGE and convertible:
            refused.append(f"{key} {was!r} -> {now!r}{hint}")
        elif key == ZERO_STAGE:
            refused.append(f"{key} {was!r} -> {now!r} (DeepSpeed converts the optimizer state only between ZeRO "
                           "stages 1-3)")  # fmt: skip
        else:
            refused.append(f"{key} {was!r} -> {now!r}")
    return refused, allowed
