"""Shared measurement helpers: synchronised timing, peak memory, machine and version info."""

from __future__ import annotations

import os
import platform
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
