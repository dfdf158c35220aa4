"""Benchmark-suite options.

``pytest bench --benchmark`` runs the benchmarks (our switch; plain pytest-benchmark only knows
``--benchmark-only``, which works too). ``--bench-size`` picks the problem sizes: "ci" (default:
seconds on a 2-core CPU) or "full" (the sizes of bench/RESULTS.md, e.g. SONAR's V = 256,206).
"""

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("sonarllm benchmarks")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the benchmarks in bench/ (same as --benchmark-only)")
    group.addoption("--bench-size", choices=("ci", "full"), default="ci",
                    help="problem sizes: 'ci' (seconds on a CPU) or 'full' (the sizes of bench/RESULTS.md)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Must run before pytest-benchmark's own pytest_configure reads the options.
    if config.getoption("--benchmark"):
        config.option.benchmark_only = True
        config.option.benchmark_disable = False


@pytest.fixture
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")
