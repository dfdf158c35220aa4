"""One run of a comparison: its name, configuration and trainer command, the trainer started
in its own process (torchrun for ``--nproc`` > 1; it dies with compare, PR_SET_PDEATHSIG) with
its log, its status and error read back from the trainer's report (SONARLLM_TRAIN_REPORT), a
diverged training loss recorded instead of aborting the comparison (training/compare.py drives
the runs).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from training.config import ConfigError, load_config
from training.ownership import mark_run_dir

if TYPE_CHECKING:
    from training.compare import Plan


TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
IGNORED_KEYS = ("run.output_dir", "run.resume", "run.stop_after", "system.progress")  # do not change what a run trains
DIVERGED = "diverged"  # in a sweep run's directory: its training loss diverged (the trainer's error)
DIVERGED_MESSAGE = "the training loss became"  # how training/train.py reports a non-finite loss


class CompareError(Exception):
    """A failure reported in one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def run_name(objective: str, lr: float, seed: int) -> str:
    return f"{objective}-lr{lr:g}-seed{seed}"


def run_overrides(plan: Plan, objective: str, lr: float, seed: int) -> dict[str, str]:
    """The trainer's ``--section.key value`` pairs of one run."""
    return {"system.progress": "false"} | plan.overrides | {
        "run.output_dir": str(plan.out / "runs" / run_name(objective, lr, seed)), "run.seed": str(seed),
        "run.resume": "auto", "run.stop_after": "0", "model.objective": objective, "optim.lr": repr(lr),
        "loop.max_steps": str(plan.steps), "loop.eval_every": str(plan.eval_every),
    }  # fmt: skip


def run_config(plan: Plan, objective: str, lr: float, seed: int):
    """The validated TrainConfig of one run (ConfigError -> CompareError, status 2)."""
    try:
        return load_config(plan.config, run_overrides(plan, objective, lr, seed))
    except ConfigError as exc:
        raise CompareError(str(exc), 2) from None


def train_command(plan: Plan, overrides: dict[str, str]) -> list[str]:
    if plan.nproc == 1:
        cmd = [sys.executable, str(TRAIN_SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(plan.nproc), str(TRAIN_SCRIPT)]
    if plan.config:
        cmd += ["--config", plan.config]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    return cmd


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix and k == "overrides"):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(run_dir: Path, expected: dict) -> None:
    """Refuse a run directory whose recorded configuration differs from this run's."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    had, want = _flatten(json.loads(path.read_text())), _flatten(expected)
    changed = [k for k in sorted(set(had) | set(want)) if k not in IGNORED_KEYS and had.get(k) != want.get(k)]
    if changed:
        what = ", ".join(f"{k} {had.get(k)!r} != {want.get(k)!r}" for k in changed[:3])
        raise CompareError(f"{run_dir} was trained with a different configuration ({what}); choose another --out "
                           "or move that directory away", 2)  # fmt: skip


def validation_curve(run_dir: Path) -> list[list[float]]:
    """[step, validation token cross-entropy] pairs from the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [[r["step"], r["eval_token_ce"]] for r in records if "eval_token_ce" in r]


def _die_with_parent(parent: int):
    """A ``preexec_fn`` for the trainer: on Linux the kernel sends it SIGTERM when compare dies,
    even by SIGKILL (``PR_SET_PDEATHSIG``), so that no trainer goes on unattended (it stops with a
    checkpoint; torchrun passes the signal to its workers). Elsewhere: None (not available)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # compare died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _child(cmd: list[str], log_path: Path) -> tuple[int, bool, str | None]:
    """Run the trainer with its output appended to ``log_path``; SIGINT/SIGTERM received meanwhile
    are passed on (it then stops with a checkpoint). Returns (exit status, interrupted, the
    trainer's error line or None). The status and error are those the trainer reports through
    train.py's REPORT_ENV file, where it wrote one: torchrun's own exit status and closing lines
    hide them."""
    from training.train import REPORT_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    received = []
    with tempfile.TemporaryDirectory(prefix="sonarllm-compare-") as scratch, open(log_path, "a") as log:
        report = Path(scratch) / "report.json"
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env | {REPORT_ENV: str(report)},
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))  # fmt: skip

        def forward(signum, _frame):
            received.append(signum)
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            status = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        try:
            reported = json.loads(report.read_text())
            status, error = int(reported["status"]), str(reported["error"])
        except (OSError, ValueError, TypeError, KeyError):
            error = None  # no report (a crash, an older trainer): the exit status and the log tell
    return status, bool(received), error


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1]


def train(plan: Plan, objective: str, lr: float, seed: int, role: str, label: str) -> dict:
    """Train one run to the end (or reuse it); its record with the validation curve. A sweep run
    whose training loss diverged is recorded as such (validation token CE +inf, and a
    ``diverged`` file in its run directory, so a re-run does not train it again)."""
    cfg = run_config(plan, objective, lr, seed)
    run_dir = Path(cfg.run.output_dir)
    check_run_dir(run_dir, cfg.to_dict())
    name = run_name(objective, lr, seed)
    record = {"objective": objective, "lr": lr, "seed": seed, "role": role, "run_dir": str(run_dir)}
    if role == "sweep" and (run_dir / DIVERGED).is_file():
        return _diverged(record, run_dir, None, (run_dir / DIVERGED).read_text().strip(), label)
    if (run_dir / "final" / "sonar.json").is_file():
        record["status"], seconds = "reused", None
    else:
        record["status"] = "resumed" if (run_dir / "checkpoints").is_dir() else "trained"
        print(f"{label} {name}: training ({plan.steps} steps, log {run_dir / 'train.log'})", flush=True)
        mark_run_dir(run_dir)  # the trainer's marker, before train.log: the directory is the run's
        t0 = time.perf_counter()
        status, interrupted, error = _child(train_command(plan, run_overrides(plan, objective, lr, seed)),
                                            run_dir / "train.log")  # fmt: skip
        seconds = time.perf_counter() - t0
        if interrupted:
            raise CompareError(f"interrupted during {name}; run the same command again to resume", 130)
        error = error or _last_error(run_dir / "train.log")
        if status == 1 and role == "sweep" and DIVERGED_MESSAGE in error:
            from training.compare_report import write_text_atomic

            write_text_atomic(run_dir / DIVERGED, error + "\n")
            return _diverged(record, run_dir, seconds, error, label)
        if status != 0:
            raise CompareError(f"training {name} failed (exit status {status}): {error}", 2 if status == 2 else 1)
        if not (run_dir / "final" / "sonar.json").is_file():
            raise CompareError(f"training {name} stopped early without exporting final/ (log {run_dir / 'train.log'}); "
                               "run the same command again to resume it")  # fmt: skip
    curve = validation_curve(run_dir)
    final = dict(map(tuple, curve)).get(plan.steps)
    if final is None:
        raise CompareError(f"{run_dir / 'metrics.jsonl'} has no validation token cross-entropy (eval_token_ce) at "
                           f"step {plan.steps}; train it again in a new --out")  # fmt: skip
    record |= {"train_seconds": None if seconds is None else round(seconds, 1), "validation_token_ce": final,
               "validation_curve": curve}  # fmt: skip
    print(f"{label} {name}: {record['status']}{f' in {seconds:.0f} s' if seconds else ''}, "
          f"validation token CE {final:.4f}", flush=True)  # fmt: skip
    return record


def _diverged(record: dict, run_dir: Path, seconds: float | None, error: str, label: str) -> dict:
    """The record of a sweep run whose training loss diverged: it loses the sweep."""
    record |= {"status": "diverged", "train_seconds": None if seconds is None else round(seconds, 1),
               "validation_token_ce": math.inf, "validation_curve": validation_curve(run_dir), "error": error}  # fmt: skip
    print(f"{label} {run_dir.name}: diverged, left out of the sweep ({error})", flush=True)
    return record
