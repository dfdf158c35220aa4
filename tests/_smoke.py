"""``pytest --smoke``: a representative subset of every parametrized test, for short runs (the CUDA
suite on a rented GPU, bench/gpu_suite.sh).

Per test function, the subset covers every (device, path, dtype) case at least once and every
value of every other parameter (options such as masking, ignore_index, softcap, smoothing,
trainable weight, odd sizes, layouts) at least once *on each device's path* (CUDA Triton and the
CPU interpreter count apart), so every code path of every implementation still runs; it drops the cross product of those values. Chosen greedily in
collection order (the item that covers the most still-uncovered features first), hence
deterministic. Tests without parameters are kept.
"""

from __future__ import annotations

from collections import defaultdict

CASE_PARAMS = ("device", "path", "dtype")


def features(params: dict) -> set:
    """What one parametrization exercises: its (device, path, dtype) case, and each other
    parameter value together with the device and path that run it."""
    case = tuple(repr(params.get(name)) for name in CASE_PARAMS)
    path = (repr(params.get("device")), repr(params.get("path")))
    return {("case", case)} | {(path, name, repr(value)) for name, value in params.items() if name not in CASE_PARAMS}


def smoke_subset(items: list) -> list:
    """The items to keep (in their original order): a greedy cover of every parametrized test
    function's features; items whose function has no parameters are all kept."""
    groups: dict[tuple, list] = defaultdict(list)
    keep = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            keep.add(id(item))
            continue
        groups[(item.path, getattr(item, "originalname", item.name))].append((item, features(callspec.params)))
    for members in groups.values():
        uncovered = set().union(*(f for _, f in members))
        while uncovered:
            item, covered = max(members, key=lambda m: len(m[1] & uncovered))  # first of the best
            keep.add(id(item))
            uncovered -= covered
    return [item for item in items if id(item) in keep]
