"""The training loop of one run (``Trainer``): micro-batches through the concept transformer and
the frozen SONAR decoder's fused loss, optimizer steps, held-out evaluation, logging,
checkpoints, the NaN/inf stop and the final export. Its start-up checks are in
training/startup.py and its resume in training/resume.py; training/train.py is the entry point.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import ConfigError, TrainConfig
from training.resume import Resume
from training.shards import write_json_atomic
from training.startup import StartupChecks


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or parameters); the message says why."""


class Trainer(StartupChecks, Resume):
    """One training run (every rank builds one): start-up checks (training/startup.py), resume
    (training/resume.py), the loop and evaluation (here)."""

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

    # --- one optimizer step ---------------------------------------------------------------------

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
