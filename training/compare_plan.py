"""The comparison's command line and plan: which objectives, seeds, steps and learning-rate grids
(``--lr`` per objective), the pass-through ``--section.key value`` options for every run (the ones
compare sets itself refused, naming the option to use), the configuration file and ``--out``.
training/compare.py runs the plan.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from training.compare_runs import CompareError, run_config
from training.config import EXAMPLE_CORPUS, ConfigError, parse_cli
from training.held_out import EXAMPLE_TEST_SEED
from training.ownership import owned
from training.shards import ShardError, read_manifest

OBJECTIVES = ("sonar", "mse", "sonar+mse")
DEFAULT_OBJECTIVES = ("sonar", "mse")
DEFAULT_LR_GRID = (5e-4, 1e-3, 2e-3)
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
STAMP = ".compare"  # written first into --out: marks a directory compare may write into (resume)
OUTPUTS = ("results.md", "results.json", "per_seed.json", "compare.png", "test.jsonl",
           f"make_stories-seed{EXAMPLE_TEST_SEED}.jsonl.gz")  # the files compare (over)writes in --out  # fmt: skip


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


def _rates(grid: list[float]) -> str:
    return ",".join(f"{x:g}" for x in grid)
