"""Retune the fused linear cross-entropy's "triton" path on a GPU in one short run, and compare.

    python bench/sweep_flce.py --time-limit 170 --table-out "$OUT/tiles.json" \\
        --json "$OUT/sweep_flce.json"
    python bench/sweep_flce.py --quick          # fewer candidates, the goal shape only

1. Tune, one group of knobs at a time (coordinate descent from the current tile table): the
   hybrid schedule's row kernels; the fused schedule's logits GEMM, hidden-gradient GEMM (with
   its split into waves) and weight-gradient GEMM. Every candidate first passes a check on a
   small case (N = 512, V = 5,003, 20% ignored targets, trainable weight: the parity rule
   of tests/_numerics.py against float64, and two runs bit-identical); it is then timed
   fwd+bwd at N = 2,048, D = 1,024, V = 256,206 (four chunks).
2. Choose: each schedule with its best tiles and each chunk size, fwd+bwd at the goal shape
   (N = 65,536, D = 1,024, V = 256,206, frozen weight); the fastest becomes the table's entry
   for this GPU's architecture and the operand size tuned (bf16's entry also serves fp16).
3. Compare (as time allows, most important first): ours (the winner, the other schedule, the
   torch path), Liger-Kernel and cut-cross-entropy when importable, at N = 65,536 and 8,192,
   V = 256,206 / 128,256 / 32,000, bf16, frozen and trainable weight, then fp16 and fp32; the
   extra peak memory of each at the goal shape, and the relative error of d hidden against
   float64 at N = 4,096 (V = 256,206, bf16).

Times are ``triton.testing.do_bench`` medians (p20-p80 in brackets) in ms. Prints a table last;
``--json`` keeps every row; ``--table-out`` receives the tile table with the winner (default:
the one beside the kernel). With ``--time-limit`` whatever does not fit is skipped and listed.
Without CUDA it says so and exits with status 2.

Size: about 450 lines, one script (tune, choose, compare); a GPU-only tool, not reshaped until
it has run on one.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import flce_peers  # noqa: E402
from sonarllm_kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref  # noqa: E402
from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as ft  # noqa: E402

D = 1024
TUNE_SHAPE = (2048, D, 256_206)
GOAL_SHAPE = (65_536, D, 256_206)
COMPARE_SHAPES = [GOAL_SHAPE, (8192, D, 256_206), (65_536, D, 128_256), (8192, D, 128_256), (65_536, D, 32_000),
                  (8192, D, 32_000)]  # fmt: skip
CHUNK_MIB = (256, 384)  # 384 MiB keeps the extra memory at N = 65,536 under 0.5 GiB

# Candidates per knob group (each compiles for sm_90a without spills with every option on:
# python -m bench.flce_compile_report and its --check on the table entry).
CANDIDATES = {
    "hybrid": [
        dict(BLOCK_V=4096, SEGMENT=32768, num_warps=8),
        dict(BLOCK_V=8192, SEGMENT=65536, num_warps=8),
        dict(BLOCK_V=2048, SEGMENT=16384, num_warps=4),
        dict(BLOCK_V=4096, SEGMENT=131072, num_warps=16),
    ],
    "logits": [
        dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=64, GROUP_C=8, num_warps=8, num_stages=4),
        dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=64, GROUP_C=8, num_warps=8, num_stages=3),
        dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=128, GROUP_C=8, num_warps=8, num_stages=2),
    ],
    "grad": [
        dict(BLOCK_C=128, BLOCK_K=64, BLOCK_D=128, waves=1, num_warps=8, num_stages=4),
        dict(BLOCK_C=128, BLOCK_K=64, BLOCK_D=128, waves=2, num_warps=8, num_stages=4),
        dict(BLOCK_C=128, BLOCK_K=64, BLOCK_D=256, waves=1, num_warps=8, num_stages=3),
        dict(BLOCK_C=128, BLOCK_K=32, BLOCK_D=256, waves=1, num_warps=8, num_stages=4),
        dict(BLOCK_C=64, BLOCK_K=64, BLOCK_D=256, waves=1, num_warps=4, num_stages=4),
    ],
    "weight": [
        dict(BLOCK_V=128, BLOCK_C=64, BLOCK_D=128, num_warps=8, num_stages=3),
        dict(BLOCK_V=128, BLOCK_C=64, BLOCK_D=256, num_warps=8, num_stages=3),
    ],
}
QUICK = {"hybrid": 2, "logits": 2, "grad": 3, "weight": 1}  # candidates kept by --quick


@dataclass
class Row:
    """One measurement (or a skipped / failed one) of the comparison table."""

    provider: str
    dtype: str
    shape: tuple
    mode: str  # "fwd", "frozen" (fwd+bwd, weight frozen), "trainable"
    ms: tuple | None = None  # median, p20, p80
    note: str = ""
    extra: dict = field(default_factory=dict)

    def cells(self) -> str:
        n, d, v = self.shape
        t = "-" if self.ms is None else f"{self.ms[0]:.2f} [{self.ms[1]:.2f}-{self.ms[2]:.2f}]"
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return f"| {self.provider} | {self.dtype} | {n} | {v} | {self.mode} | {t} | {(self.note + ' ' + extra).strip()} |"


def do_bench_timer(fn: Callable[[], object], grad_to_none: list) -> tuple:
    """(median, p20, p80) ms by ``triton.testing.do_bench`` (events, L2 flushed between runs)."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, warmup=50, rep=400, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))


def _inputs(shape, dtype, device, trainable, *, ignore=0.0, seed=0):
    """Random hidden [N, D], weight [V, D] and targets [N] (``ignore`` of them ignored), drawn on
    ``device`` (fast even at V = 256,206) from a fixed seed."""
    n, d, v = shape
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(device=device, generator=g)
    h = (torch.randn(n, d, **f32) * 0.5).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, **f32) / d**0.5).to(dtype).requires_grad_(trainable)
    y = torch.randint(0, v, (n,), **f32)
    y[torch.rand(n, **f32) < ignore] = -100
    return h, w, y


def _step(fn, h, w, y, mode):
    """One call: no grad for "fwd", else loss.backward()."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(h, w, y)
    else:
        def run():
            fn(h, w, y).backward()
    return run


def ours(config: dict | None, impl: str = "triton", dtype: torch.dtype | None = None):
    """Our op with a given tile configuration (for operands of ``dtype`` only, when given;
    otherwise, and for None, the table's)."""

    def call(h, w, y):
        saved, ft.CONFIG = ft.CONFIG, config if dtype in (None, h.dtype) else None
        try:
            return fused_linear_cross_entropy(h, w, y, impl=impl)
        finally:
            ft.CONFIG = saved

    return call


def check_candidate(config: dict, device: str, dtype: torch.dtype, shape=(512, 256, 5003)) -> str | None:
    """None if ``config`` computes the loss and both gradients (trainable weight, 20% ignored
    targets) within the parity rule against float64, bit-identically twice; else why not."""
    from tests._numerics import assert_parity

    def grads(fn, dt):
        h, w, y = _inputs(shape, torch.float64, device, True, ignore=0.2, seed=1)
        h, w = h.detach().to(dt).requires_grad_(True), w.detach().to(dt).requires_grad_(True)
        loss = fn(h, w, y)
        (loss * 0.37).backward()
        return [loss.detach(), h.grad, w.grad]

    ref_fn = fused_linear_cross_entropy_ref
    try:
        got, again = grads(ours(config), dtype), grads(ours(config), dtype)
        ref, gold = grads(ref_fn, dtype), grads(ref_fn, torch.float64)
        for i, name in enumerate(("loss", "d hidden", "d weight")):
            assert_parity(got[i], ref[i], gold[i], dtype, name, grad=i > 0)
            assert torch.equal(got[i], again[i]), f"{name} differs between two runs"
    except Exception as e:  # noqa: BLE001 - any failure disqualifies the candidate
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def base_configs(arch: str, size: int) -> dict:
    """Each schedule's current configuration for (arch, operand size): the table's, else sm_90's."""
    entry = ft._TILES.get(arch, ft._TILES["sm_90"]).get(str(size), {})
    fallback = ft._TILES["sm_90"][str(size)]
    return {s: {"schedule": s, **copy.deepcopy(entry.get(s, fallback.get(s)))}
            for s in ft.SCHEDULES if s in entry or s in fallback}  # fmt: skip


class Sweep:
    """The three phases; ``timer``, ``checker`` and ``clock`` are injectable (tests)."""

    def __init__(self, device, dtype, *, deadline, timer=do_bench_timer, checker=check_candidate,
                 clock=time.monotonic, log=print, quick=False, tune_shape=TUNE_SHAPE,
                 goal_shape=GOAL_SHAPE, compare_shapes=COMPARE_SHAPES, candidates=CANDIDATES,
                 chunk_mib=CHUNK_MIB):  # fmt: skip
        self.device, self.dtype = device, dtype
        self.deadline, self.timer, self.checker, self.clock, self.log = deadline, timer, checker, clock, log
        self.quick, self.tune_shape, self.goal_shape = quick, tune_shape, goal_shape
        self.compare_shapes = [goal_shape] if quick else compare_shapes
        self.candidates = {k: v[: QUICK[k]] if quick else v for k, v in candidates.items()}
        self.chunk_mib = chunk_mib[:1] if quick else chunk_mib
        self.rows: list[Row] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - self.clock()

    def time(self, label, fn, shape, mode, dtype=None) -> tuple | None:
        """Time ``fn`` (h, w, y) -> loss; None (and listed as skipped) past the deadline or on error."""
        dtype = dtype or self.dtype
        if self.left() <= 0:
            self.skipped.append(f"{label} {shape} {mode}")
            return None
        h, w, y = _inputs(shape, dtype, self.device, mode == "trainable")
        try:
            return self.timer(_step(fn, h, w, y, mode), [h, w])
        except Exception as e:  # noqa: BLE001 - a provider that fails here is reported, not fatal
            self.log(f"  {label} {shape} {mode}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return None
        finally:
            del h, w, y
            if self.device == "cuda":
                torch.cuda.empty_cache()

    # --- phase 1: tune each knob group ----------------------------------------------------------

    def tune(self, configs: dict) -> dict:
        groups = [("hybrid", None, "frozen"), ("fused", "logits", "frozen"), ("fused", "grad", "frozen"),
                  ("fused", "weight", "trainable")]  # fmt: skip
        for schedule, group, mode in groups:
            if schedule not in configs:
                continue
            best_ms, best, passed, checked = math.inf, configs[schedule], False, False
            for cand in self.candidates[group or schedule]:
                cfg = copy.deepcopy(configs[schedule])
                if group is None:
                    cfg.update(cand)
                else:
                    cfg[group] = dict(cand)
                name = f"{schedule}:{group or 'rows'} {cand}"
                if self.left() <= 0:
                    self.skipped.append(name)
                    continue
                why = self.checker(cfg, self.device, self.dtype)
                checked, passed = True, passed or why is None
                if why is not None:
                    self.log(f"  FAILED check, not timed: {name}: {why}")
                    continue
                ms = self.time(name, ours(cfg), self.tune_shape, mode)
                self.log(f"  {name}: {'skipped' if ms is None else f'{ms[0]:.3f} ms'}")
                if ms is not None and ms[0] < best_ms:
                    best_ms, best = ms[0], cfg
            if checked and not passed:  # a schedule that computes wrong numbers is never chosen
                self.log(f"  no {schedule}:{group or 'rows'} candidate passed its check: {schedule} is dropped")
                del configs[schedule]
            elif schedule in configs:
                configs[schedule] = best
        return configs

    # --- phase 2: schedule and chunk size at the goal shape --------------------------------------

    def choose(self, configs: dict) -> tuple[dict, dict]:
        """The fastest (schedule, chunk) at the goal shape; also the fastest per schedule."""
        per_schedule: dict = {}
        for schedule, cfg in configs.items():
            for mib in self.chunk_mib:
                cand = dict(copy.deepcopy(cfg), chunk_mib=mib)
                ms = self.time(f"{schedule} chunk {mib} MiB", ours(cand), self.goal_shape, "frozen")
                self.log(f"  {schedule}, chunk {mib} MiB: {'skipped' if ms is None else f'{ms[0]:.2f} ms'}")
                if ms is not None and (schedule not in per_schedule or ms[0] < per_schedule[schedule][1][0]):
                    per_schedule[schedule] = (cand, ms)
        if not per_schedule:
            raise RuntimeError("no schedule could be timed at the goal shape (time limit too short?)")
        winner = min(per_schedule.values(), key=lambda cm: cm[1][0])[0]
        return winner, {s: c for s, (c, _) in per_schedule.items()}

    # --- phase 3: comparison ---------------------------------------------------------------------

    def providers(self, per_schedule: dict, winner: dict) -> dict:
        out = {f"ours {winner['schedule']}": ours(winner, dtype=self.dtype)}
        out |= {f"ours {s}": ours(c, dtype=self.dtype) for s, c in per_schedule.items() if s != winner["schedule"]}
        out["ours torch"] = ours(None, impl="torch")
        out |= flce_peers()
        return out

    def plan(self, names: list) -> list:
        """(provider, dtype, shape, mode) to compare, most important first: the tuned dtype at every
        shape (the torch path at the goal shape only), then fp16 and fp32 (unless --quick)."""
        plan = []
        for shape in self.compare_shapes:
            for mode in ("frozen", "trainable", "fwd"):
                plan += [(n, self.dtype, shape, mode) for n in names if shape == self.goal_shape or n != "ours torch"]
        if not self.quick:
            others = [n for n in names if n != "ours torch"]
            plan += [(n, torch.float16, self.goal_shape, m) for m in ("frozen", "trainable") for n in others]
            plan += [(n, torch.float32, self.compare_shapes[1], "frozen") for n in names]
        return list(dict.fromkeys(plan))  # fp16/fp32 rows repeat the tuned dtype's when it is one of them

    def compare(self, providers: dict, plan: list) -> None:
        for name, dtype, shape, mode in plan:
            if name not in providers:
                continue
            dname = str(dtype).removeprefix("torch.")
            ms = self.time(name, providers[name], shape, mode, dtype)
            self.rows.append(Row(name, dname, shape, mode, ms, "skipped" if ms is None else ""))
            self.log("  " + self.rows[-1].cells())

    def memory(self, providers: dict) -> None:
        """Peak memory above inputs (and, fwd+bwd, above the gradients' own size) at the goal shape."""
        if self.device != "cuda":
            return
        n, d, v = self.goal_shape
        grads_mib = n * d * self.dtype.itemsize / 2**20
        for row in self.rows:
            if row.shape != self.goal_shape or row.dtype != str(self.dtype).removeprefix("torch.") or row.ms is None:
                continue
            if row.mode not in ("fwd", "frozen") or self.left() <= 0:
                continue
            h, w, y = _inputs(self.goal_shape, self.dtype, self.device, False)
            step = _step(providers[row.provider], h, w, y, row.mode)
            step()
            h.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            row.extra["extra_MiB"] = round(extra - (grads_mib if row.mode == "frozen" else 0.0), 1)
            del h, w, y

    def accuracy(self, providers: dict, n: int = 4096) -> None:
        """Relative error of d hidden against float64 at N = n (bf16 inputs, frozen weight)."""
        if self.device != "cuda" or self.left() <= 0:
            return
        shape = (n, self.goal_shape[1], self.goal_shape[2])
        h64, w64, y = _inputs(shape, torch.float64, self.device, False)
        (fused_linear_cross_entropy_ref(h64, w64, y)).backward()
        gold = h64.grad
        for name, fn in providers.items():
            if self.left() <= 0:
                break
            h = h64.detach().to(self.dtype).requires_grad_(True)
            try:
                fn(h, w64.detach().to(self.dtype), y).backward()
                err = ((h.grad.double() - gold).norm() / gold.norm()).item()
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}"
            self.rows.append(Row(name, str(self.dtype).removeprefix("torch."), shape, "frozen",
                                 note=f"d hidden rel. error vs float64: {err:.2e}" if isinstance(err, float) else err))  # fmt: skip
        del h64, w64, gold


def compiled_kernels() -> list[str]:
    """Registers and spills of every Triton kernel compiled in this process (on the GPU)."""
    from triton.runtime.jit import JITFunction

    from sonarllm_kernels.fused_linear_cross_entropy import triton_kernels as K

    lines = []
    for name, fn in sorted(vars(K).items()):
        if not isinstance(fn, JITFunction):
            continue
        for caches in getattr(fn, "device_caches", {}).values():
            for kernel in caches[0].values():
                md = kernel.metadata
                lines.append(f"{name}: {md.num_warps} warps, {md.num_stages} stages, "
                             f"{getattr(kernel, 'n_regs', '?')} registers, {getattr(kernel, 'n_spills', '?')} spills, "
                             f"{md.shared} B shared")  # fmt: skip
    return lines


def write_table(path: Path, arch: str, size: int, winner: dict, per_schedule: dict, meta: dict) -> dict:
    """Put the winner (and the other schedule's tiles) into the tile table at ``path``; returns it."""
    source = path if path.exists() else ft.TILES_FILE
    table = json.loads(Path(source).read_text())
    entry = table.setdefault(arch, {})
    per = dict(entry.get(str(size), {}), schedule=winner["schedule"])  # schedules not timed keep their tiles
    for s, cfg in per_schedule.items():
        per[s] = {k: v for k, v in cfg.items() if k != "schedule"}
    entry[str(size)] = per
    entry["measured"] = meta
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, path)
    ft.load_tiles(path)  # validates what was written
    return table


def run(args, *, device="cuda", timer=do_bench_timer, checker=check_candidate, clock=time.monotonic, log=print,
        sweep_kwargs=None) -> int:  # fmt: skip
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    start = clock()
    sweep = Sweep(device, dtype, deadline=start + args.time_limit, timer=timer, checker=checker, clock=clock,
                  log=log, quick=args.quick, **(sweep_kwargs or {}))  # fmt: skip
    arch = ft.device_arch(torch.device(device)) if device == "cuda" else "sm_90"
    log(f"== tune ({arch}, {args.dtype})")
    configs = sweep.tune(base_configs(arch, dtype.itemsize))
    log(f"== choose at N, D, V = {sweep.goal_shape}")
    winner, per_schedule = sweep.choose(configs)
    meta = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else device,
        torch=torch.__version__, triton=__import__("triton").__version__,
        date=datetime.date.today().isoformat(), command="python bench/sweep_flce.py " + " ".join(args.argv),
    )  # fmt: skip
    table_out = Path(args.table_out)
    write_table(table_out, arch, dtype.itemsize, winner, per_schedule, meta)
    log(f"tile table ({arch}, {dtype.itemsize}-byte operands, schedule {winner['schedule']}) written to {table_out}")
    log("== compare")
    providers = sweep.providers(per_schedule, winner)
    sweep.compare(providers, sweep.plan(list(providers)))
    sweep.memory(providers)
    sweep.accuracy({k: v for k, v in providers.items() if k != "ours torch"})
    if device == "cuda":
        log("== compiled kernels (this GPU's Triton)")
        for line in compiled_kernels():
            log("  " + line)
    log(f"\n== results ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
        f"ms: do_bench median [p20-p80]; winner {winner['schedule']}, {time.strftime('%H:%M:%S')})")  # fmt: skip
    log("| provider | dtype | N | V | mode | ms | notes |\n|---|---|---|---|---|---|---|")
    for row in sweep.rows:
        log(row.cells())
    if sweep.skipped:
        log(f"skipped by the time limit ({len(sweep.skipped)}): " + "; ".join(sweep.skipped))
    if args.json:
        payload = dict(meta=meta, arch=arch, winner=winner, per_schedule=per_schedule,
                       rows=[asdict(r) for r in sweep.rows], skipped=sweep.skipped)  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    log(f"done in {clock() - start:.0f} s")
    return 0


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=170.0, help="seconds for the whole sweep (default 170)")
    parser.add_argument("--quick", action="store_true", help="fewer candidates; compare at the goal shape only")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="operands to tune")
    parser.add_argument("--table-out", default=str(ft.TILES_FILE), help="where to write the tile table")
    parser.add_argument("--json", help="write every result row here")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not torch.cuda.is_available():
        print("sweep_flce: no CUDA device here; this sweep times the Triton kernels on a GPU "
              "(an H200 for the shipped table). Nothing was measured or written.", file=sys.stderr)  # fmt: skip
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
