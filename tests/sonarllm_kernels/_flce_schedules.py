"""Every FLCE test of the "triton" path runs once per schedule that path keeps.

A triton case's path becomes "triton:<schedule>" (e.g. "triton:fused"); the test modules call
the API through ``with_schedule(fn)``, which runs "triton:<schedule>" as impl="triton" with
``sonarllm_kernels.fused_linear_cross_entropy.triton_backend.SCHEDULE`` set for the call (the backend object
reads it when the forward builds it, so the backward runs the same schedule).
"""

from __future__ import annotations

import functools

import pytest

try:
    from sonarllm_kernels.fused_linear_cross_entropy.triton_backend import SCHEDULES
except ImportError:  # no Triton here: the triton cases skip anyway
    SCHEDULES = ("hybrid",)

TRITON_PATHS = [f"triton:{s}" for s in SCHEDULES]


def expand(cases: list) -> list:
    """Replace each case whose values include "triton" by one case per schedule."""
    out = []
    for case in cases:
        values, marks, case_id = (case.values, case.marks, case.id) if hasattr(case, "values") else ((case,), (), None)
        if "triton" not in values:
            out.append(case)
            continue
        for s in SCHEDULES:
            new = tuple(f"triton:{s}" if v == "triton" else v for v in values)
            new_id = case_id.replace("triton", f"triton-{s}") if case_id else None
            out.append(pytest.param(*new, marks=marks, id=new_id))
    return out


def with_schedule(fn):
    """``fn(..., impl=...)`` that also accepts impl="triton:<schedule>"."""

    @functools.wraps(fn)
    def call(*args, impl="auto", **kwargs):
        name, _, schedule = impl.partition(":")
        if not schedule:
            return fn(*args, impl=impl, **kwargs)
        from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as ft

        saved, ft.SCHEDULE = ft.SCHEDULE, schedule
        try:
            return fn(*args, impl=name, **kwargs)
        finally:
            ft.SCHEDULE = saved

    return call
