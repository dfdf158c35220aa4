"""Benchmark-suite options.

``pytest bench --benchmark`` runs the benchmarks (our switch; plain pytest-benchmark only knows
``--benchmark-only``, which works too). ``--bench-size`` picks the problem sizes: "ci" (default:
seconds on a 2-core CPU) or "full" (the sizes of bench/RESULTS.md, e.g. SONAR's V = 256,206).
``--bench-jsonl FILE`` appends each result (and each skipped benchmark, with its reason) to FILE
as soon as it is measured, so a run stopped by a time limit keeps what it measured
(bench/gpu_suite.py reads these; ``python -m bench.report FILE`` prints them).
"""

import json

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("sonarllm benchmarks")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the benchmarks in bench/ (same as --benchmark-only)")
    group.addoption("--bench-size", choices=("ci", "full"), default="ci",
                    help="problem sizes: 'ci' (seconds on a CPU) or 'full' (the sizes of bench/RESULTS.md)")
    group.addoption("--bench-jsonl", default=None, metavar="FILE",
                    help="append every result to FILE (one JSON object per line) as soon as it is measured")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Must run before pytest-benchmark's own pytest_configure reads the options.
    if config.getoption("--benchmark"):
        config.option.benchmark_only = True
        config.option.benchmark_disable = False


@pytest.fixture
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


def _append(config, record: dict) -> None:
    path = config.getoption("--bench-jsonl")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def result_record(item, fixture) -> dict:
    """One measured benchmark as bench/report.py reads it (pytest-benchmark's JSON fields)."""
    stats = fixture.stats.stats
    return {
        "name": item.name, "group": fixture.group, "params": getattr(getattr(item, "callspec", None), "params", {}),
        "extra_info": fixture.extra_info,
        "stats": {k: getattr(stats, k) for k in ("min", "median", "mean", "max", "rounds")},
    }  # fmt: skip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call" and report.passed:
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        if fixture is not None and getattr(fixture, "stats", None) is not None:
            _append(item.config, result_record(item, fixture))
    elif report.skipped and report.when in ("setup", "call") and isinstance(report.longrepr, tuple):
        _append(item.config, {"name": item.name, "skipped": report.longrepr[2].removeprefix("Skipped: ")})
