"""Train SONAR-LLM with DeepSpeed ZeRO: ``deepspeed training/train.py [--config FILE] [--section.key value ...]``.

The defaults run the embedded example end to end on one CPU: the example stories are prepared
once (sentences, toy SONAR embeddings and target tokens, ``data/example``), the ``toy`` concept
transformer trains through the frozen toy SONAR decoder, evaluates on held-out stories, writes
checkpoints, ``metrics.jsonl``, ``loss.png`` and the final model (``runs/example/final``), which
``sonarllm generate --model runs/example/final`` loads. With a real SONAR and corpus the same
command scales up through the configuration only (training/configs/*.toml).

Also runnable as ``torchrun --nproc_per_node N training/train.py`` or ``python training/train.py``.
On CPU it uses gloo, on CUDA NCCL. Each micro-batch's loss is its token sum divided by the
number of label tokens of the whole optimizer step over all ranks, so gradient accumulation and
data parallelism average exactly like one big batch. SIGINT/SIGTERM stop at the next step with
a checkpoint; a second signal (or one during the data preparation) interrupts at once, in one
line, exit status 130.

The trainer writes only into a new or empty output directory or one of its runs (marked by
``.sonarllm-run``, training/ownership.py), and holds an exclusive lock on it
(training/runlock.py). The SONAR files it uses are checked against the prepared manifest's
SHA-256 (``data.verify_sonar``). Resuming verifies the checkpoint's files and that it belongs to
the same run (training/identity.py); one written by another number of processes or ZeRO stage is
resumed through a DeepSpeed universal checkpoint conversion (training/universal.py); a training
loss or parameters that become NaN/inf stop the run without writing a checkpoint from that
state. Start-up refuses, before anything costly, a training split smaller than one optimizer
step, documents longer than the model's positions and a model whose state cannot fit in memory
(training/memory.py). Every error ends in one line (exit status 2 for a bad configuration, 1
otherwise), also written to the file SONARLLM_TRAIN_REPORT names, if set (for compare).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repository's packages, not training/'s files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import math
import os
import shlex
import signal
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from training.checkpoint import CHECKPOINT_NAME, NO_MANIFEST, SUPERSEDED, CheckpointError, broadcast_object
from training.compile import check_compile
from training.config import (
    EXAMPLE_CORPUS,
    ConfigError,
    DataConfig,
    TrainConfig,
    load_config,
    parse_cli,
)
from training.metrics import MetricsError
from training.runlock import RunLockedError
from training.shards import ShardError, write_json_atomic


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or parameters); the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """``python training/train.py``: a world of one, without MPI discovery."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _prepared_with(manifest: dict) -> dict:
    """The data.* settings a prepared directory was made with: from its manifest's options, and
    from the recorded command what the options record only as resolved (the SONAR as file
    digests, the evaluation documents as capped to the corpus)."""
    words = shlex.split(manifest.get("command") or "")
    asked = {flag: words[i + 1] for i, flag in enumerate(words[:-1]) if flag in ("--sonar", "--eval-documents")}
    options = manifest["options"]
    settings = {"data.lang": options["lang"], "data.max_sentences": options["max_sentences"],
                "data.eval_documents": int(asked.get("--eval-documents", options["eval_documents"]))}  # fmt: skip
    if "--sonar" in asked:
        settings["data.sonar"] = asked["--sonar"]
    return settings


def _same_setting(configured, prepared) -> bool:
    """Equal, or (data.sonar) paths naming the same file."""
    if configured == prepared:
        return True
    return isinstance(configured, str) and os.path.isfile(configured) and os.path.isfile(prepared) and \
        os.path.samefile(configured, prepared)


def changed_corpus_note(manifest: dict, prepared_dir) -> str | None:
    """A complete preparation is used as it is: if its corpus was edited since (its size or
    modification time differ from the manifest's record, and so does its content), the line
    that says so, rather than training silently on the old version; else None."""
    from training.prepare_data import corpus_digest, source_stat

    source, recorded = Path(manifest["options"].get("source", "")), manifest.get("source_stat")
    if recorded is None or not source.exists():
        return None
    if source_stat(source) == recorded or corpus_digest(source) == manifest["options"].get("source_sha256"):
        return None
    return (f"the corpus {source} changed after data.prepared_dir {prepared_dir} was prepared from it; training on "
            "the prepared data (prepare it again into a new data.prepared_dir to train on the new version)")


class Trainer:
    """One training run (every rank builds one)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, explicit: frozenset[str] = frozenset()):
        """``explicit``: the configuration keys the config file or the command line set."""
        from sonarllm.config import SonarLLMConfig
        from sonarllm.loss import SonarMSELoss, SonarTokenLoss
        from sonarllm.model import SonarLLM
        from sonarllm.mse_loss import NextSentenceMSELoss
        from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
        from training.checkpoint import Checkpointer
        from training.compile import compile_for_training, wanted
        from training.data import StepSchedule
        from training.engine import build_engine
        from training.identity import run_identity
        from training.memory import check_fits
        from training.metrics import MetricsLog

        self.cfg, self.device, self.explicit = cfg, device, explicit
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.run_dir = Path(cfg.run.output_dir)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.system.precision]
        prepared = self._ensure_prepared()
        self.spec = SonarSpec.load(prepared / "sonar.json")
        self.train_docs = self._open_split(prepared, "train")
        self.eval_docs = self._open_split(prepared, "eval")
        self._check_one_step_fits(prepared)

        pipe = SonarPipeline.from_spec(self.spec, encoder=False, device=device, kernel_impl=cfg.model.kernel_impl)
        self.eos_idx = pipe.tokenizer.eos_idx
        decoder = pipe.decoder.to(dtype=self.dtype)  # frozen, replicated, outside the engine
        max_target = self.train_docs.manifest["options"]["max_target_tokens"]
        if max_target > decoder.config.max_seq_len:
            raise ConfigError(
                f"data.prepared_dir {prepared} holds target sentences of up to {max_target} tokens but the SONAR "
                f"decoder has {decoder.config.max_seq_len} positions; prepare it again with "
                f"--max-target-tokens {decoder.config.max_seq_len}"
            )
        self.token_loss = SonarTokenLoss(decoder, pipe.tokenizer, duplicate_eos=cfg.data.duplicate_eos,
                                         kernel_impl=cfg.model.kernel_impl)  # fmt: skip

        mcfg = SonarLLMConfig.from_name(cfg.model.preset, **cfg.model.overrides)
        mcfg = mcfg.replace(objective=cfg.model.objective, kernel_impl=cfg.model.kernel_impl)
        if cfg.model.normalizer:
            mcfg = mcfg.replace(use_normalizer=True)
        for what, width in (("the prepared embeddings", self.train_docs.embedding_dim),
                            ("the SONAR decoder", decoder.config.model_dim)):  # fmt: skip
            if width != mcfg.sonar_dim:
                raise ConfigError(
                    f"model.preset {cfg.model.preset!r} works in {mcfg.sonar_dim}-d SONAR space but {what} "
                    f"is {width}-d; set model.overrides.sonar_dim or use the matching data.sonar"
                )
        self._check_documents_fit(prepared, mcfg)
        check_fits(mcfg, cfg, world=self.world, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device=device)
        self.identity = run_identity(cfg, self.train_docs.manifest["options"], mcfg.to_dict(), self.world)
        self.ckpt = Checkpointer(self.run_dir, cfg.loop.keep_checkpoints, rank=self.rank, world=self.world)
        self.load_universal = False  # set by _checkpoint_to_resume when it resumes a universal conversion
        self.resume_from = self._checkpoint_to_resume()  # before the costly part: a refusal comes quickly
        torch.manual_seed(cfg.run.seed)
        model = SonarLLM(mcfg)
        model.gradient_checkpointing = cfg.model.gradient_checkpointing
        if mcfg.use_normalizer:
            model.set_normalizer(self._normalizer(mcfg.sonar_dim))
        self.engine = build_engine(model, cfg, self.world, load_universal=self.load_universal)
        if wanted(cfg.system.compile, device):
            what = compile_for_training(self.engine.module, self.token_loss, cfg.system.zero_stage)
            if self.rank == 0:
                print(f"system.compile: compiling {what} at the first step", flush=True)
        self.mse_loss = NextSentenceMSELoss.for_model(self.engine.module) if "mse" in cfg.model.objective else None
        self.combined = SonarMSELoss(self.token_loss, self.mse_loss, cfg.model.mse_weight) if cfg.model.objective == "sonar+mse" else None
        self.schedule = StepSchedule(self.train_docs, micro=cfg.loop.micro_batch_documents, accum=cfg.loop.grad_accum_steps,
                                     world=self.world, seed=cfg.run.seed, duplicate_eos=cfg.data.duplicate_eos)  # fmt: skip
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0)
        self.stop_requested = False

    # --- set-up -------------------------------------------------------------------------------

    def _normalizer(self, dim: int):
        """The SONAR normalizer of a fresh run: model.normalizer's file when set (checked for its
        width and for clipping, which the fused projections cannot apply), else a robust fit on
        (up to) the first 2000 training documents (nothing is fitted at preparation)."""
        from sonarllm.normalizer import SonarNormalizer

        path = self.cfg.model.normalizer
        if not path:
            sample = torch.cat([self.train_docs[d].embeddings for d in range(min(len(self.train_docs), 2000))])
            return SonarNormalizer(dim).fit(sample.float())
        try:
            norm = SonarNormalizer.load(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.normalizer: {exc}") from None
        if norm.dim != dim:
            raise ConfigError(f"model.normalizer {path} is {norm.dim}-d but the model works in {dim}-d SONAR space")
        if norm.clips:
            raise ConfigError(f"model.normalizer {path} has clip_min/clip_max (LCM's clip_proba), which the model's "
                              f"fused projections do not apply; use a file without them")  # fmt: skip
        return norm

    def _ensure_prepared(self) -> Path:
        """Prepare the data once (global rank 0), unless a complete preparation is already there;
        then one process per node fetches the SONAR files and verifies the shards. The other
        ranks wait on a gloo group without the default 10-minute collective timeout: preparing a
        real corpus takes hours. (A failing rank 0 exits, which ends the others' wait.)"""
        from sonarllm.sonar.download import ASSETS, fetch
        from sonarllm.sonar.pipeline import SonarSpec
        from training import prepare_data
        from training.shards import MANIFEST, read_manifest, rebuild_command, verify_shards, verify_sonar

        wait = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        prepared = Path(self.cfg.data.prepared_dir)
        existing = read_manifest(prepared) if (prepared / MANIFEST).is_file() else {}
        complete = existing.get("complete", False)
        if complete:
            self._check_prepared_matches(existing)
        elif not self.cfg.data.source and os.path.normpath(prepared) != os.path.normpath(DataConfig.prepared_dir):
            # only the default directory is prepared from the embedded example: a mistyped path
            # must not silently train on it
            state = (f"an unfinished preparation (finish it with: {rebuild_command(existing, prepared)})" if existing
                     else f"no prepared data ({MANIFEST} missing)")  # fmt: skip
            raise ConfigError(
                f"data.prepared_dir {prepared} holds {state} and data.source is empty; set data.source to the "
                f"corpus to prepare there, or check the path"
            )
        if not complete and self.rank == 0:
            d = self.cfg.data
            args = prepare_data.parse_args([
                "--source", d.source or EXAMPLE_CORPUS, "--out", str(prepared), "--sonar", d.sonar, "--lang", d.lang,
                "--max-sentences", str(d.max_sentences), "--eval-documents", str(d.eval_documents),
                "--device", self.device.type,
            ] + ([] if self.cfg.system.progress else ["--quiet"]))  # fmt: skip
            try:
                prepare_data.prepare(args)
            except prepare_data.ForeignOutError as exc:
                raise ConfigError(f"data.prepared_dir {exc}") from None
            except (ValueError, OSError) as exc:
                raise ShardError(f"cannot prepare data.prepared_dir {prepared}: {exc}") from exc
        dist.barrier(group=wait)
        if self.local_rank == 0:
            spec = SonarSpec.load(prepared / "sonar.json")
            for name in (spec.tokenizer, spec.decoder):
                if name in ASSETS or "://" in name:
                    fetch(name)  # into this node's cache, once, before every rank loads it
            if self.cfg.data.verify_checksums:
                verify_shards(prepared)
            if self.cfg.data.verify_sonar:  # the files training uses (not the encoder)
                verify_sonar(prepared, fields=("tokenizer", "decoder"))
        if complete and self.rank == 0 and (note := changed_corpus_note(existing, prepared)):
            print(f"train.py: note: {note}", file=sys.stderr, flush=True)
        dist.barrier(group=wait)
        return prepared

    def _open_split(self, prepared: Path, split: str):
        """The documents of one split (verified in _ensure_prepared unless data.verify_checksums is
        false); a shard safetensors cannot open (truncated, overwritten) is named in one line."""
        from safetensors import SafetensorError, safe_open

        from training.shards import ShardedDocuments, read_manifest, rebuild_command

        try:
            return ShardedDocuments(prepared, split, verify=False)
        except SafetensorError as exc:
            manifest, bad, why = read_manifest(prepared), f"a {split} shard", exc
            for entry in (e for e in manifest["shards"] if e["split"] == split):
                try:
                    safe_open(str(prepared / entry["name"]), framework="pt")
                except SafetensorError as error:
                    bad, why = f"shard {entry['name']}", error
                    break
            raise ShardError(
                f"{bad} of data.prepared_dir {prepared} cannot be read ({why}); it is truncated or corrupted "
                f"(data.verify_checksums true checks every shard); rebuild it with: {rebuild_command(manifest, prepared)}"
            ) from None

    def _check_one_step_fits(self, prepared: Path) -> None:
        """The training split must hold one optimizer step's documents (the last incomplete step of
        an epoch is dropped): a ConfigError naming the loop keys, before anything costly."""
        loop = self.cfg.loop
        needed = loop.micro_batch_documents * loop.grad_accum_steps * self.world
        if len(self.train_docs) < needed:
            raise ConfigError(
                f"the training split of data.prepared_dir {prepared} has {len(self.train_docs)} documents, fewer than "
                f"one optimizer step takes: loop.micro_batch_documents {loop.micro_batch_documents} x "
                f"loop.grad_accum_steps {loop.grad_accum_steps} x {self.world} process(es) = {needed}; lower them, "
                "or prepare a larger corpus"
            )

    def _check_documents_fit(self, prepared: Path, mcfg) -> None:
        """Every prepared document (its sentences, end sentence included) must fit the model's
        positions: a ConfigError naming both settings and the fixes, instead of the first step's
        traceback. (Config validation checks data.max_sentences, but a complete preparation is
        used with the max_sentences it was made with.)"""
        longest = max(self.train_docs.longest_document(), self.eval_docs.longest_document())
        if longest > mcfg.max_seq_len:
            made_with = self.train_docs.manifest["options"]["max_sentences"]
            raise ConfigError(
                f"data.prepared_dir {prepared} holds documents of up to {longest} sentences (prepared with "
                f"data.max_sentences {made_with}, plus the end sentence) but the model has max_seq_len "
                f"{mcfg.max_seq_len} positions (model.preset {self.cfg.model.preset!r}); set "
                f"model.overrides.max_seq_len {longest}, or prepare the data again in another data.prepared_dir with "
                f"data.max_sentences {mcfg.max_seq_len - 1}"
            )

    def _check_prepared_matches(self, manifest: dict) -> None:
        """A complete preparation is used as it is: the data options the configuration sets (the
        config file or the command line, not the defaults) must be the ones it was prepared with,
        or the run is refused in one line naming the key."""
        options, prepared = manifest["options"], self.cfg.data.prepared_dir
        source = self.cfg.data.source
        if source and options.get("source") != str(Path(source).resolve()):
            raise ConfigError(
                f"data.prepared_dir {prepared} holds data prepared from {options.get('source')}, "
                f"not data.source {source}; choose another data.prepared_dir"
            )
        for key, value in _prepared_with(manifest).items():
            configured = getattr(self.cfg.data, key.partition(".")[2])
            if key in self.explicit and not _same_setting(configured, value):
                raise ConfigError(
                    f"{key} is {configured!r} but data.prepared_dir {prepared} was prepared with {value!r}; set "
                    f"{key} {value}, or choose another data.prepared_dir to prepare the data with {configured!r}"
                )

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

    # --- one optimizer step -----------------------------------------------------------------------

    def _loss(self, batch, labels, sentences) -> torch.Tensor:
        """The objective of one micro-batch, each mean over the step's global count (labels for
        the token cross-entropy, sentences for the MSE)."""
        pred_TE = self.engine(batch.embeds_TE, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        pred_NE = pred_TE[batch.pred_index_N]
        if self.combined is not None:
            return self.combined(pred_NE, batch.targets, batch.target_embeds_NE, num_tokens=labels, num_sentences=sentences)
        if self.mse_loss is not None:
            return self.mse_loss(pred_NE, batch.target_embeds_NE, num_items=sentences)
        return self.token_loss(pred_NE, batch.targets, num_items=labels)

    def _batch(self, doc_ids):
        from training.data import collate

        docs = [self.train_docs[d] if isinstance(d, int) else d for d in doc_ids]
        return collate(docs, eos_idx=self.eos_idx, duplicate_eos=self.cfg.data.duplicate_eos).to(self.device, self.dtype)

    def train_step(self, step: int) -> dict:
        self.engine.train()
        labels, sentences = self.schedule.step_counts(step)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in range(self.cfg.loop.grad_accum_steps):
            batch = self._batch(self.schedule.micro_documents(step, m, self.rank))
            loss = self._loss(batch, labels, sentences)
            # DeepSpeed averages gradients over ranks; the loss is already a global mean: undo it.
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self.engine.step()
            total += loss.detach().double()
        dist.all_reduce(total)
        return {"loss": total.item(), "tokens": labels, "sentences": sentences}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out objective (``eval_loss``) and token cross-entropy through the frozen decoder
        (``eval_token_ce``, the same number for the SONAR objective; comparable across objectives)
        over at most loop.eval_max_documents documents (all ranks)."""
        from training.data import collate

        self.engine.eval()
        n = min(len(self.eval_docs), self.cfg.loop.eval_max_documents)
        micro = self.cfg.loop.micro_batch_documents
        rounds = -(-n // (micro * self.world))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for k in range(rounds):  # the same number of forwards on every rank (ZeRO-3 gathers per forward)
            start = (k * self.world + self.rank) * micro
            ids = list(range(start, min(start + micro, n)))
            weight = 1.0 if ids else 0.0
            batch = collate([self.eval_docs[d] for d in (ids or [0])], eos_idx=self.eos_idx,
                            duplicate_eos=self.cfg.data.duplicate_eos).to(self.device, self.dtype)  # fmt: skip
            pred_NE = self.engine(batch.embeds_TE, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)[batch.pred_index_N]
            token_ce = self.token_loss(pred_NE, batch.targets, num_items=1).double().item()
            mse = 0.0 if self.mse_loss is None else self.mse_loss(pred_NE, batch.target_embeds_NE, num_items=1).double().item()
            sums += torch.tensor([mse, batch.pred_index_N.numel(), token_ce, batch.targets.num_tokens], device=self.device,
                                 dtype=torch.float64) * weight  # fmt: skip
        dist.all_reduce(sums)
        mse, token_ce = (sums[0] / sums[1]).item(), (sums[2] / sums[3]).item()
        loss = {"sonar": token_ce, "mse": mse, "sonar+mse": token_ce + self.cfg.model.mse_weight * mse}[self.cfg.model.objective]
        return {"eval_loss": loss, "eval_token_ce": token_ce}

    # --- the loop --------------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        """Checkpoint the state after ``step``, unless it is not finite (it would replace good
        checkpoints with a useless one)."""
        from training.checkpoint import nonfinite_parameters, rng_state

        bad = nonfinite_parameters(self.engine.module)
        flag = torch.tensor([float(len(bad))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise TrainingError(
                f"the model's parameters became NaN or inf by step {step} ({bad[0] if bad else 'on another process'}); "
                f"stopped without writing a checkpoint from this state, {self._kept()}"
            )
        self.ckpt.save(self.engine, step, {"rng": rng_state()}, self.identity)

    def _kept(self) -> str:
        latest = self.ckpt.latest()
        return f"the last checkpoint is {latest}" if latest else "no checkpoint was written"

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _warm_up_kernels(self) -> None:
        """CUDA: compile the run's Triton kernel variants in parallel before the first step."""
        from training.warmup import warm_up_run

        summary = warm_up_run(self.engine.module.config, self.token_loss.decoder.config, self.dtype, self.device,
                              documents=self.cfg.loop.micro_batch_documents, sentences=self.cfg.data.max_sentences,
                              local_rank=self.local_rank)  # fmt: skip
        if summary is not None and self.rank == 0:
            print(f"kernels: {summary['variants']} variants compiled in {summary['seconds']:.1f} s", flush=True)

    def _log_first_step(self, step: int) -> None:
        """Seconds from process start to the end of this invocation's first step (all kernels
        compiled) and the peak memory then, in metrics.jsonl and on the console."""
        import psutil

        record = {"step": step, "first_step_s": round(time.time() - psutil.Process().create_time(), 2)}
        if self.device.type == "cuda":
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.metrics.write(record)
        if self.rank == 0:
            print(f"first step done {record['first_step_s']:.1f} s after start", flush=True)

    def _log_window(self, step: int, window: list, t0: float) -> None:
        """One metrics record for the steps in ``window`` ((step output, seconds) pairs) ending at
        ``step``: mean loss, the last lr, throughput."""
        secs = sum(w[1] for w in window)
        self.metrics.write({
            "step": step, "loss": sum(w[0]["loss"] for w in window) / len(window),
            "lr": window[-1][0]["lr"], "tokens_per_s": sum(w[0]["tokens"] for w in window) / secs,
            "sentences_per_s": sum(w[0]["sentences"] for w in window) / secs,
            "elapsed_s": time.perf_counter() - t0,
        })  # fmt: skip

    def run(self) -> int:
        from tqdm.auto import tqdm

        from training.checkpoint import export_model

        loop = self.cfg.loop
        start = self.resume()
        if self.rank == 0:  # only now: a refused resume leaves the run's record of its settings as it was
            write_json_atomic(self.run_dir / "config.json", self.cfg.to_dict())

        def request_stop(signum, _frame):
            self.stop_requested = True  # stop with a checkpoint at the end of this step
            signal.signal(signum, signal.default_int_handler)  # a second signal interrupts at once

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)
        bar = tqdm(total=loop.max_steps, initial=start, disable=self.rank != 0 or not self.cfg.system.progress,
                   desc="train", unit="step", dynamic_ncols=True)  # fmt: skip
        step, last_saved, window = start, start, []
        self._warm_up_kernels()
        t0 = time.perf_counter()
        while step < loop.max_steps:
            tic = time.perf_counter()
            lr = self.engine.get_lr()[0]
            out = self.train_step(step) | {"lr": lr}
            step += 1
            if not math.isfinite(out["loss"]):
                if window:  # the trend up to the failure: the unlogged finite steps
                    self._log_window(step - 1, window, t0)
                raise TrainingError(
                    f"the training loss became {out['loss']} at step {step}; stopped without writing a checkpoint "
                    f"from this state, {self._kept()}"
                )
            if step == start + 1:
                self._log_first_step(step)
            dt = time.perf_counter() - tic
            window.append((out, dt))
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{out['tokens'] / dt:.0f}")
            if step % loop.log_every == 0 or step == loop.max_steps:
                self._log_window(step, window, t0)
                window = []
            if step % loop.eval_every == 0 or step == loop.max_steps:
                evals = self.evaluate()
                self.metrics.write({"step": step, **evals})
                self.metrics.plot()
                if self.rank == 0:
                    bar.write(f"step {step}: train loss {out['loss']:.4f}, eval loss {evals['eval_loss']:.4f}")
            if step % loop.checkpoint_every == 0:
                self._save(step)
                last_saved = step
            if self.cfg.run.stop_after and step - start >= self.cfg.run.stop_after:
                break
            if self._should_stop():
                break
        bar.close()
        if step != last_saved:
            self._save(step)
        if step >= loop.max_steps:
            export_model(self.engine, self.run_dir / "final", self.spec, rank=self.rank)
            if self.rank == 0:
                print(f"done: {step} steps in {time.perf_counter() - t0:.0f}s; model in {self.run_dir / 'final'}; "
                      f"metrics in {self.metrics.path}", flush=True)  # fmt: skip
            return 0
        if self.rank == 0:
            print(f"stopped at step {step}; checkpoint saved in {self.ckpt.root}", flush=True)
        return 130 if self.stop_requested else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from training.config import known_keys

        print("configuration keys:\n  " + "\n  ".join(known_keys()))
        return 0
    try:
        path, overrides = parse_cli(argv)
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        return _fail(exc, 2)
    use_cuda = cfg.system.device == "cuda" or (cfg.system.device == "auto" and torch.cuda.is_available())
    if cfg.system.device == "cuda" and not torch.cuda.is_available():
        print("train.py: error: system.device is 'cuda' but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        check_compile(cfg.system.compile, torch.device("cuda" if use_cuda else "cpu"))
    except ConfigError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _single_process_env()
    import deepspeed

    from training.engine import check_precision

    try:
        check_precision(cfg.system.precision)  # before the distributed start-up: a refusal comes at once
    except ConfigError as exc:
        return _fail(exc, 2)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Processes sharing the CPU must share its cores: oversubscribed OpenMP threads spin and
        # slow every process down by an order of magnitude.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    from training.checkpoint import describe_io_error
    from training.runlock import RunLock

    lock = RunLock(cfg.run.output_dir)
    try:
        _lock_run(cfg, lock)
        return Trainer(cfg, device, explicit=_set_keys(path, overrides)).run()
    except ConfigError as exc:
        return _fail(exc, 2)
    except (ShardError, CheckpointError, RunLockedError, TrainingError, MetricsError) as exc:
        return _fail(exc, 1)
    except OSError as exc:
        return _fail(describe_io_error(exc, Path(cfg.run.output_dir)), 1)
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM (the first stops at the end of the step), or one in preparation
        return _fail(f"interrupted; {_last_checkpoint(Path(cfg.run.output_dir))}", 130)
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        return _fail(f"out of memory: {_first_line(exc)}; the model state, activations (loop.micro_batch_documents) "
                     "or the frozen SONAR decoder do not fit: choose a smaller model or batch, or more processes with "
                     "system.zero_stage 3", 1)  # fmt: skip
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # during shutdown a signal ends the process at once, silently
            signal.signal(sig, signal.SIG_DFL)
        lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _set_keys(path: str | None, overrides: dict[str, str]) -> frozenset[str]:
    """The configuration keys the config file (already read once by load_config) and the command
    line set, as opposed to defaults."""
    import tomllib

    keys = set(overrides)
    if path:
        keys |= {f"{section}.{name}" for section, entries in tomllib.loads(Path(path).read_text()).items()
                 for name in entries}  # fmt: skip
    return frozenset(keys)


REPORT_ENV = "SONARLLM_TRAIN_REPORT"
"""If set, the path where a failing trainer (global rank 0) writes {"status", "error"} as JSON:
what a caller (training/compare.py) reads when a launcher (torchrun) hides the exit status and
ends the output with its own lines."""


def _fail(error, code: int) -> int:
    """Report an error in one line (once, by global rank 0, when every rank fails alike), and in
    the file REPORT_ENV names."""
    line = " ".join(str(error).split())
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"train.py: error: {line}", file=sys.stderr, flush=True)
        if os.environ.get(REPORT_ENV):
            try:
                write_json_atomic(Path(os.environ[REPORT_ENV]), {"status": code, "error": f"train.py: error: {line}"})
            except OSError:
                pass  # the caller falls back to the output's last error line
    return code


def _last_checkpoint(run_dir: Path) -> str:
    """Where an interrupted run can resume from, in words."""
    from training.checkpoint import Checkpointer

    try:
        latest = Checkpointer(run_dir, 1).latest()
    except (OSError, ValueError, CheckpointError):
        latest = None
    return f"the last checkpoint is {latest}" if latest else "no checkpoint was written"


def _out_of_memory(exc: RuntimeError) -> bool:
    """An allocation failure: torch's OutOfMemoryError (CUDA) or a CPU allocator's RuntimeError."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _lock_run(cfg: TrainConfig, lock) -> None:
    """Global rank 0 checks that the output directory is new, empty or a run's (else ConfigError,
    untouched: training/ownership.py), marks it, locks it and checks that its checkpoints/ can be
    written; every rank raises if it cannot."""
    from training.checkpoint import broadcast_object, describe_io_error, read_only_problem
    from training.ownership import check_run_dir, mark_run_dir
    from training.runlock import describe_holder

    out = Path(cfg.run.output_dir)
    error, refused = None, None
    if dist.get_rank() == 0:
        try:
            check_run_dir(out)  # before anything is written: a directory that is not a run is left untouched
            mark_run_dir(out)
            stale = lock.acquire()
            if stale:
                print(f"train.py: note: {out} was locked by a run that ended without releasing it "
                      f"({describe_holder(stale)}); taking it over", file=sys.stderr, flush=True)  # fmt: skip
            error = read_only_problem(out / "checkpoints")
        except ValueError as exc:
            refused = str(exc)
        except RunLockedError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot use run.output_dir {out}: {describe_io_error(exc, out)}"
    error, refused = broadcast_object((error, refused))
    if refused:
        raise ConfigError(refused)
    if error:
        raise RunLockedError(error)


if __name__ == "__main__":
    sys.exit(main())
