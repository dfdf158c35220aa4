"""Atomic DeepSpeed checkpoints with exact resume, and the final inference export.

A checkpoint is written by every rank into ``checkpoints/.staging/<tag>/`` and only then moved
to ``checkpoints/<tag>/``; the pointer ``checkpoints/latest`` is replaced atomically last. A run
killed at any moment therefore leaves ``latest`` naming a complete checkpoint (the previous one
while a save is in flight); leftovers in ``.staging`` are removed by the next save. Older
checkpoints beyond ``keep`` are deleted after the pointer has moved.

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
    """Saves and finds checkpoints under ``<run_dir>/checkpoints``."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, *, rank: int = 0, local_rank: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.local_rank = keep, rank, local_rank

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it."""
        tag = f"step-{step:08d}"
        staging, final = self.root / STAGING, self.root / tag
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(staging), tag=tag, client_state=client_state | {"step": step}, save_latest=False)
        _barrier()
        if self.local_rank == 0 and (staging / tag).exists():  # one mover per node (also without a shared FS)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging / tag, final)
        _barrier()
        if self.rank == 0:
            tmp = self.root / (LATEST + ".tmp")
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / LATEST)
            for old in sorted(p for p in self.root.glob("step-*") if p.is_dir())[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

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
    """Write the trained model as an inference bundle (gathering ZeRO-3 shards first)."""
    from sonarllm.bundle import save_bundle

    module = engine.module
    params = list(module.parameters())
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_bundle(directory, module, spec)
    elif rank == 0:
        save_bundle(directory, module, spec)
    _barrier()
