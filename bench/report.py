"""Print pytest-benchmark JSON files as one markdown table: median time, ratio to the fastest
provider of its group, and the peak memory recorded in extra_info.

    pytest bench --benchmark --benchmark-json=out.json && python -m bench.report out.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def format_table(data: dict) -> str:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    lines = ["| group | benchmark | median ms | x fastest | peak MiB |", "|---|---|---|---|---|"]
    for group, items in groups.items():
        best = min(b["stats"]["median"] for b in items)
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            mem = b.get("extra_info", {}).get("peak_mem_mb", "")
            lines.append(f"| {group} | {b['name']} | {med * 1e3:.2f} | {med / best:.2f} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m bench.report BENCHMARK_JSON [BENCHMARK_JSON ...]", file=sys.stderr)
        return 2
    merged = {"benchmarks": []}
    for path in argv:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{path}: skipped ({exc})")
            continue
        merged["benchmarks"] += data["benchmarks"]
        info = data.get("machine_info", {})
        extra = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
        print(f"{path}: {info.get('cpu', {}).get('brand_raw', '?')}; device {extra.get('device', '?')}; "
              f"torch {extra.get('torch', '?')}; triton {extra.get('triton', '?')}")
    print(format_table(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
