"""Compare training objectives on equal terms: the paper's SONAR-LLM objective vs the MSE-LCM.

    python -m training.compare [--objectives sonar,mse] [--seeds 3] [--steps 1000]
                               [--lr 5e-4,1e-3,2e-3] [--lr mse=5e-4,1e-3] [--out runs/compare]
                               [--test-data FILE] [--test-docs 100]
                               [--config FILE] [--section.key value ...]
    sonarllm compare ...                                                  # the same

Every run is training/train.py (DeepSpeed, one subprocess per run, its output in the run's
``train.log``) with the same configuration -- data, model size, batch, schedule, steps --
except ``model.objective``, ``run.seed`` and ``optim.lr``. Any ``--config`` / ``--section.key
value`` goes to every run (the embedded example by default).

1. Learning rate. The two losses have different scales and gradients, so one learning rate is
   not fair to both (the paper tuned each: 1e-3 for SONAR-LLM, 5e-4 for MSE-LCM). Each objective
   trains seed 0 at every rate of its grid (``--lr LIST`` for all objectives, ``--lr OBJ=LIST``
   for one); the rate with the lowest validation token cross-entropy at the last step wins (ties:
   the first listed). A single rate skips the sweep. A rate whose training loss diverges (NaN or
   infinite) loses the sweep; compare fails only when every rate of an objective diverges.
2. Seeds 0 .. N-1 train at the chosen rate (seed 0 is the sweep's run).
3. Metrics. The validation split is the trainer's held-out split (the last ``data.eval_documents``
   documents of the prepared data): every ``--eval-every`` steps the trainer logs their token
   cross-entropy through the frozen SONAR decoder (``eval_token_ce`` in metrics.jsonl), which is
   comparable across objectives (the MSE objective's own loss is not). The test split is
   separate: ``--test-data``, or for the embedded example, stories written by
   ``training/example/make_stories.py --seed 4242``. Test documents whose sentences tokenize
   exactly like a document of the prepared data (either split) are dropped and counted. Every
   final model of step 2 is evaluated on the first ``--test-docs`` remaining documents by
   ``sonarllm.evaluate`` (the paper's protocol with its default options; sweep runs that were
   not chosen never see the test split). The test documents are read before any training, and
   checked against the prepared data as soon as it exists.
4. Output in ``--out``: ``results.md`` and ``results.json`` (mean ± sample std over seeds, the
   sweep, the chosen rates), ``per_seed.json`` (every run's numbers), ``compare.png``
   (validation token cross-entropy vs step, per objective), ``test.jsonl`` (the test documents
   used) and ``runs/<objective>-lr<lr>-seed<seed>/`` (the trainer's run directories). A non-empty
   ``--out`` that no earlier comparison made (marked by the ``.compare`` file written first) is
   refused, and so is a ``--test-data`` that is one of these files.

Resumable: a finished run (its ``final/`` model exported) is reused, a half-finished one resumes
from its own checkpoints (the trainer's ``run.resume auto``), and a test evaluation of the same
model on the same documents with the same options is reused. A run directory trained with a
different configuration is refused, never overwritten. SIGINT/SIGTERM reach the running trainer,
which stops with a checkpoint; on Linux the trainer also gets SIGTERM if compare dies (even by
SIGKILL). Exit status 0; 2 for a bad command line or configuration (the trainer's refusals
included); 1 for a failed run; 130 when interrupted. Errors are reported in one line: a failed
run's is the trainer's own, which it also writes to a file compare names (torchrun's exit
status and closing lines would hide it).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repository's packages
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

from training.config import EXAMPLE_CORPUS, ConfigError, load_config, parse_cli
from training.held_out import EXAMPLE_TEST_SEED, NoTestDocuments, held_out_documents
from training.ownership import mark_run_dir, owned
from training.shards import ShardError, read_manifest

OBJECTIVES = ("sonar", "mse", "sonar+mse")
DEFAULT_OBJECTIVES = ("sonar", "mse")
DEFAULT_LR_GRID = (5e-4, 1e-3, 2e-3)
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
MANAGED_KEYS = {  # set by compare for every run, not accepted as pass-through options: the hint
    "run.output_dir": "use --out",
    "run.seed": "use --seeds",
    "run.resume": "compare resumes half-finished runs itself",
    "run.stop_after": "every run trains to --steps",
    "model.objective": "use --objectives",
    "optim.lr": "use --lr",
    "loop.max_steps": "use --steps",
    "loop.eval_every": "use --eval-every",
}
IGNORED_KEYS = ("run.output_dir", "run.resume", "run.stop_after", "system.progress")  # do not change what a run trains
DIVERGED = "diverged"  # in a sweep run's directory: its training loss diverged (the trainer's error)
DIVERGED_MESSAGE = "the training loss became"  # how training/train.py reports a non-finite loss
STAMP = ".compare"  # written first into --out: marks a directory compare may write into (resume)
OUTPUTS = ("results.md", "results.json", "per_seed.json", "compare.png", "test.jsonl",
           f"make_stories-seed{EXAMPLE_TEST_SEED}.jsonl.gz")  # the files compare (over)writes in --out  # fmt: skip


class CompareError(Exception):
    """A failure reported in one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _objectives(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(n in OBJECTIVES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct objectives from {', '.join(OBJECTIVES)}, comma-separated, got {text!r}")
    return names


def _lr_grid(text: str) -> tuple[str | None, list[float]]:
    """``LIST`` (every objective) or ``OBJECTIVE=LIST``; LIST = distinct rates > 0, comma-separated."""
    objective, eq, values = text.rpartition("=")
    if eq and objective not in OBJECTIVES:
        raise argparse.ArgumentTypeError(f"expected [OBJECTIVE=]LIST with OBJECTIVE one of {', '.join(OBJECTIVES)}, got {text!r}")
    grid = []
    for item in values.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected learning rates > 0, comma-separated, got {text!r}")
        grid.append(value)
    if len(set(grid)) != len(grid):
        raise argparse.ArgumentTypeError(f"a learning rate is listed twice in {text!r}")
    return objective or None, grid


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad command line in one line (exit status 2)."""
        raise CompareError(message, 2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other --section.key value (and --config FILE) goes to every training run: "
                                       "python training/train.py --help lists the keys.")  # fmt: skip
    p.add_argument("--objectives", type=_objectives, default=list(DEFAULT_OBJECTIVES),
                   help="comma-separated, from sonar, mse, sonar+mse (default: sonar,mse)")  # fmt: skip
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per objective, 0 .. N-1 (default: 3)")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps of every run (default: 1000)")
    p.add_argument("--lr", type=_lr_grid, action="append", default=[], metavar="[OBJ=]LIST",
                   help="learning-rate grid; OBJ= for one objective; repeatable "
                        f"(default: {_rates(DEFAULT_LR_GRID)} for each)")  # fmt: skip
    p.add_argument("--eval-every", type=_positive_int, default=None, help="steps between validation evaluations (default: steps/10)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p.add_argument("--test-data", default=None, metavar="PATH",
                   help="test documents: .txt, .jsonl (optionally .gz) or a folder of .txt; "
                        "default for the embedded example: make_stories.py --seed 4242")  # fmt: skip
    p.add_argument("--test-docs", type=_positive_int, default=100, help="test documents used (default: 100)")
    p.add_argument("--text-field", default="text", help="JSON field of a .jsonl test corpus (default: text)")
    p.add_argument("--eval-max-tokens", type=_positive_int, default=None,
                   help="most tokens per decoded sentence in the test evaluation (default: SONAR's)")  # fmt: skip
    p.add_argument("--nproc", type=_positive_int, default=1, help="training processes per run, via torchrun (default: 1)")
    p.add_argument("--device", default="auto", help="test evaluation device: auto, cpu, cuda, cuda:N (default: auto)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options vs the trainer's (``--config`` and ``--section.key value``); every option but
    --help takes one value, as ``--name value`` or ``--name=value``."""
    ours = {a.dest.replace("_", "-") for a in build_parser()._actions} - {"help"}
    mine, theirs, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            mine.append(arg)
            continue
        name, eq, _ = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        target = mine if name in ours else theirs
        target.append(arg)
        if name and not eq and args:
            target.append(args.pop(0))
    return mine, theirs


@dataclass
class Plan:
    """What to run: validated options plus the trainer's configuration file and overrides."""

    objectives: list[str]
    seeds: int
    steps: int
    grids: dict[str, list[float]]
    eval_every: int
    out: Path
    config: str | None
    overrides: dict[str, str]
    test_data: Path | None
    test_docs: int
    text_field: str
    eval_max_tokens: int | None
    nproc: int
    device: str


def make_plan(argv: list[str]) -> Plan:
    """Parse and validate the command line; CompareError (status 2) names a bad value."""
    mine, theirs = split_argv(argv)
    args = build_parser().parse_args(mine)
    try:
        config, overrides = parse_cli(theirs)
    except ConfigError as exc:
        raise CompareError(str(exc), 2) from None
    for key in overrides:
        if key in MANAGED_KEYS:
            raise CompareError(f"--{key} is set by compare for every run: {MANAGED_KEYS[key]}", 2)
    grids = {obj: list(DEFAULT_LR_GRID) for obj in args.objectives}
    for objective, grid in args.lr:
        if objective is not None and objective not in args.objectives:
            raise CompareError(f"--lr {objective}=...: {objective!r} is not in --objectives {','.join(args.objectives)}", 2)
        for obj in [objective] if objective else args.objectives:
            grids[obj] = grid
    for obj, grid in grids.items():  # run directories and report columns are named by f"{lr:g}"
        same = [(a, b) for i, a in enumerate(grid) for b in grid[i + 1 :] if f"{a:g}" == f"{b:g}"]
        if same:
            raise CompareError(f"--lr {obj}=...: {same[0][0]!r} and {same[0][1]!r} are the same to 6 significant digits "
                               f"({same[0][0]:g}), which names runs; list distinct rates", 2)  # fmt: skip
    eval_every = args.eval_every or max(1, args.steps // 10)
    if eval_every > args.steps:
        raise CompareError(f"--eval-every {eval_every} exceeds --steps {args.steps}", 2)
    from sonarllm.cli import resolve_device

    try:
        resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        message = str(exc)  # resolve_device names --device; torch.device does not
        raise CompareError(message if message.startswith("--device ") else f"--device {args.device}: {message}", 2) from None
    test_data = Path(args.test_data) if args.test_data else None
    if test_data is not None and not test_data.exists():
        raise CompareError(f"--test-data {test_data} not found", 2)
    check_out(Path(args.out), test_data)
    if test_data is not None:
        check_test_data(test_data, args.text_field)
    plan = Plan(args.objectives, args.seeds, args.steps, grids, eval_every, Path(args.out), config, overrides,
                test_data, args.test_docs, args.text_field, args.eval_max_tokens, args.nproc, args.device)  # fmt: skip
    cfg = run_config(plan, plan.objectives[0], grids[plan.objectives[0]][0], 0)  # validates the configuration
    if test_data is None and not _is_example(cfg):
        raise CompareError(f"--test-data is needed: the data ({cfg.data.source or cfg.data.prepared_dir}) is not "
                           "the embedded example, whose test stories compare can write", 2)  # fmt: skip
    return plan


def check_out(out: Path, test_data: Path | None) -> None:
    """Refuse an --out that compare would overwrite a user's files in: a --test-data that is one of
    the files compare writes there, or a non-empty directory that no earlier comparison made
    (no STAMP, nor the ``results.json`` of a comparison made before STAMP existed)."""
    if test_data is not None and test_data.resolve() in {(out / name).resolve() for name in OUTPUTS}:
        raise CompareError(f"--test-data {test_data} is a file compare writes in --out {out}; copy it elsewhere "
                           "or choose another --out", 2)  # fmt: skip
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is not a directory", 2)
    if not owned(out, STAMP, _earlier_comparison):
        raise CompareError(f"--out {out} is not empty and holds no earlier comparison (no {STAMP} file); "
                           "choose a new or empty directory", 2)  # fmt: skip


def _earlier_comparison(out: Path) -> bool:
    """An --out of a comparison made before STAMP existed: its results.json records the command."""
    try:
        return "command" in json.loads((out / "results.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_test_data(path: Path, text_field: str) -> None:
    """Read the test documents now, not after hours of training: CompareError (status 2) naming
    --text-field or --test-data when they cannot be read or there are none."""
    from sonarllm.corpus import read_documents

    try:
        count = sum(1 for _ in read_documents(path, text_field=text_field))
    except (ValueError, OSError) as exc:
        option = f"--text-field {text_field}" if f"field {text_field!r}" in str(exc) else f"--test-data {path}"
        raise CompareError(f"{option}: {' '.join(str(exc).split())}", 2) from None
    if count == 0:
        raise CompareError(f"--test-data {path} holds no documents", 2)


def _prepared(prepared: Path) -> bool:
    """Whether ``prepared`` holds a complete preparation (else the first run prepares it)."""
    try:
        return read_manifest(prepared).get("complete", False)
    except (ShardError, OSError, ValueError):
        return False


def _is_example(cfg) -> bool:
    """Whether the runs train on the embedded example stories."""
    manifest = Path(cfg.data.prepared_dir) / "manifest.json"
    source = cfg.data.source
    if not source and manifest.is_file():
        source = json.loads(manifest.read_text()).get("options", {}).get("source", "")
    return not source or Path(source).resolve() == Path(EXAMPLE_CORPUS).resolve()


# ---------------------------------------------------------------------------------------------
# Training runs


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


def _rates(grid: list[float]) -> str:
    return ",".join(f"{x:g}" for x in grid)


def choose_lr(grid: dict[float, float | None]) -> float:
    """The rate with the lowest validation cross-entropy (NaN/None count as +inf; ties: the first)."""
    def key(lr):
        value = grid[lr]
        return value if value is not None and math.isfinite(value) else math.inf

    return min(grid, key=key)


# ---------------------------------------------------------------------------------------------
# Test evaluation


def held_out(plan: Plan, prepared: Path) -> tuple[list[str], dict]:
    """held_out_documents of the plan; none left (all in the prepared data) is a bad --test-data."""
    try:
        return held_out_documents(plan.test_data, plan.out, plan.test_docs, prepared, text_field=plan.text_field)
    except NoTestDocuments as exc:
        raise CompareError(f"--test-data {plan.test_data or '(the example test stories)'}: {exc}", 2) from None


def evaluate_run(plan: Plan, record: dict, docs: list[str], test_info: dict, cfg) -> dict:
    """sonarllm.evaluate of a run's final model on the test documents (reused when the same model,
    documents and options were evaluated before); stored in the run's ``test_eval.json``."""
    from sonarllm.evaluate import EvalOptions
    from training.shards import sha256_file, write_json_atomic

    run_dir = Path(record["run_dir"])
    options = EvalOptions(max_documents=None, max_tokens=plan.eval_max_tokens, max_sentences=cfg.data.max_sentences,
                          duplicate_eos=cfg.data.duplicate_eos, lang=cfg.data.lang)  # fmt: skip
    key = {"model_sha256": sha256_file(run_dir / "final" / "model.safetensors"), "test_sha256": test_info["sha256"],
           "options": asdict(options)}  # fmt: skip
    path = run_dir / "test_eval.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in key} == key:
            return stored["results"]
    from sonarllm.bundle import load_bundle
    from sonarllm.cli import resolve_device
    from sonarllm.evaluate import evaluate

    bundle = load_bundle(run_dir / "final", device=resolve_device(plan.device), kernel_impl=cfg.model.kernel_impl)
    results = evaluate(bundle.model, bundle.pipeline, docs, options)
    write_json_atomic(path, key | {"results": results})
    return results


# ---------------------------------------------------------------------------------------------
# Main


def compare(plan: Plan, command: str) -> dict:
    """Train, select, evaluate and report (see the module docstring); returns results.json."""
    from training.compare_report import grid_edge_note, markdown, plot, summarize, table_metrics, write_text_atomic
    from training.shards import write_json_atomic

    t0 = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan.out / STAMP, f"{command}\n")  # before anything else: this --out is compare's
    total = sum(len(plan.grids[o]) + plan.seeds - 1 for o in plan.objectives)
    grids = "; ".join(f"{o}: lr {_rates(plan.grids[o])}" for o in plan.objectives)
    print(f"compare: {total} runs of {plan.steps} steps ({grids}; {plan.seeds} seeds) in {plan.out}", flush=True)
    cfg = run_config(plan, plan.objectives[0], plan.grids[plan.objectives[0]][0], 0)
    prepared = Path(cfg.data.prepared_dir)
    # the test documents as soon as the prepared data exists (the first run prepares it)
    test = held_out(plan, prepared) if _prepared(prepared) else None
    runs, sweeps, n = [], {}, 0
    for objective in plan.objectives:
        grid = plan.grids[objective]
        first = {}
        for lr in grid:
            n += 1
            first[lr] = train(plan, objective, lr, 0, "sweep", f"[{n}/{total}]")
            test = test or held_out(plan, prepared)
        sweeps[objective] = {lr: r["validation_token_ce"] for lr, r in first.items()}
        chosen = choose_lr(sweeps[objective])
        if all(r["status"] == "diverged" for r in first.values()):
            raise CompareError(f"{objective}: training diverged at every learning rate of --lr ({_rates(grid)}); "
                               "try smaller rates")  # fmt: skip
        if len(grid) > 1:
            print(f"compare: {objective}: lr {chosen:g} chosen by validation token CE", flush=True)
            note = grid_edge_note(objective, sweeps[objective], chosen)
            if note:
                print(f"compare: warning: {note}", flush=True)
        first[chosen]["role"] = "seed"
        runs += list(first.values())
        for seed in range(1, plan.seeds):
            n += 1
            runs.append(train(plan, objective, chosen, seed, "seed", f"[{n}/{total}]"))

    shared = cfg.to_dict()  # what every run has in common
    for key in MANAGED_KEYS:
        section, name = key.split(".")
        del shared[section][name]
    docs, test_info = test
    print(f"compare: evaluating on {len(docs)} test documents ({test_info['source']}; "
          f"{test_info['dropped_in_prepared_data']} dropped as present in the prepared data)", flush=True)  # fmt: skip
    for run in runs:
        if run["role"] == "seed":
            results = evaluate_run(plan, run, docs, test_info, run_config(plan, run["objective"], run["lr"], run["seed"]))
            run["test"] = table_metrics(results)
            run["test_results"] = results

    summary = summarize(runs)
    write_json_atomic(plan.out / "per_seed.json", runs)
    results = {"command": command, "steps": plan.steps, "seeds": list(range(plan.seeds)), "eval_every": plan.eval_every,
               "lr_grids": plan.grids, "chosen_lr": {o: s["lr"] for o, s in summary.items()},
               "sweep": {o: {f"{lr:g}": ce for lr, ce in g.items()} for o, g in sweeps.items()},
               "summary": summary, "test": test_info, "trainer_config": shared,
               "invocation_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json_atomic(plan.out / "results.json", results)
    table = markdown(summary, sweeps, command=command, test_info=test_info)
    write_text_atomic(plan.out / "results.md", table)
    plot(runs, plan.out / "compare.png")
    print("\n" + table, flush=True)
    print(f"compare: done in {results['invocation_seconds']:.0f} s: {plan.out / 'results.md'}, results.json, per_seed.json, compare.png")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python -m training.compare " + shlex.join(argv)
    try:
        plan = make_plan(argv)
        compare(plan, command.strip())
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except CompareError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError) as exc:
        if os.environ.get("SONARLLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"compare: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
