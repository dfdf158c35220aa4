"""The processes that prepare one directory together (``torchrun``), the shard plan they share,
and the per-shard records that let an interrupted preparation resume (``prepare.progress/``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch

from training.shards import (
    ShardError,
)


class Ranks:
    """The processes that prepare one directory together (``torchrun --nproc_per_node N``, over
    one or several nodes), or this process alone. Every collective step runs through ``run``, so
    that an error on one rank stops the others with a line naming it instead of leaving them
    waiting."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, group=None):
        self.rank, self.world, self.local_rank, self.group = rank, world, local_rank, group

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun describes in the environment (gloo: only flags travel between
        them, the shards go through the shared filesystem). Waits have no practical timeout:
        a rank may encode for hours before the others need it; a rank that dies ends the job."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(days=7))
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), dist.group.WORLD)

    def run(self, fn: Callable, *, rank0_only: bool = False):
        """``fn()`` on every rank (or rank 0 only), then agree: if any rank failed, every other
        one raises a ShardError naming it (the failing rank raises its own error)."""
        error, result = None, None
        if self.rank == 0 or not rank0_only:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others learnt of it
                error = exc
        if self.world > 1:
            import torch.distributed as dist

            failed = torch.tensor([0 if error is None else self.rank + 1])
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
            if error is None and failed.item():
                raise ShardError(f"rank {failed.item() - 1} failed (its error is in its output); rank {self.rank} stops too")
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class PlannedShard(NamedTuple):
    """One shard of the plan: documents ``[start, start + documents)`` of the corpus."""

    index: int
    name: str
    split: str
    start: int
    documents: int


def plan_shards(n_train: int, n_eval: int, shard_documents: int) -> list[PlannedShard]:
    """Training shards, then eval shards, each of ``shard_documents`` consecutive documents."""
    plan = []
    for split, first, total in (("train", 0, n_train), ("eval", n_train, n_eval)):
        for i, start in enumerate(range(0, total, shard_documents)):
            plan.append(PlannedShard(len(plan), f"{split}-{i:05d}.safetensors", split, first + start,
                                     min(shard_documents, total - start)))  # fmt: skip
    return plan


PROGRESS = "prepare.progress"
"""Directory of one record per shard written by an unfinished preparation (every rank writes
its own shards' records; rank 0 folds them into the manifest and removes the directory)."""


def _options_digest(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _progress_entries(out: Path, options: dict) -> dict[str, dict]:
    """The shard entries an unfinished preparation with these options recorded."""
    found, want = {}, _options_digest(options)
    folder = out / PROGRESS
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # half-written: the shard is verified or rebuilt like a missing one
        if isinstance(record, dict) and record.get("options_sha256") == want:
            found[record["entry"]["name"]] = record["entry"]
    return found
