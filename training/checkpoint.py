"""Atomic, verified DeepSpeed checkpoints with exact resume, and the final inference export.

A checkpoint is written by every rank into ``checkpoints/.staging/<tag>/``; the ranks then hash
its files (SHA-256, split between them) and global rank 0 writes ``checkpoint.json`` (step,
each file's digest and size, and what defines the run, training/identity.py) into it before it
is moved (the run directory must be on a filesystem all ranks share) to ``checkpoints/<tag>/``.
A run killed at any moment therefore leaves only complete checkpoints in ``checkpoints/``;
leftovers in ``.staging`` are removed by the next save, and by a save that fails (a full disk:
the error says so). Checkpoints are ordered by the step their ``checkpoint.json`` records (a
second save of a step, ``step-N-rK``, after the earlier ones), never by file times, which a copy
or a restore changes; the newest ``keep`` are kept. The pointer ``checkpoints/latest`` names the
newest for people and tools and is written last, but nothing depends on it: a checkpoint renamed
into place before the pointer moved (a kill, a full disk) is still the newest.

Resuming verifies a checkpoint's files against its ``checkpoint.json`` first and falls back to
the newest one that verifies; the ones that did not (corrupted, truncated or empty files) are
named and moved to ``checkpoints/rejected/``, out of the rotation, never deleted.

The client state stores the global step and the RNG states, so a resumed run continues with the
same data order and produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sonarllm.files import size_problem
from training.shards import sha256_file, write_json_atomic

LATEST = "latest"
CHECKPOINT_NAME = re.compile(r"step-(\d+)(?:-r(\d+))?")  # step-00000004, or its K-th re-save step-00000004-rK
STAGING = ".staging"
REJECTED = "rejected"
SUPERSEDED = "superseded"  # checkpoints of a later step than the one a run was explicitly resumed from
MANIFEST = "checkpoint.json"
# Why a checkpoint of an older sonarllm (before checksums) does not verify; resume.py resumes one
# only when run.resume names it.
NO_MANIFEST = f"it has no {MANIFEST} (incomplete, or written by an older sonarllm)"
FORMAT_VERSION = 1
_LOW_SPACE = 1 << 20  # bytes free below which a failed write is reported as a full disk


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, verified or loaded; the message names it."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order (collective)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Global rank 0's ``obj`` on every rank (collective)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_if_any(error: str | None) -> None:
    """Collective: every rank raises the first rank's error, so no rank waits on a failed one."""
    errors = [e for e in _gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def describe_io_error(exc: BaseException, where: Path) -> str:
    """Why reading or writing under ``where`` failed, in words; a full disk is called one (torch.save
    reports it as "unexpected pos ..." without an errno, so the free space decides)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"out of space on the filesystem of {where} ({exc.strerror})"
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    if free is not None and free < _LOW_SPACE:
        return f"out of space on the filesystem of {where} ({free} bytes free)"
    if isinstance(exc, OSError) and exc.strerror:
        named = exc.filename is not None and Path(exc.filename) != where
        return f"{exc.filename}: {exc.strerror}" if named else exc.strerror
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def read_only_problem(directory: Path) -> str | None:
    """Why no file can be created in an existing ``directory`` (named as read-only), or None
    (also when it does not exist). Probed by creating and removing a file: permission bits do not
    bind root, a read-only mount binds everyone."""
    if not directory.is_dir():
        return None
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".write-test-")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{directory} is read-only ({exc.strerror}); make it writable, or choose another run.output_dir"
        return None  # anything else is reported by the write that meets it
    os.close(fd)
    os.unlink(name)
    return None


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


def file_digests(directory: Path, names: list[str], *, rank: int, world: int) -> dict[str, dict]:
    """Collective: SHA-256 and size of each file (file i hashed by rank i % world); an
    unreadable file gets ``{"error": why}``."""
    mine = {}
    for i, name in enumerate(names):
        if i % world == rank:
            try:
                mine[name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            except OSError as exc:
                mine[name] = {"error": exc.strerror or str(exc)}
    return {name: entry for part in _gather(mine) for name, entry in part.items()}


def _damage(manifest: dict) -> str | None:
    """What is wrong with the structure of a checkpoint.json, or None."""
    files = manifest.get("files")
    if type(manifest.get("step")) is not int:
        return "no integer 'step'"
    if not isinstance(files, dict) or not files:
        return "no 'files' table"
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int):
            return f"no sha256 and size for {name}"
    if not isinstance(manifest.get("run", {}), dict):
        return "'run' is not a table"
    return None


class Checkpointer:
    """Saves, verifies and finds checkpoints under ``<run_dir>/checkpoints`` (a filesystem every
    rank shares: global rank 0 publishes what all ranks wrote). ``save``, ``verify``,
    ``newest_verified``, ``reject`` and ``load`` are collective: every rank calls them."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, *, rank: int = 0, world: int = 1):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.world = keep, rank, world

    @staticmethod
    def _order(path: Path) -> tuple[int, int]:
        """(step, re-save number) of a published checkpoint: the step its checkpoint.json records
        (the name's where that cannot be read), then K of a name ``step-N-rK``."""
        match = CHECKPOINT_NAME.fullmatch(path.name)
        step, resave = int(match[1]), int(match[2] or 0)
        try:
            recorded = json.loads((path / MANIFEST).read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            recorded = None
        return (recorded if type(recorded) is int else step), resave

    def _saved(self) -> list[Path]:
        """Published checkpoints, oldest first (by step, then re-save number)."""
        found = (p for p in self.root.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir())
        return sorted(found, key=self._order)

    def latest(self) -> Path | None:
        """The newest published checkpoint (not necessarily the one the ``latest`` pointer names,
        which a kill or a full disk can leave behind), or None."""
        saved = self._saved()
        return saved[-1] if saved else None

    def newer_than(self, step: int) -> list[Path]:
        """Published checkpoints of a later step than ``step``, oldest first."""
        return [p for p in self._saved() if self._order(p)[0] > step]

    def candidates(self) -> list[Path]:
        """Published checkpoints to resume from, best (newest) first."""
        return list(reversed(self._saved()))

    # --- writing -------------------------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict, identity: dict | None = None) -> Path:
        """Write, hash and publish a checkpoint. A published checkpoint is never replaced: a second
        save of the same step (after resuming from an older checkpoint) gets a new name. Raises
        CheckpointError (on every rank) if any rank cannot write; the staging directory is then
        removed and the published checkpoints are untouched."""
        tag, n = f"step-{step:08d}", 0
        while (self.root / tag).exists():
            n += 1
            tag = f"step-{step:08d}-r{n}"
        staging = self.root / STAGING
        folder = staging / tag
        failed = f"cannot write checkpoint {tag} in {self.root}"
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                error = f"{failed}: {read_only_problem(self.root) or describe_io_error(exc, self.root)}"
        _raise_if_any(error)
        try:
            try:
                engine.save_checkpoint(str(staging), tag=tag, client_state=client_state | {"step": step},
                                       save_latest=False)  # fmt: skip
            except (OSError, RuntimeError) as exc:
                error = f"{failed}: {describe_io_error(exc, staging)}"
            _raise_if_any(error)
            if self.rank == 0:  # DeepSpeed's recovery scripts (zero_to_fp32.py) land beside the tag: keep them in it
                for script in staging.glob("*.py"):
                    os.replace(script, folder / script.name)
            names = broadcast_object(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                               if self.rank == 0 else None)  # fmt: skip
            files = file_digests(folder, names, rank=self.rank, world=self.world)
            unreadable = [f"{name} ({entry['error']})" for name, entry in files.items() if "error" in entry]
            _raise_if_any(f"{failed}: cannot read back {', '.join(unreadable)}" if unreadable else None)
            if self.rank == 0:
                try:
                    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, "run": identity or {}}
                    write_json_atomic(folder / MANIFEST, manifest)
                    self._publish(folder, tag)
                except OSError as exc:
                    error = f"{failed}: {describe_io_error(exc, self.root)}"
            _raise_if_any(error)
        except CheckpointError as exc:
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)  # give the space back
            previous = next((p for p in reversed(self._saved()) if p.name != tag), None)
            kept = f"; the previous checkpoint {previous.name} is intact" if previous else ""
            raise CheckpointError(f"{exc}{kept}") from None
        if self.rank == 0:
            for old in self._saved()[: -self.keep]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return self.root / tag

    def _publish(self, folder: Path, tag: str) -> None:
        os.replace(folder, self.root / tag)
        tmp = self.root / (LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)

    # --- reading -------------------------------------------------------------------------------

    @staticmethod
    def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
        """(checkpoint.json, None), or (None, why the checkpoint is unusable) from its sizes alone."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None, NO_MANIFEST
        except (OSError, ValueError) as exc:
            return None, f"its {MANIFEST} is unreadable ({exc})"
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            return None, f"its {MANIFEST} has an unknown format"
        damage = _damage(manifest)
        if damage:
            return None, f"its {MANIFEST} is damaged ({damage})"
        for name, entry in sorted(manifest["files"].items()):
            problem = size_problem(path / name, name, entry)
            if problem:
                return None, problem
        return manifest, None

    def verify(self, path: str | os.PathLike) -> tuple[dict | None, str | None]:
        """(checkpoint.json, None) if every file of the checkpoint matches its digest, else
        (None, why not). Collective: the ranks share the hashing."""
        path = Path(path)
        manifest, reason = broadcast_object(self._read_manifest(path) if self.rank == 0 else None)
        if reason is not None:
            return None, reason
        names = sorted(manifest["files"])
        digests = file_digests(path, names, rank=self.rank, world=self.world)
        for name in names:
            if digests[name].get("sha256") != manifest["files"][name]["sha256"]:
                return None, f"{name} failed its checksum"
        return manifest, None

    def newest_verified(self) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
        """Collective: the best candidate that verifies and its checkpoint.json (or None, None),
        and the (path, reason) of each better one that did not."""
        rejected = []
        for path in broadcast_object(self.candidates() if self.rank == 0 else None):
            manifest, reason = self.verify(path)
            if reason is None:
                return path, manifest, rejected
            rejected.append((path, reason))
        return None, None, rejected

    def reject(self, path: Path, into: str = REJECTED) -> Path:
        """Collective: move a checkpoint that failed verification to ``checkpoints/rejected/``
        (or another folder ``into``), kept for inspection, out of the rotation; returns where it
        went. Moves nothing but a published checkpoint (a ``step-*`` folder directly in
        ``checkpoints/``)."""
        if path.parent != self.root or not CHECKPOINT_NAME.fullmatch(path.name) or not path.is_dir():
            raise CheckpointError(f"will not move {path} aside: it is not a checkpoint folder (step-*) of {self.root}")
        target = self.root / into / path.name
        n = 0
        while target.exists():
            n += 1
            target = self.root / into / f"{path.name}-{n}"
        target = broadcast_object(target)
        if self.rank == 0:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
        _barrier()
        return target

    @staticmethod
    def load(engine, path: str | os.PathLike) -> dict:
        """Restore model, optimizer, scheduler and RNG from a checkpoint; returns the client state."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        except Exception as exc:  # DeepSpeed's own errors, which can be anything: say which checkpoint
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise CheckpointError(f"cannot load checkpoint {path}: {message}") from exc
        if loaded is None or client is None or "step" not in client:
            raise CheckpointError(f"{path} is not a complete sonarllm checkpoint")
        if "rng" in client:
            set_rng_state(client["rng"])
        return client


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf on this rank (its partition under ZeRO-3)."""
    return [name for name, p in module.named_parameters()
            if not torch.isfinite(getattr(p, "ds_tensor", p)).all()]  # fmt: skip


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
