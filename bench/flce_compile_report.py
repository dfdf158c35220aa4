"""Hopper compile evidence for the fused linear cross-entropy's Triton kernels, without a GPU.

Runs one forward+gradient chunk of the "triton" path on CPU tensors standing in for CUDA ones
and records its Triton launches with their full specialisation (``sonarllm_kernels.warmup``: strides
equal to 1 become constants, integers and pointers divisible by 16 are marked so, which decides
vector widths and whether a loop can be software-pipelined); compiles each for sm_90a and reads
the result: registers and spills (``ptxas -v``), shared memory (the compiled metadata), and from
the TTGIR / PTX: asynchronous copies (pipelined operands), plain tile loads inside a loop (not
pipelined: their latency is paid every iteration), 16-bit scalar global accesses (where
16-byte vectors were meant) and wgmma ops.

    python -m bench.flce_compile_report                   # every kept schedule, bf16 and fp32
    python -m bench.flce_compile_report --schedule fused --dtype bf16 --check

Needs Triton's NVIDIA backend (its bundled ptxas), not a GPU, and TRITON_INTERPRET unset.
tests/sonarllm_kernels/test_fused_linear_cross_entropy.py runs ``--check``: it fails on any register
spill, shared memory over the limit or an unpipelined Triton GEMM loop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

ARCH = "sm_90"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GEMM_KERNELS = {"_flce_logits_kernel", "_flce_grad_hidden_kernel", "_flce_grad_weight_kernel"}
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90


@dataclass
class KernelReport:
    kernel: str
    flags: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    async_copies: int
    sync_loop_loads: int
    scalar16: int
    wgmma: int

    def row(self) -> str:
        return (f"| `{self.kernel}` | {self.flags} | {self.num_warps}/{self.num_stages} | {self.registers} | "
                f"{self.spill_stores}/{self.spill_loads} | {self.shared // 1024} | {self.async_copies} | "
                f"{self.sync_loop_loads} | {self.scalar16} | {self.wgmma} |")  # fmt: skip


TABLE_HEAD = ("| kernel | flags on | warps/stages | registers | spill stores/loads (B) | shared (KiB) | "
              "async copies | synchronous tile loads in loops | scalar 16-bit global accesses | wgmma ops |\n"
              "|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


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


def _flags(variant) -> tuple[str, int, int]:
    """The HAS_*/STORE flags that are on, the warps and the stages of a recorded variant."""
    data = json.loads(variant.specialization)
    names = list(data["signature"])
    on = [names[k[0]].removeprefix("HAS_") for k, v in zip(data["constant_keys"], data["constant_vals"], strict=True)
          if len(k) == 1 and names[k[0]].startswith(("HAS_", "STORE")) and v is True]  # fmt: skip
    return ",".join(on) or "-", data["options"]["num_warps"], data["options"]["num_stages"]


def compile_variant(variant) -> KernelReport:
    """Compile one recorded variant for sm_90a in this process and read its resources."""
    import importlib

    from sonarllm_kernels.warmup import _offline, parse_target, ptxas_usage

    with _offline(parse_target(ARCH)):
        compiled = getattr(importlib.import_module(variant.module), variant.attr).preload(variant.specialization)
    usage = ptxas_usage(compiled.asm["ptx"], ARCH)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    flags, warps, stages = _flags(variant)
    return KernelReport(
        kernel=variant.attr, flags=flags, num_warps=warps, num_stages=stages,
        registers=usage.get("registers", -1), spill_stores=usage.get("spill_stores", -1),
        spill_loads=usage.get("spill_loads", -1), shared=compiled.metadata.shared,
        async_copies=len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir)),
        sync_loop_loads=_sync_loop_loads(ttgir),
        scalar16=len(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z]+)*\.b16\b", ptx)),
        wgmma=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
    )  # fmt: skip


def chunk_variants(dtype: torch.dtype, config: dict, options: dict, C: int = 512, D: int = 1024, V: int = 1000):
    """The Triton launches (recorded, not run) of one forward + hidden, weight and bias gradient
    chunk at (C, D, V) with ``config``. ``options``: bias, class_weight and FLCEParams fields.
    V = 1000, like SONAR's 256,206, is not a multiple of 16: the specialisation the real shape gets."""
    from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as ft
    from sonarllm_kernels.fused_linear_cross_entropy.function import FLCEParams
    from sonarllm_kernels.warmup import record_variants

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(C, D, generator=g).to(dtype), torch.randn(V, D, generator=g).to(dtype)
    y = torch.randint(0, V, (C,), generator=g)
    b = torch.randn(V, generator=g).to(dtype) if options.get("bias") else None
    cw = torch.rand(V, generator=g) if options.get("class_weight") else None
    params = FLCEParams(ignore_index=-100, reduction="mean", label_smoothing=options.get("label_smoothing", 0.0),
                        z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"), shift=0,
                        return_lse=False, return_z_loss=False)  # fmt: skip
    backend = ft.TritonChunkBackend(config=config)
    run = lambda: backend.chunk(h, w, b, y, params, cw_V=cw, loss_scale_C=torch.ones(C), lse_scale_C=None,  # noqa: E731
                                want_dh=True, dw_acc_VD=torch.zeros(V, D), db_acc_V=None if b is None else torch.zeros(V))  # fmt: skip
    return record_variants(run, target=ARCH)


FLAG_SETS = {
    "plain": dict(),
    "all": dict(bias=True, class_weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
}


def table_configs(dtypes=("bf16", "fp32")) -> list[tuple[str, dict]]:
    """(dtype name, config) for every schedule the tile table keeps for sm_90."""
    from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as ft

    out = []
    for dname in dtypes:
        per = ft._TILES[ARCH][str(DTYPES[dname].itemsize)]
        out += [(dname, {"schedule": name, **per[name]}) for name in ft.SCHEDULES if name in per]
    return out


def report(configs, flag_sets=("plain", "all")) -> list[tuple[str, str, KernelReport]]:
    """Compile every distinct launch of each (dtype name, config) x flag set. All launches are
    recorded before any compiles (a compiled variant would be launched, not recorded)."""
    recorded = {}
    for dname, config in configs:
        for fname in flag_sets:
            for variant in chunk_variants(DTYPES[dname], config, FLAG_SETS[fname]):
                recorded.setdefault((config["schedule"], variant.label), (dname, variant))
    return [(schedule, dname, compile_variant(v)) for (schedule, _), (dname, v) in recorded.items()]


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
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on spills, shared-memory overflow or an unpipelined GEMM loop")  # fmt: skip
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    configs = [c for c in table_configs(args.dtype.split(",")) if args.schedule in ("all", c[1]["schedule"])]
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
