"""Which checkpoint a run resumes from, and resuming it (part of ``Trainer``, training/loop.py):
the newest checkpoint that verifies (corrupted ones moved to ``checkpoints/rejected/``), or the
one ``run.resume`` names (later ones moved to ``checkpoints/superseded/``); its run identity
compared with this run's (a change of process count or ZeRO stage converted through a universal
checkpoint, training/universal.py; anything else that differs refused in one line); changed
``optim.*`` settings applied from the resumed step on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.checkpoint import (
    CHECKPOINT_NAME,
    NO_MANIFEST,
    SUPERSEDED,
    CheckpointError,
    broadcast_object,
)
from training.config import ConfigError


class Resume:
    """``Trainer``'s resume (a mixin: it uses the trainer's ``cfg``, ``engine``, run directory and ranks)."""

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint run.resume asks for, verified and of this run (None: start fresh).
        With "auto", the newest one that verifies; those newer that do not are named and moved
        aside once a good one is found (if none verifies, nothing is moved and the run stops).
        A checkpoint of another number of processes or ZeRO stage (1-3) resumes through its
        universal conversion (returned instead, with self.load_universal set)."""
        from training.identity import compare
        from training.universal import UNIVERSAL, universal_changes, universal_checkpoint

        choice = self.cfg.run.resume
        if choice == "never":
            if self.ckpt.latest() is not None:
                raise ConfigError(
                    f"run.resume is 'never' but {self.run_dir} already holds checkpoints; choose another "
                    "run.output_dir or resume with run.resume auto"
                )
            return None
        if choice == "auto":
            path, manifest, rejected = self.ckpt.newest_verified()
            if path is None and rejected:
                reasons = "; ".join(f"{p.name}: {why}" for p, why in rejected)
                legacy = [p for p, why in rejected if why == NO_MANIFEST]
                hint = (f"; one written by an older sonarllm can be resumed unverified with run.resume {legacy[0]}"
                        if legacy else "")  # fmt: skip
                raise CheckpointError(
                    f"no checkpoint in {self.ckpt.root} verifies ({reasons}); to start fresh, move them away "
                    f"or choose another run.output_dir{hint}"
                )
        else:
            path, rejected = Path(choice), []
            if path.name == UNIVERSAL and CHECKPOINT_NAME.fullmatch(path.resolve().parent.name):
                raise ConfigError(
                    f"run.resume {path} is the universal conversion of a checkpoint; name the checkpoint itself "
                    f"({path.parent}): it is converted, or its conversion reused, when this run needs it"
                )
            if not any(path.glob("*mp_rank_*_model_states.pt")):
                raise ConfigError(
                    f"run.resume {path} is not a checkpoint (it holds no DeepSpeed *mp_rank_*_model_states.pt); "
                    f"name one of the step-* folders in {self.ckpt.root}, or use run.resume auto"
                )
            manifest, why = self.ckpt.verify(path)
            if why == NO_MANIFEST and path.is_dir():  # named by the user: a checkpoint from before checksums
                if self.rank == 0:
                    print(f"train.py: warning: {path} predates checksums and run records: resuming it unverified",
                          file=sys.stderr, flush=True)  # fmt: skip
                named = CHECKPOINT_NAME.fullmatch(path.name)
                if named:
                    self._set_aside_newer(int(named[1]))
                return path
            elif why is not None:
                raise CheckpointError(f"run.resume {path} cannot be used: {why}")
        if path is None:
            return None
        saved = manifest.get("run") or {}
        refused, allowed = compare(saved, self.identity, universal=self.cfg.run.resume_universal)
        if refused:
            raise ConfigError(
                f"cannot resume from {path}: this run differs from it in {'; '.join(refused)}; resume with the "
                "checkpoint's settings, or start fresh with another run.output_dir"
            )
        if allowed and self.rank == 0:
            print(f"train.py: note: resuming {path.name} with {'; '.join(allowed)}", file=sys.stderr, flush=True)
        changes = universal_changes(saved, self.identity) if self.cfg.run.resume_universal else []
        if changes:
            checkpoint = path
            path, notes = universal_checkpoint(self.ckpt, checkpoint, manifest)
            self.load_universal = True
            if self.rank == 0:
                print(f"train.py: note: resuming {checkpoint.name} with {' and '.join(changes)} through a DeepSpeed "
                      f"universal checkpoint (the optimizer state is split per process and laid out per ZeRO stage): "
                      f"{'; '.join(notes)}; the global batch and data order are unchanged", file=sys.stderr,
                      flush=True)  # fmt: skip
        for bad, why in rejected:
            moved = self.ckpt.reject(bad)
            if self.rank == 0:
                print(f"train.py: warning: checkpoint {bad.name} is unusable ({why}); moved it to {moved}",
                      file=sys.stderr, flush=True)  # fmt: skip
        if choice != "auto":
            self._set_aside_newer(manifest["step"])
        return path

    def _set_aside_newer(self, step: int) -> None:
        """Resuming explicitly from ``step`` starts a new line of this run: its checkpoints of later
        steps (the abandoned line) move to checkpoints/superseded/, kept, so that an automatic
        resume after a kill continues the new line and rotation never deletes its checkpoints in
        favour of the old ones."""
        for newer in broadcast_object(self.ckpt.newer_than(step) if self.rank == 0 else None):
            moved = self.ckpt.reject(newer, into=SUPERSEDED)
            if self.rank == 0:
                print(f"train.py: note: resuming from step {step}: the later checkpoint {newer.name} is moved "
                      f"to {moved}", file=sys.stderr, flush=True)  # fmt: skip

    def resume(self) -> int:
        """The step to start from (0, or the step after the checkpoint loaded)."""
        from training.checkpoint import Checkpointer

        path = self.resume_from
        client = {"step": 0} if path is None else Checkpointer.load(self.engine, path)
        if path is not None:
            self._apply_optimizer_settings()
        warning = self.metrics.truncate_after(client["step"])  # from 0: an earlier attempt that never checkpointed
        if warning:
            print(f"train.py: warning: {warning}", file=sys.stderr, flush=True)
        if path is None:
            return 0
        if self.rank == 0:
            print(f"resumed from {path} (step {client['step']})", flush=True)
        return client["step"]

    def _apply_optimizer_settings(self) -> None:
        """After loading a checkpoint (whose optimizer state restored its own hyperparameters):
        the configured optim.lr, beta1, beta2, eps and weight_decay apply from here on, as
        config.json says, each change noted in one line; the schedule continues from the
        checkpoint's step with the configured base lr (and warmup, min_lr_ratio, max_steps)."""
        optim, scheduler = self.cfg.optim, self.engine.lr_scheduler
        groups = scheduler.optimizer.param_groups
        had = {"lr": scheduler.base_lrs[0], "beta1": groups[0]["betas"][0], "beta2": groups[0]["betas"][1],
               "eps": groups[0]["eps"], "weight_decay": groups[0]["weight_decay"]}  # fmt: skip
        scheduler.base_lrs = [optim.lr] * len(groups)
        for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
            group.update(initial_lr=optim.lr, lr=optim.lr * factor(scheduler.last_epoch), betas=(optim.beta1, optim.beta2),
                         eps=optim.eps, weight_decay=optim.weight_decay)  # fmt: skip
        for name, was in had.items():
            now = getattr(optim, name)
            if now != was and self.rank == 0:
                print(f"train.py: note: resuming with optim.{name} {now:g} (checkpoint had {was:g})",
                      file=sys.stderr, flush=True)  # fmt: skip

