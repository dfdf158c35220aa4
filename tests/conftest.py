"""Fixtures shared by all tests: deterministic seeds before every test; ``--smoke`` (tests/_smoke.py);
``--outcomes-jsonl FILE``: one JSON line per finished test, written as it finishes (a run stopped
by a time limit keeps its outcomes; bench/gpu_suite.py reads them)."""

import json
import random

import numpy as np
import pytest
import torch

from tests._smoke import smoke_subset


def pytest_addoption(parser):
    parser.addoption(
        "--smoke", action="store_true", default=False,
        help="run a representative subset of each parametrized test: every (device, path, dtype) case "
        "and every other parameter value on each path, not their cross product (the CUDA suite's default)",
    )  # fmt: skip
    parser.addoption("--outcomes-jsonl", default=None, metavar="FILE", help="append each test's outcome to FILE")


def pytest_runtest_logreport(report):
    config = _SESSION.get("config")
    path = config.getoption("--outcomes-jsonl") if config is not None else None
    if not path or hasattr(config, "workerinput"):  # pytest-xdist: the controller writes
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        line = {"nodeid": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.failed:
            line["message"] = str(report.longrepr)[-1500:]
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


_SESSION: dict = {}


def pytest_configure(config):
    _SESSION["config"] = config


def pytest_collection_modifyitems(config, items):
    if config.getoption("--smoke"):
        kept = smoke_subset(items)
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
