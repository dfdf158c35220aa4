"""Compile, ahead of a run and in parallel processes, the Triton kernel variants the run launches.

With a cold Triton cache the first training step waits while every kernel variant it launches
compiles, one after the other (seconds each). This module removes that wait:

1. :func:`record_variants` runs a workload with Triton's ``jit_cache_hook`` installed. Triton
   calls the hook with the full specialisation of every variant before compiling it; the hook
   records it and declines the compilation, so nothing compiles and nothing is launched (the
   outputs of Triton kernels stay unwritten: the workload's numbers are meaningless, only its
   launches count). Without a GPU, CPU tensors stand in for CUDA ones (``compile_only`` in
   sonarllm_kernels._dispatch) and the launches are specialised for a named target (default sm_90).
2. :func:`compile_variants` compiles the recorded variants in a pool of processes through
   ``JITFunction.preload``, Triton's entry point for precompiling a recorded specialisation.
   The results land in Triton's on-disk cache (``TRITON_CACHE_DIR``, default ~/.triton/cache),
   where the run's own launches find them.

This module is the machinery only: it runs any workload it is given. The command that builds a
SONAR-LLM training run's workload and warms it up is ``python -m training.warmup`` (the kernels
package never imports ``sonarllm`` or ``training``).

Set ``SONARLLM_COMPILE_LOG=FILE`` to have every process that imports ``sonarllm_kernels`` append one JSON
line per kernel compilation (kernel, seconds; cache hits take milliseconds) to FILE.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One compiled variant of a Triton kernel, as Triton specialised a launch."""

    module: str  # where the kernel object lives
    attr: str  # its name there (two kernel objects may share one Python function)
    specialization: str  # Triton's JSON specialisation data (JITFunction.preload's input)

    @property
    def label(self) -> str:
        """``attr[CONSTEXPR=value, ...]``: the constexprs that select the generated code."""
        data = json.loads(self.specialization)
        names = list(data["signature"])
        consts = {names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"], strict=True)
                  if len(k) == 1 and not names[k[0]].startswith("stride")}  # fmt: skip
        opts = data["options"]
        text = ", ".join(f"{k}={v['constexpr'] if isinstance(v, dict) else v}" for k, v in consts.items())
        # int arguments specialised as multiples of 16 (pointers are, almost always)
        div16 = [names[k[0]] for k, v in zip(data["attrs_keys"], data["attrs_vals"], strict=True)
                 if len(k) == 1 and not data["signature"][names[k[0]]].startswith("*") and "tt.divisibility" in str(v)]  # fmt: skip
        return f"{self.attr}[{text}, warps={opts['num_warps']}, stages={opts['num_stages']}; 16|{','.join(div16)}]"


def parse_target(arch: str):
    """``"sm_90"`` -> Triton's GPUTarget for CUDA compute capability 9.0."""
    from triton.backends.compiler import GPUTarget

    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if not match:
        raise ValueError(f"target must look like 'sm_90', got {arch!r}")
    return GPUTarget("cuda", int(match.group(1)), 32)


class _OfflineDriver:
    """Stands in for Triton's CUDA driver where kernels are only compiled, never launched: it
    names the target and a device 0, which is all that compiling needs."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextmanager
def _offline(target):
    """Make Triton compile for ``target`` without a GPU (and the kernels accept CPU tensors)."""
    from triton.runtime.driver import driver

    from sonarllm_kernels import _dispatch

    saved = driver._active
    driver.set_active(_OfflineDriver(target))
    _dispatch.set_compile_only(True)
    try:
        yield
    finally:
        driver._active = saved
        _dispatch.set_compile_only(False)


def _require_compiled_triton() -> None:
    from sonarllm_kernels._dispatch import is_interpreter, triton_import_error

    if triton_import_error() is not None:
        raise RuntimeError(f"sonarllm_kernels.warmup needs Triton ({triton_import_error()})")
    if is_interpreter():
        raise RuntimeError("sonarllm_kernels.warmup compiles GPU kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)")


def _attr_of(module: str, jit_fn) -> str:
    for name, value in vars(importlib.import_module(module)).items():
        if value is jit_fn:
            return name
    raise LookupError(f"kernel {jit_fn} is not a global of {module}")


def record_variants(workload: Callable[[], object], target: str | None = None) -> list[Variant]:
    """The distinct kernel variants ``workload()`` launches, in launch order; nothing compiles
    or runs. ``target`` ("sm_90", ...) records for that GPU with CPU tensors standing in for CUDA
    ones (no GPU needed); None records for the current CUDA device."""
    _require_compiled_triton()
    from triton import knobs

    seen: dict[tuple, Variant] = {}

    def hook(*, key, fn, compile, **_):
        jit_fn = fn.jit_function
        seen.setdefault((id(jit_fn), str(key)), Variant(jit_fn.module, _attr_of(jit_fn.module, jit_fn),
                                                        compile["specialization_data"]))  # fmt: skip
        return True  # declines the compilation: nothing is compiled or launched

    saved = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        if target is None:
            workload()
        else:
            with _offline(parse_target(target)):
                workload()
    finally:
        knobs.runtime.jit_cache_hook = saved
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Compiling


def _tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    from shutil import which

    return which(name)


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes that ``ptxas -v`` reports for one kernel's PTX."""
    ptxas = _tool("ptxas")
    if ptxas is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = "sm_90a" if arch == "sm_90" else arch  # Triton builds sm_90a (wgmma) for Hopper
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)  # fmt: skip
    text = out.stdout + out.stderr
    found = {
        "registers": re.search(r"Used (\d+) registers", text),
        "spill_stores": re.search(r"(\d+) bytes spill stores", text),
        "spill_loads": re.search(r"(\d+) bytes spill loads", text),
    }
    return {k: int(m.group(1)) for k, m in found.items() if m}


def _compile_one(variant: Variant, arch: str, usage: bool) -> dict:
    """Worker: compile one variant into Triton's cache (for ``arch``, no GPU needed)."""
    target = parse_target(arch)
    result = {"kernel": variant.attr, "label": variant.label}
    with _offline(target):
        fn = getattr(importlib.import_module(variant.module), variant.attr)
        tic = time.perf_counter()
        try:
            compiled = fn.preload(variant.specialization)
        except Exception as exc:  # reported, not raised: the run then compiles it itself
            return result | {"error": f"{type(exc).__name__}: {exc}"[:300]}
        result["seconds"] = round(time.perf_counter() - tic, 3)
    result["shared_bytes"] = compiled.metadata.shared
    if usage and "ptx" in compiled.asm:
        result.update(ptxas_usage(compiled.asm["ptx"], arch))
    return result


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def compile_variants(variants: Iterable[Variant], *, target: str | None = None, jobs: int | None = None,
                     usage: bool = False) -> list[dict]:  # fmt: skip
    """Compile every variant into Triton's on-disk cache, ``jobs`` processes at a time (default:
    one per CPU core). ``target``: "sm_90", ...; None is the current CUDA device's. Returns one
    record per variant: kernel, label, seconds (in its process), shared_bytes and, with
    ``usage``, ptxas's registers and spill bytes; or an error."""
    _require_compiled_triton()
    variants = list(variants)
    if not variants:
        return []
    if target is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        target = f"sm_{major}{minor}"
    parse_target(target)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants)))
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # the caller may hold a CUDA context: never fork it
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(_compile_one, v, target, usage) for v in variants]
        return [f.result() for f in futures]


def warm_up(workload: Callable[[], object], *, target: str | None = None, jobs: int | None = None) -> dict:
    """Record ``workload``'s variants and compile them in parallel. Returns a summary:
    variants, seconds (wall), compile_seconds (summed over processes), errors."""
    tic = time.perf_counter()
    variants = record_variants(workload, target)
    records = compile_variants(variants, target=target, jobs=jobs)
    errors = [r for r in records if "error" in r]
    return {
        "variants": len(variants),
        "seconds": round(time.perf_counter() - tic, 2),
        "compile_seconds": round(sum(r.get("seconds", 0.0) for r in records), 2),
        "errors": errors,
    }


# ---------------------------------------------------------------------------------------------
# Compile log (SONARLLM_COMPILE_LOG)


def log_compilations(path: str) -> None:
    """Append one JSON line per kernel compilation of this process to ``path``: kernel, seconds
    (a cache hit takes milliseconds), pid. Chains with hooks already installed."""
    try:
        from triton import knobs
    except Exception:  # no Triton: nothing compiles
        return
    started: dict[str, float] = {}
    before, after = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook

    def on_start(**kw):
        started[str(kw["key"])] = time.perf_counter()
        return before(**kw) if before else None

    def on_end(**kw):
        t0 = started.pop(str(kw["key"]), None)
        if t0 is not None:
            line = {"kernel": kw["fn"].name, "seconds": round(time.perf_counter() - t0, 4), "pid": os.getpid()}
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        return after(**kw) if after else None

    knobs.runtime.jit_cache_hook = on_start
    knobs.runtime.jit_post_compile_hook = on_end
