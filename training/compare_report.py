"""The report of ``training.compare``: statistics over seeds, the markdown table, the plot.

Pure functions of the per-run records ``compare`` collects (one dict per trained run, see
``training/compare.py``), so they can be tested without training anything.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

# (key in a run's "test" record, column title, digits): the test metrics of sonarllm.evaluate.
TEST_METRICS = (
    ("cross_entropy", "test token CE ↓", 4),
    ("cosine", "cosine ↑", 4),
    ("rouge_l_short", "ROUGE-L short ↑", 2),
    ("rouge_l_long", "ROUGE-L long ↑", 2),
    ("bleu_short", "BLEU short ↑", 2),
    ("bleu_long", "BLEU long ↑", 2),
)


def table_metrics(results: dict) -> dict:
    """The table's numbers from one ``sonarllm.evaluate.evaluate`` result."""
    out = {"cross_entropy": results["cross_entropy"], "cosine": results["cosine"]}
    for protocol in ("short", "long"):
        proto = results.get(protocol) or {}
        out[f"rouge_l_{protocol}"] = proto.get("rouge_l")
        out[f"bleu_{protocol}"] = proto.get("bleu")
    return out


def mean_std(values: list) -> dict:
    """Mean and sample standard deviation (n - 1) of the finite values; None where undefined."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
        "n": len(finite),
    }


def summarize(runs: list[dict]) -> dict:
    """Per objective: its learning rate, seeds, and mean/std of every metric over its seed runs
    (``runs`` with ``"role": "seed"``)."""
    summary = {}
    for run in runs:
        if run["role"] != "seed":
            continue
        entry = summary.setdefault(run["objective"], {"lr": run["lr"], "seeds": [], "runs": []})
        entry["seeds"].append(run["seed"])
        entry["runs"].append(run)
    for entry in summary.values():
        rows = entry.pop("runs")
        names = [k for k, _, _ in TEST_METRICS]
        entry["metrics"] = {k: mean_std([r["test"][k] for r in rows]) for k in names}
        entry["metrics"]["validation_token_ce"] = mean_std([r["validation_token_ce"] for r in rows])
    return summary


def _cell(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(summary: dict, sweeps: dict, *, command: str, test_info: dict) -> str:
    """The results table (mean ± sample std over seeds) and the learning-rate sweep."""
    head = ["objective", "lr", "seeds", *(title for _, title, _ in TEST_METRICS), "val token CE ↓"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Test: {test_info['documents']} held-out documents ({test_info['source']}); "
        "mean ± sample std over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for objective, entry in summary.items():
        cells = [_cell(entry["metrics"][k], d) for k, _, d in TEST_METRICS]
        cells.append(_cell(entry["metrics"]["validation_token_ce"], 4))
        seeds = ",".join(map(str, entry["seeds"]))
        lines.append(f"| {objective} | {entry['lr']:g} | {seeds} | " + " | ".join(cells) + " |")
    swept = {obj: grid for obj, grid in sweeps.items() if len(grid) > 1}
    if swept:
        rates = sorted({lr for grid in swept.values() for lr in grid})
        lines += ["", "Learning-rate sweep: validation token CE at the last step, seed 0 (**chosen**):", "",
                  "| objective | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]  # fmt: skip
        for obj, grid in swept.items():
            chosen = summary.get(obj, {}).get("lr")
            cells = ["" if lr not in grid else f"**{_sweep_cell(grid[lr])}**" if lr == chosen else _sweep_cell(grid[lr])
                     for lr in rates]  # fmt: skip
            lines.append(f"| {obj} | " + " | ".join(cells) + " |")
        lines += [f"\n{note}" for note in (grid_edge_note(obj, grid, summary.get(obj, {}).get("lr"))
                                            for obj, grid in swept.items()) if note]  # fmt: skip
    return "\n".join(lines) + "\n"


def grid_edge_note(objective: str, grid: dict, chosen: float | None) -> str | None:
    """A warning when the chosen rate is the smallest or largest of a swept grid: the optimum may
    lie beyond it, and the comparison is then not fair to that objective."""
    if chosen is None or len(grid) < 2 or chosen not in (min(grid), max(grid)):
        return None
    side, beyond = ("largest", "larger") if chosen == max(grid) else ("smallest", "smaller")
    return (f"Note: {objective}'s chosen lr {chosen:g} is the {side} of its grid; the best rate may be "
            f"{beyond}: extend --lr to bracket it.")


def _sweep_cell(ce: float) -> str:
    """A sweep run's validation token CE; +inf marks a run whose training diverged."""
    return "diverged" if ce == math.inf else f"{ce:.4f}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(runs: list[dict], path: Path) -> None:
    """Validation token cross-entropy vs step, per objective: the mean over seeds with a ± std
    band and each seed as a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    by_objective: dict[str, list[dict]] = {}
    for run in runs:
        if run["role"] == "seed":
            by_objective.setdefault(run["objective"], []).append(run)
    for color, (objective, rows) in zip(("C0", "C1", "C2", "C3"), by_objective.items(), strict=False):
        curves = [dict(r["validation_curve"]) for r in rows]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std([c[s] for c in curves]) for s in steps]
        mean = [s["mean"] for s in stats]
        std = [s["std"] or 0.0 for s in stats]
        for c in curves:
            ax.plot(sorted(c), [c[s] for s in sorted(c)], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, mean, "o-", color=color, markersize=3, label=f"{objective} (lr {rows[0]['lr']:g}, {len(rows)} seeds)")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                        color=color, alpha=0.2)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation token cross-entropy (nats)")
    ax.set_title("SONAR-LLM objective comparison")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
