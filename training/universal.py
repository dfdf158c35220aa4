"""Resume a checkpoint on another number of processes or another ZeRO stage, through DeepSpeed's
Universal Checkpointing.

A ZeRO (stage 1-3) checkpoint holds the optimizer state (fp32 master weights, Adam moments) split
per process and laid out for its ZeRO stage, so DeepSpeed cannot load it on another process count
or stage directly. ``deepspeed.checkpoint.ds_to_universal`` rewrites it as one file per parameter
and state (``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``), which any process count and ZeRO
stage 1-3 load with ``checkpoint.load_universal`` in the DeepSpeed configuration.

The conversion of ``checkpoints/step-N`` is written to ``checkpoints/step-N/universal/`` (global
rank 0 converts into the staging directory, hashes the files into the conversion's own
``checkpoint.json`` and renames it into place; the checkpoint's own files are not touched). It is
kept, rotated and moved aside together with its checkpoint, verified like a checkpoint, and reused
by a later resume; one that does not verify, or that was made from other files than the
checkpoint now holds, is moved to ``checkpoints/rejected/`` and made again.

ZeRO stage 0 has no ZeRO optimizer state to convert, and DeepSpeed 0.19.8 does not load a
universal checkpoint into stage 0 (its engine then restores neither the weights nor the
optimizer), so stage 0 takes part only as before: in fp32 the process count may change freely.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from datetime import timedelta
from pathlib import Path

from training.checkpoint import MANIFEST, REJECTED, STAGING, CheckpointError, broadcast_object
from training.identity import PROCESSES, ZERO_STAGE
from training.shards import sha256_file, write_json_atomic

UNIVERSAL = "universal"
CONVERTIBLE_STAGES = (1, 2, 3)
LOG = "conversion.log"
LAYOUT = 1  # of what _stage_agnostic writes; a conversion of another layout (or DeepSpeed) is made again
# What each ZeRO stage's engine reads first from a universal checkpoint: stage 3 the model state
# of data-parallel rank 0 under its ZeRO-3 name, stages 1-2 the plain one (engine._get_ckpt_name).
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def universal_changes(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's run identity ``saved`` and this run's ``current``
    that a universal conversion resolves (the number of processes, the ZeRO stage), in words;
    empty when nothing does, or when a side is not ZeRO stage 1-3."""
    was, now = saved.get(ZERO_STAGE), current.get(ZERO_STAGE)
    if was not in CONVERTIBLE_STAGES or now not in CONVERTIBLE_STAGES:
        return []
    changes = []
    if saved.get(PROCESSES) != current.get(PROCESSES):
        changes.append(f"the number of processes {saved.get(PROCESSES)} -> {current.get(PROCESSES)}")
    if was != now:
        changes.append(f"ZeRO stage {was} -> {now}")
    return changes


def _source_digest(checkpoint: Path) -> str:
    """The SHA-256 of the checkpoint's checkpoint.json (which holds every file's digest): names
    exactly the files a conversion was made from."""
    return sha256_file(checkpoint / MANIFEST)


def _run_ds_to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's converter, in this process (one worker: no process pool beside the
    distributed one), its console output kept in ``out/conversion.log``.

    ``inject_missing_state``: DeepSpeed's engine records ``universal_checkpoint_info`` only for
    Megatron-style models; ours needs no tensor-parallel merge rules, only the version it injects.
    """
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fmt: skip
    out.mkdir(parents=True)
    with open(out / LOG, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ds_to_universal.main(args)
    _stage_agnostic(out)
    for name in MODEL_STATES:  # readable by every ZeRO stage, whichever wrote the checkpoint
        if not (out / name).exists():
            source = next(out / other for other in MODEL_STATES if (out / other).exists())
            shutil.copyfile(source, out / name)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer, beside `out`


def _stage_agnostic(out: Path) -> None:
    """Make a conversion loadable by every ZeRO stage 1-3, whichever stage wrote the checkpoint.

    DeepSpeed 0.19.8 writes ``zero/optimizer_state.pt`` in the layout of the source stage and
    each stage's loader reads only its own: stage 3 reads the Adam step from
    ``optimizer_state_dict.state[0]`` and the hyperparameters from its ``param_groups``; stages 1-2
    read ``param_groups`` and ``ds_version`` at the top and each parameter's ``step.pt``, which a
    stage-3 conversion does not write (Adam would restart its bias correction), and expect each
    state as ``{"param": tensor}`` in the parameter's shape, where a stage-3 conversion saves a flat
    tensor. Both layouts are written here; the rank-0 partitions a stage-3 conversion copies into
    the file are dropped (the per-parameter files hold the full tensors)."""
    import deepspeed
    import torch
    from deepspeed.checkpoint.constants import PARAM

    path = out / "zero" / "optimizer_state.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    nested = state.get("optimizer_state_dict")
    params = [d for d in sorted((out / "zero").iterdir()) if d.is_dir()]
    if nested is not None:  # written from a stage-3 checkpoint
        step = nested["state"][0]["step"]
        shapes = _stage3_param_shapes(out)
        for folder in params:
            if not (folder / "step.pt").exists():
                torch.save(step, folder / "step.pt")
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                if not (folder / f"{key}.pt").exists():
                    continue
                saved = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)
                if torch.is_tensor(saved):
                    torch.save({PARAM: saved.reshape(shapes[folder.name])}, folder / f"{key}.pt")
    else:
        first = next(d / "step.pt" for d in params if (d / "step.pt").exists())  # a parameter with optimizer state
        step = torch.load(first, map_location="cpu", weights_only=False)
    common = {k: v for k, v in state.items() if k not in ("optimizer_state_dict", "fp32_flat_groups")}
    common.setdefault("ds_version", deepspeed.__version__)
    common["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(common, tmp)
    os.replace(tmp, path)


def _stage3_param_shapes(out: Path) -> dict:
    """Each parameter's shape, from the model state of a stage-3 checkpoint's rank 0."""
    import torch

    states = torch.load(out / MODEL_STATES[1], map_location="cpu", weights_only=False)
    return {name: shape for group in states["param_shapes"] for name, shape in group.items()}


def _provenance(checkpoint: Path) -> dict:
    """What a conversion was made from and by: the checkpoint's checkpoint.json (which holds
    every file's digest), DeepSpeed's version and the layout version of _stage_agnostic."""
    import deepspeed

    return {"source_checkpoint_json_sha256": _source_digest(checkpoint), "deepspeed": deepspeed.__version__,
            "layout": LAYOUT}  # fmt: skip


def _write_manifest(out: Path, checkpoint: Path, manifest: dict) -> None:
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size} for name in names}
    write_json_atomic(out / MANIFEST, {
        "format_version": manifest["format_version"], "step": manifest["step"], "files": files,
        "run": manifest.get("run") or {},
        "universal": _provenance(checkpoint),
    })  # fmt: skip


def _convert(ckpt, checkpoint: Path, manifest: dict) -> str | None:
    """Global rank 0: convert ``checkpoint`` into ``checkpoint/universal``; None, or why not."""
    staging = ckpt.root / STAGING / f"{checkpoint.name}-{UNIVERSAL}"
    out = staging / UNIVERSAL
    try:
        shutil.rmtree(staging, ignore_errors=True)
        _run_ds_to_universal(checkpoint, out)
        _write_manifest(out, checkpoint, manifest)
        os.replace(out, checkpoint / UNIVERSAL)
        shutil.rmtree(staging, ignore_errors=True)
    except Exception as exc:  # DeepSpeed's converter raises anything (AssertionError, FileNotFoundError, ...)
        shutil.rmtree(staging, ignore_errors=True)
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _usable(ckpt, converted: Path, checkpoint: Path) -> str | None:
    """Collective: None if an existing conversion verifies and was made from the checkpoint's
    present files, else why not."""
    manifest, why = ckpt.verify(converted)
    if why is not None:
        return why
    made = manifest.get("universal") or {}
    wanted = broadcast_object(_provenance(checkpoint) if ckpt.rank == 0 else None)
    if made.get("source_checkpoint_json_sha256") != wanted["source_checkpoint_json_sha256"]:
        return f"it was made from other files than {checkpoint.name} now holds"
    if made != wanted:
        return (f"it was made by DeepSpeed {made.get('deepspeed')} in layout {made.get('layout')}, not "
                f"{wanted['deepspeed']} in layout {LAYOUT}")
    return None


def _set_aside(ckpt, converted: Path) -> Path:
    """Global rank 0: move a stale or damaged conversion to checkpoints/rejected/ (kept)."""
    target, n = ckpt.root / REJECTED / f"{converted.parent.name}-{UNIVERSAL}", 0
    while target.exists():
        n += 1
        target = ckpt.root / REJECTED / f"{converted.parent.name}-{UNIVERSAL}-{n}"
    target.parent.mkdir(exist_ok=True)
    os.replace(converted, target)
    return target


def _on_rank0(rank: int, work):
    """Collective: ``work()`` on global rank 0, its result on every rank. The others wait on a
    gloo group without the default collective timeout: converting a large checkpoint can take
    longer than that."""
    import torch.distributed as dist

    several = dist.is_initialized() and dist.get_world_size() > 1
    wait = dist.new_group(backend="gloo", timeout=timedelta(days=1)) if several else None  # all ranks, first
    result = work() if rank == 0 else None
    if several:
        dist.barrier(group=wait)
    return broadcast_object(result)


def universal_checkpoint(ckpt, checkpoint: Path, manifest: dict) -> tuple[Path, list[str]]:
    """Collective: the universal conversion of a verified checkpoint (``manifest``: its
    checkpoint.json), made now or reused; and what happened, in words, for the console.
    Raises CheckpointError (on every rank) if DeepSpeed cannot convert it."""
    converted = checkpoint / UNIVERSAL
    notes = []
    exists = broadcast_object(converted.is_dir() if ckpt.rank == 0 else None)
    if exists:
        why = _usable(ckpt, converted, checkpoint)
        if why is None:
            return converted, [f"its conversion {checkpoint.name}/{UNIVERSAL}, made earlier, verified"]
        moved = broadcast_object(_set_aside(ckpt, converted) if ckpt.rank == 0 else None)
        notes.append(f"its earlier conversion is unusable ({why}; moved to {moved})")
    error = _on_rank0(ckpt.rank, lambda: _convert(ckpt, checkpoint, manifest))
    if error is not None:
        raise CheckpointError(f"cannot convert checkpoint {checkpoint} to a DeepSpeed universal checkpoint: {error}")
    manifest, why = ckpt.verify(converted)
    if why is not None:
        raise CheckpointError(f"the universal conversion {converted} does not read back: {why}")
    notes.append(f"converted now into {checkpoint.name}/{UNIVERSAL}")
    return converted, notes

