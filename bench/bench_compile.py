"""The training step of bench/bench_train_step.py (fused kernel paths) in eager mode and compiled
as the trainer's ``system.compile`` compiles it (training/compile.py: the concept transformer's
and the token loss's forwards, dynamic shapes, inductor). extra_info: first_step_s and, compiled,
compile_s (first step minus a compiled step), besides bench_train_step's. CPU: toy ("ci") or 39M
("full") concept transformer, toy-sized / 1024-d 2-layer decoders, fp32; CUDA: 300M with the
basic decoder, bf16.

    pytest bench/bench_compile.py --benchmark [--bench-size full]
"""

from __future__ import annotations

import time

import pytest

from bench._harness import measure
from bench.bench_train_step import DEVICE, SIZES, build_step


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_train_step_compiled(benchmark, bench_size, mode):
    if not benchmark.enabled:
        pytest.skip("compiling takes minutes on a CPU: run with --benchmark (tests/sonarllm/test_compiled_step.py "
                    "checks the compiled step)")  # fmt: skip
    docs = SIZES[(DEVICE, bench_size)][2][0]
    step, info = build_step(bench_size, "fused", docs, compiled=mode == "compiled")
    tic = time.perf_counter()
    step()
    first_s = time.perf_counter() - tic
    median = measure(benchmark, step, device=DEVICE,
                     group=f"compile-{DEVICE}-{bench_size}-{info['preset']}-decoder{info['decoder']}-V{info['vocab']}-{docs}docs",
                     rounds=5, warm_up=False, first_step_s=round(first_s, 2), **info)  # fmt: skip
    if mode == "compiled":
        benchmark.extra_info["compile_s"] = round(first_s - median, 1)
    benchmark.extra_info["target_tokens_per_s"] = round(info["target_tokens"] / median)
