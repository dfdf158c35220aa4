"""Hopper compile evidence for the fused linear cross-entropy's Triton kernels, without a GPU.

Runs the "triton" path's chunk code on CPU tensors with every Triton launch recorded instead
of run, then compiles each recorded launch for sm_90a exactly as the JIT would at that launch
(same arguments, so the same specialisation: strides equal to 1 become constants, integers
and pointers divisible by 16 are marked so, which decides vector widths and whether a loop
can be software-pipelined), and reads the result: registers, spills and stack frame from
``ptxas -v``, shared memory from the compiled metadata, and from the TTGIR whether loads are
asynchronous copies (a pipelined loop) and how many wgmma ops there are.

    python -m bench.flce_compile_report                   # every kept schedule, bf16 and fp32
    python -m bench.flce_compile_report --schedule fused --dtype bf16

Needs Triton's NVIDIA backend (its bundled ptxas), not a GPU; must run without
TRITON_INTERPRET (the interpreter replaces the kernels). tests/kernels/test_flce_hopper_compile.py
runs it and fails on any register spill.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

SM90 = ("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class KernelReport:
    kernel: str
    flags: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    async_copies: int
    sync_loop_loads: int
    scalar16: int
    wgmma: int

    def row(self) -> str:
        return (f"| `{self.kernel}` | {self.flags} | {self.num_warps}/{self.num_stages} | {self.registers} | "
                f"{self.spill_stores}/{self.spill_loads} | {self.stack} | {self.shared // 1024} | "
                f"{self.async_copies} | {self.sync_loop_loads} | {self.scalar16} | {self.wgmma} |")  # fmt: skip


TABLE_HEAD = ("| kernel | flags on | warps/stages | registers | spill stores/loads (B) | stack (B) | shared (KiB) | "
              "async copies | synchronous tile loads in loops | scalar 16-bit global accesses | wgmma ops |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record_launches(modules, run) -> list:
    """Call ``run()`` with every JIT kernel of ``modules`` replaced by a recorder."""
    from triton.runtime.jit import JITFunction

    launches: list = []
    saved = [(m, name, fn) for m in modules for name, fn in vars(m).items() if isinstance(fn, JITFunction)]
    try:
        for m, name, fn in saved:
            setattr(m, name, _Recorder(fn, launches))
        run()
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)
    return launches


def _ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _sync_loop_loads(ttgir: str) -> int:
    """Plain (synchronous) ``tt.load`` of 2-D tiles inside ``scf.for`` bodies: a tile load the
    pipeliner could not turn into an asynchronous copy (its latency is paid every iteration)."""
    count, loop_indents = 0, []
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while loop_indents and indent <= loop_indents[-1] and not line.lstrip().startswith("}"):
            loop_indents.pop()
        if "scf.for" in line:
            loop_indents.append(indent)
        elif loop_indents and re.search(r"= tt\.load .*: tensor<\d+x\d+x!tt\.ptr", line):
            count += 1
    return count


def compile_launch(fn, args, kwargs) -> KernelReport:
    """Compile one recorded launch for sm_90a the way ``fn[grid](*args, **kwargs)`` would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget(*SM90)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([_ptxas_path(), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    finally:
        os.remove(f.name)
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else 0
    ttgir = compiled.asm["ttgir"]
    flags = ",".join(k.removeprefix("HAS_") for k, v in kwargs.items() if k.startswith(("HAS_", "STORE_")) and v is True)
    return KernelReport(
        kernel=fn.__name__, flags=flags or "-", num_warps=options.num_warps, num_stages=options.num_stages,
        registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
        shared=compiled.metadata.shared,
        async_copies=len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir)),
        sync_loop_loads=_sync_loop_loads(ttgir),
        scalar16=len(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z]+)*\.b16\b", compiled.asm["ptx"])),
        wgmma=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
    )  # fmt: skip


def chunk_launches(dtype: torch.dtype, config: dict | None, options: dict, *, trainable: bool,
                   C: int = 512, D: int = 1024, V: int = 1000) -> list:  # fmt: skip
    """The Triton launches of one forward+gradient chunk at (C, D, V) on CPU tensors (recorded,
    not run) with the given configuration (None: the module's default). ``options``: bias,
    class_weight and FLCEParams fields. V = 1000, like SONAR's 256,206, is not a multiple of 16,
    so the specialisation is the one the real shape gets."""
    import kernels.fused_linear_cross_entropy_triton as ft
    from kernels.fused_linear_cross_entropy_function import FLCEParams

    g = torch.Generator().manual_seed(0)
    h = torch.randn(C, D, generator=g).to(dtype)
    w = torch.randn(V, D, generator=g).to(dtype)
    y = torch.randint(0, V, (C,), generator=g)
    b = torch.randn(V, generator=g).to(dtype) if options.get("bias") else None
    cw = torch.rand(V, generator=g) if options.get("class_weight") else None
    params = FLCEParams(ignore_index=-100, reduction="mean", label_smoothing=options.get("label_smoothing", 0.0),
                        z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"), shift=0,
                        return_lse=False, return_z_loss=False)  # fmt: skip
    backend = ft.TritonChunkBackend() if config is None else ft.TritonChunkBackend(config=config)
    dw = torch.zeros(V, D) if trainable else None
    db = torch.zeros(V) if trainable and b is not None else None
    run = lambda: backend.chunk(h, w, b, y, params, cw_V=cw, loss_scale_C=torch.ones(C), lse_scale_C=None,
                                want_dh=True, dw_acc_VD=dw, db_acc_V=db)  # fmt: skip
    modules = [sys.modules[n] for n in list(sys.modules) if n.startswith("kernels.fused_linear_cross_entropy_triton")]
    return record_launches(modules, run)


FLAG_SETS = {
    "plain": dict(),
    "all": dict(bias=True, class_weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
}


def table_configs(arch: str = "sm_90", dtypes=("bf16", "fp32")) -> list[tuple[str, dict]]:
    """(dtype name, config) for every schedule the tile table keeps for ``arch``."""
    import kernels.fused_linear_cross_entropy_triton as ft

    out = []
    for dname in dtypes:
        per = ft._TILES[arch][str(DTYPES[dname].itemsize)]
        out += [(dname, {"schedule": name, **per[name]}) for name in ft.SCHEDULES if name in per]
    return out


def report(configs, flag_sets=("plain", "all")) -> list[tuple[str, str, KernelReport]]:
    """Compile every distinct launch of each (dtype name, config) x flag set (trainable, so that
    the weight-gradient kernels are included)."""
    rows, seen = [], set()
    for dname, config in configs:
        for fname in flag_sets:
            for fn, args, kwargs in chunk_launches(DTYPES[dname], config, FLAG_SETS[fname], trainable=True):
                key = (config["schedule"], dname, fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                rows.append((config["schedule"], dname, compile_launch(fn, args, kwargs)))
    return rows


GEMM_KERNELS = {"_flce_logits_kernel", "_flce_grad_hidden_kernel", "_flce_grad_weight_kernel"}
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90


def problems(rows) -> list[str]:
    """What must not happen: register spills, shared memory over the limit, and a Triton GEMM
    whose K loop loads a tile synchronously (not software-pipelined)."""
    out = []
    for schedule, dname, r in rows:
        what = f"{schedule}/{dname} {r.kernel} [{r.flags}]"
        if r.spill_stores or r.spill_loads:
            out.append(f"{what}: spills {r.spill_stores}/{r.spill_loads} bytes")
        if r.shared > SHARED_LIMIT:
            out.append(f"{what}: {r.shared} bytes of shared memory > {SHARED_LIMIT}")
        if r.kernel in GEMM_KERNELS and r.sync_loop_loads:
            out.append(f"{what}: {r.sync_loop_loads} synchronous tile loads in its K loop (not pipelined)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="all", help="a schedule of the triton path, or 'all'")
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--arch", default="sm_90", help="the tile table's entry to compile (default sm_90)")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, shared-memory overflow or an "
                        "unpipelined GEMM loop")  # fmt: skip
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    configs = [c for c in table_configs(args.arch, args.dtype.split(","))
               if args.schedule in ("all", c[1]["schedule"])]  # fmt: skip
    head, rule = TABLE_HEAD.split("\n")
    print("| schedule | dtype " + head + "\n|---|---" + rule)
    rows = report(configs)
    for schedule, dname, r in rows:
        print(f"| {schedule} | {dname} " + r.row())
    bad = problems(rows)
    for line in bad:
        print("problem:", line)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
