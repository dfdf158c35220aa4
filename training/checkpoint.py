"""Atomic DeepSpeed checkpoints with exact resume, and the final inference export.

A checkpoint is written by every rank into ``checkpoints/.staging/<tag>/`` and only then moved
(by global rank 0; the run directory must be on a filesystem all ranks share) to
``checkpoints/<tag>/``; the pointer ``checkpoints/latest`` is replaced atomically last. A run
killed at any moment therefore leaves ``latest`` naming a complete checkpoint (the previous one
while a save is in flight); leftovers in ``.staging`` are removed by the next save. Older
checkpoints beyond ``keep`` are deleted after the pointer has moved, never the one it names.

The client state stores the global step and the RNG states, so a resumed run continues with the
same data order and produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
STAGING = ".staging"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints under ``<run_dir>/checkpoints`` (a filesystem every rank shares:
    global rank 0 publishes what all ranks wrote)."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, *, rank: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank = keep, rank

    def _saved(self) -> list[Path]:
        """Published checkpoints, oldest first (by the time they were published)."""
        return sorted((p for p in self.root.glob("step-*") if p.is_dir()), key=lambda p: p.stat().st_mtime_ns)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if it is missing, the newest published one; else None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        saved = self._saved()
        return saved[-1] if saved else None

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. A directory ``latest`` names is never replaced or
        deleted: a second save of the same step (after resuming from an older checkpoint) gets a
        new name."""
        tag, n = f"step-{step:08d}", 0
        while (self.root / tag).exists():
            n += 1
            tag = f"step-{step:08d}-r{n}"
        staging = self.root / STAGING
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(staging), tag=tag, client_state=client_state | {"step": step}, save_latest=False)
        _barrier()
        if self.rank == 0:
            final = self.root / tag
            os.replace(staging / tag, final)
            os.utime(final)  # publication time orders the rotation
            tmp = self.root / (LATEST + ".tmp")
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / LATEST)
            for old in self._saved()[: -self.keep]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return self.root / tag

    @staticmethod
    def load(engine, path: str | os.PathLike) -> dict:
        """Restore model, optimizer, scheduler and RNG from a checkpoint; returns the client state."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None or client is None or "step" not in client:
            raise ValueError(f"{path} is not a complete sonarllm checkpoint")
        if "rng" in client:
            set_rng_state(client["rng"])
        return client


def export_model(engine, directory: str | os.PathLike, spec, *, rank: int) -> None:
    """Collective: write the trained model as a float32 inference bundle.

    The weights are DeepSpeed's float32 master copies (gathered from every rank under ZeRO),
    not the bf16/fp16 working copies of a mixed-precision run.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from sonarllm.bundle import save_bundle
    from sonarllm.model import SonarLLM

    module = engine.module
    state = {}
    for name, param in module.named_parameters():  # the same order on every rank (ZeRO-3 gathers)
        full = safe_get_full_fp32_param(param)
        state[name] = (param.detach() if full is None else full).float().cpu()
    if rank == 0:
        buffers = {k: v.float().cpu() for k, v in module.state_dict().items() if k not in state}
        model = SonarLLM(module.config)
        model.load_state_dict(state | buffers)
        save_bundle(directory, model, spec)
    _barrier()
