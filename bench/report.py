"""Print benchmark results as one markdown table: median time, ratio to the fastest provider of its
group, peak memory, and each benchmark's headline rate (tokens/s, sentences/s, TFLOP/s, MFU,
GB/s) from its extra_info; then what the measurements imply for the ``auto`` dispatch rules of
attention and the embedding projection on CUDA.

    pytest bench --benchmark --benchmark-json=out.json && python -m bench.report out.json [more ...]
    pytest bench --benchmark --bench-jsonl out.jsonl && python -m bench.report out.jsonl

Reads pytest-benchmark JSON files and ``--bench-jsonl`` files (one result, or one skipped
benchmark with its reason, per line).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

RATES = (  # extra_info key, column text
    ("target_tokens_per_s", "tok/s"),
    ("sentences_per_s", "sent/s"),
    ("tflop_per_s", "TFLOP/s"),
    ("mfu", "MFU"),
    ("gb_per_s", "GB/s"),
)


def _rates(extra: dict) -> str:
    parts = []
    for key, text in RATES:
        if key in extra:
            value = extra[key]
            parts.append(f"{100 * value:.1f}% {text}" if key == "mfu" else f"{value:,} {text}")
    return ", ".join(parts)


def format_table(data: dict) -> str:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    lines = ["| group | benchmark | median ms | x fastest | peak MiB | rate |", "|---|---|---|---|---|---|"]
    for group, items in groups.items():
        best = min(b["stats"]["median"] for b in items)
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            extra = b.get("extra_info", {})
            mem = extra.get("peak_mem_mb", "")
            lines.append(f"| {group} | {b['name']} | {med * 1e3:.2f} | {med / best:.2f} | {mem} | {_rates(extra)} |")
    return "\n".join(lines)


def load(paths: list[str]) -> tuple[dict, list[dict], list[str]]:
    """(merged {"benchmarks": [...]}, skipped [{"name", "skipped"}], one note per file)."""
    merged, skipped, notes = {"benchmarks": []}, [], []
    for path in paths:
        try:
            with open(path) as f:
                if path.endswith(".jsonl"):
                    records = [json.loads(line) for line in f if line.strip()]
                    data = {"benchmarks": [r for r in records if "stats" in r]}
                    skipped += [r for r in records if "skipped" in r]
                else:
                    data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{path}: skipped ({exc})")
            continue
        merged["benchmarks"] += data["benchmarks"]
        info = data.get("machine_info", {})
        extra = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
        notes.append(f"{path}: {info.get('cpu', {}).get('brand_raw', extra.get('device', '?'))}; device "
                     f"{extra.get('device', '?')}; torch {extra.get('torch', '?')}; triton {extra.get('triton', '?')}")  # fmt: skip
    return merged, skipped, notes


# ---------------------------------------------------------------------------------------------
# What the measurements imply for the auto rules (sonarllm_kernels/attention/__init__.py, embedding_projection/__init__.py)

_ATTENTION_KIND = {"concept": "dense", "packed": "varlen", "decode": "decode"}
PROJECTION_GOAL = 1.1  # Triton must beat nn.Linear + elementwise by this much to be picked


def _by_group(benchmarks: list[dict], prefix: str) -> dict[str, dict[str, float]]:
    """group -> provider -> median seconds, for CUDA groups starting with ``prefix``."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for b in benchmarks:
        if b["group"].startswith(prefix) and "-cuda-" in b["group"]:
            out[b["group"]][b.get("params", {}).get("provider", b["name"])] = b["stats"]["median"]
    return out


def dispatch_proposals(benchmarks: list[dict]) -> list[str]:
    """One line per rule entry: the current rule, what the CUDA measurements pick, and why."""
    from sonarllm_kernels.attention import AUTO_CUDA_PATHS as ATTENTION_RULE
    from sonarllm_kernels.embedding_projection import AUTO_CUDA_PATHS as PROJECTION_RULE

    lines = []
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    fastest_sdpa: dict[str, tuple[str, float]] = {}
    for group, times in _by_group(benchmarks, "attention-").items():
        kind = _ATTENTION_KIND[group.split("-")[1]]
        if "triton" in times and "torch" in times:
            for path in ("triton", "torch"):
                totals[kind][path] += times[path]
        sdpa = {p: t for p, t in times.items() if p.startswith("sdpa_")}
        if sdpa:
            name = min(sdpa, key=sdpa.get)
            fastest_sdpa[group] = (name, sdpa[name])
    for kind, t in totals.items():
        pick = "triton" if t["triton"] <= t["torch"] else "torch"
        change = "keep" if pick == ATTENTION_RULE[kind] else "CHANGE"
        lines.append(f"attention {kind}: {ATTENTION_RULE[kind]} -> {pick} ({change}; summed medians over its "
                     f"benchmarks: triton {t['triton'] * 1e3:.2f} ms, torch/SDPA {t['torch'] * 1e3:.2f} ms)")  # fmt: skip
    for group, (name, t) in sorted(fastest_sdpa.items()):
        lines.append(f"  {group}: fastest SDPA backend {name} {t * 1e3:.3f} ms")
    ratios: dict[str, list[float]] = defaultdict(list)
    for group, times in _by_group(benchmarks, "fep-").items():
        if {"triton", "torch", "reference"} <= times.keys():
            mode = group.split("-")[1]
            ratios[mode].append(min(times["reference"], times["torch"]) / times["triton"])
    for mode, rs in ratios.items():
        worst = min(rs)
        pick = "triton" if worst >= PROJECTION_GOAL else "torch"
        change = "keep" if pick == PROJECTION_RULE[mode] else "CHANGE"
        lines.append(f"projection {mode}: {PROJECTION_RULE[mode]} -> {pick} ({change}; Triton speed-up over the "
                     f"faster torch path, worst of {len(rs)} shapes: {worst:.2f}x, goal {PROJECTION_GOAL}x)")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m bench.report RESULTS.json|RESULTS.jsonl [...]", file=sys.stderr)
        return 2
    merged, skipped, notes = load(argv)
    print("\n".join(notes))
    print(format_table(merged))
    if skipped:
        print("\nskipped:\n" + "\n".join(f"- {s['name']}: {s['skipped']}" for s in skipped))
    proposals = dispatch_proposals(merged["benchmarks"])
    if proposals:
        print("\nauto dispatch on CUDA, as these measurements would set it:\n" + "\n".join(proposals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
