"""Shared measurement helpers: the one timing procedure every benchmark follows (:func:`measure`),
peer discovery (:func:`optional_peer`), synchronised timing, peak memory, machine and version info."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the CPU profiler's start/stop lines off stdout


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so host timers measure the kernels and not their launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float:
    """Peak tensor memory allocated while ``fn`` runs, above what was allocated before, in MiB.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events (the CPU
    allocator keeps no peak counter), replayed in time order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()  # negative for frees
        peak = max(peak, current)
    return peak / 2**20


def machine_info(device: torch.device | str) -> dict:
    """Versions and hardware, stored with every benchmark (extra_info)."""
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return info


def has_peer(*modules: str) -> bool:
    """Whether every one of ``modules`` is installed (found, not imported: a peer such as
    sonar-space is slow to import and lives in its own environment)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def optional_peer(module: str, attr: str) -> Callable | None:
    """``module.attr`` of a peer implementation (Liger-Kernel, cut-cross-entropy, ...), or None
    where its package is not installed (the benchmark then skips, naming it)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        return None


FLCE_PEERS = {"liger": ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy"),
              "cce": ("cut_cross_entropy", "linear_cross_entropy")}  # fmt: skip


def flce_peers() -> dict[str, Callable]:
    """The fused linear cross-entropy peers installed here, each called as ``fn(hidden, weight, target)``."""
    return {name: fn for name, where in FLCE_PEERS.items() if (fn := optional_peer(*where)) is not None}


def measure(benchmark, step: Callable[[], object], *, device: torch.device | str, group: str, rounds: int,
            setup: Callable[[], object] | None = None, warm_up: bool = True, **extra) -> float | None:
    """Time ``step`` as every benchmark here does, and return its median in seconds.

    Under ``--benchmark-disable`` (CI) ``step`` runs once as a smoke test and None is returned.
    Otherwise: one warm-up call (compilation, allocator growth; skipped with ``warm_up=False`` for
    a caller that timed the first call itself), one call measuring the peak memory, then ``rounds``
    timed calls, each after ``setup``. ``extra_info`` gets the machine and versions, peak_mem_mb
    and ``extra``; ``step`` must synchronise its device itself (:func:`sync`).
    """
    if not benchmark.enabled:
        benchmark.pedantic(step, setup=setup, rounds=1, iterations=1)
        return None
    if warm_up:
        step()
    benchmark.group = group
    benchmark.extra_info.update(machine_info(device))
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(step, device), 1)
    benchmark.extra_info.update(extra)
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


def measure_interleaved(benchmark, step: Callable[[], object], peer_step: Callable[[], object] | None, *,
                        device: torch.device | str, rounds: int, peer: str) -> dict:  # fmt: skip
    """Time ``step`` with pytest-benchmark and, before each of its rounds, ``peer_step`` (when
    given), so that both sides see the same machine load, round by round: the way to compare
    with a peer on a shared machine. No warm-up round: the callers first call both sides once to
    compare their outputs. Records the machine in ``extra_info``; returns the peer's median, its
    rounds and ``{peer}_over_ours`` (empty without a peer or under ``--benchmark-disable``)."""
    peer_times: list[float] = []

    def setup():
        if peer_step is not None:
            t = time.perf_counter()
            peer_step()
            peer_times.append(time.perf_counter() - t)

    benchmark.extra_info.update(machine_info(device))
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    if peer_step is None or not benchmark.stats:
        return {}
    peer_median = statistics.median(peer_times)
    return {f"{peer}_median_s": peer_median, f"{peer}_rounds": len(peer_times),
            f"{peer}_over_ours": round(peer_median / benchmark.stats.stats.median, 3)}  # fmt: skip
