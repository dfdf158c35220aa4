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

import os
import signal
import socket

import torch
import torch.distributed as dist

from training.checkpoint import CheckpointError, broadcast_object
from training.compile import check_compile
from training.config import ConfigError, TrainConfig, load_config, parse_cli
from training.loop import Trainer, TrainingError
from training.metrics import MetricsError
from training.runlock import RunLockedError
from training.shards import ShardError, write_json_atomic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """``python training/train.py``: a world of one, without MPI discovery."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


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
    from training.config import tomllib  # tomli before Python 3.11

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
    from training.checkpoint import describe_io_error, read_only_problem
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
