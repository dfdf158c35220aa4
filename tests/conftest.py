"""Fixtures shared by all tests: deterministic seeds before every test; ``--smoke`` (tests/_smoke.py)."""

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
