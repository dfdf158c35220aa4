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

import json
import math
import os
import shlex
import time
from dataclasses import asdict

# the plan and the runs (compare.train etc. stay names of this module: tests replace them here)
from training.compare_plan import (  # noqa: F401
    MANAGED_KEYS,
    OUTPUTS,
    STAMP,
    Plan,
    _prepared,
    _rates,
    check_out,
    check_test_data,
    make_plan,
)
from training.compare_runs import (  # noqa: F401
    DIVERGED,
    DIVERGED_MESSAGE,
    IGNORED_KEYS,
    TRAIN_SCRIPT,
    CompareError,
    _diverged,
    check_run_dir,
    run_config,
    run_name,
    run_overrides,
    train,
    train_command,
    validation_curve,
)
from training.held_out import NoTestDocuments, held_out_documents

# ---------------------------------------------------------------------------------------------
# The learning rate each objective keeps


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
    from training.compare_report import (
        grid_edge_note,
        markdown,
        plot,
        summarize,
        table_metrics,
        write_text_atomic,
    )
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
