"""Fused embedding projection: time, peak memory and throughput of every provider, side by side.

Providers: "reference" (plain ``F.linear`` plus the normalizer's elementwise steps, i.e.
nn.Linear + elementwise: cuBLAS + elementwise kernels on CUDA), "torch" (normalizer folded into
the addmm) and "triton" (normalizer inside the GEMM; CUDA only). The auto rule on CUDA
(AUTO_CUDA_PATHS in sonarllm_kernels/embedding_projection/__init__.py) wants Triton >= 1.1x the reference. Projections: "in" = normalize -> Linear(E -> D) on raw SONAR
embeddings (data: no d x; weight and bias trainable), "out" = Linear(D -> E) -> denormalize
(d x, weight and bias). Modes: "fwd" (no grad) and "fwd_bwd". Shapes come from the concept
transformer presets (sonarllm.config): E = 1024, D = 512 / 1024 / 2048 for 100M / 300M / 1.3B,
tokens = documents x 33 sentences. extra_info holds peak_mem_mb, GB/s (the minimum traffic: every operand
read and every result written once per GEMM; the normalizer step is bandwidth-bound, the
projection GEMMs are near the H200's ridge) and TFLOP/s.

    pytest bench/bench_fused_embedding_projection.py --benchmark                  # seconds, CPU
    pytest bench/bench_fused_embedding_projection.py --benchmark --bench-size full
"""

from __future__ import annotations

import pytest
import torch

from bench._harness import measure, sync
from sonarllm.config import SonarLLMConfig
from sonarllm_kernels.embedding_projection import fused_embedding_projection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# model_dim D = 512, 1024, 2048; on CUDA the widths the goal names (300M and 1.3B).
PRESETS = ("100M", "300M", "1.3B") if DEVICE == "cpu" else ("300M", "1.3B")
SENTENCES = 33  # per document: 32 sentences + "End of sequence."
# Documents per batch for each --bench-size; "full" on CPU stays at 512 (8192 x 33 tokens would
# take minutes per call there).
BATCHES = {
    ("cpu", "ci"): (64,),
    ("cpu", "full"): (512,),
    ("cuda", "ci"): (64,),
    ("cuda", "full"): (64, 512),  # a training micro-batch, and 8 of them
}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
PROVIDERS = ("reference", "torch", "triton")


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size", default="ci")
        metafunc.parametrize("batch", BATCHES[(DEVICE, size)], ids=lambda b: f"B{b}x{SENTENCES}")


def _traffic_and_flops(n: int, i: int, o: int, mode: str, x_grad: bool, itemsize: int):
    """Minimum bytes moved and FLOPs: one pass over each operand per GEMM."""
    gemm_bytes = (n * i + o * i + n * o) * itemsize
    gemm_flops = 2 * n * i * o
    gemms = 1 if mode == "fwd" else 2 + int(x_grad)  # forward, d weight, and d x when needed
    return gemms * gemm_bytes, gemms * gemm_flops


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("proj", ["in", "out"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_embedding_projection(benchmark, bench_size, provider, preset, proj, mode, batch):
    if provider == "triton" and DEVICE != "cuda":
        pytest.skip("Triton timings need CUDA (the CPU interpreter measures nothing useful)")
    dtype = DTYPE[DEVICE]
    cfg = SonarLLMConfig.from_name(preset)
    e, d = cfg.sonar_dim, cfg.model_dim
    n = batch * SENTENCES
    in_f, out_f = (e, d) if proj == "in" else (d, e)
    g = torch.Generator(device="cpu").manual_seed(0)
    # SONAR-like normalizer (per-dimension spread ~0.006, small median) and inputs.
    scale = (0.006 * (0.5 + torch.rand(e, generator=g))).to(DEVICE)
    center = (0.002 * torch.randn(e, generator=g)).to(DEVICE)
    if proj == "in":
        x = center + scale * torch.randn(n, in_f, generator=g).to(DEVICE)
    else:
        x = torch.randn(n, in_f, generator=g).to(DEVICE)
    x = x.to(dtype)
    bound = in_f**-0.5
    w = ((torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound).to(DEVICE, dtype)
    b = ((torch.rand(out_f, generator=g) * 2 - 1) * bound).to(DEVICE, dtype)
    x_grad = proj == "out" and mode == "fwd_bwd"
    x.requires_grad_(x_grad)
    w.requires_grad_(mode == "fwd_bwd")
    b.requires_grad_(mode == "fwd_bwd")
    dy = torch.randn(n, out_f, generator=g).to(DEVICE, dtype)  # a real upstream gradient (not y.sum()'s stride-0 one)

    def call():
        return fused_embedding_projection(x, w, b, center=center, scale=scale, mode=proj, impl=provider)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                call()
        else:
            x.grad = w.grad = b.grad = None
            call().backward(dy)
        sync(DEVICE)

    median = measure(benchmark, step, device=DEVICE, group=f"fep-{proj}-{mode}-{DEVICE}-N{n}-E{e}-D{d}-{str(dtype).split('.')[-1]}",
                     rounds=3 if DEVICE == "cpu" else 20,
                     shape={"N": n, "in": in_f, "out": out_f, "dtype": str(dtype), "preset": preset})  # fmt: skip
    if median is not None:
        nbytes, flops = _traffic_and_flops(n, in_f, out_f, mode, x_grad, dtype.itemsize)
        benchmark.extra_info["gb_per_s"] = round(nbytes / median / 1e9, 1)
        benchmark.extra_info["tflop_per_s"] = round(flops / median / 1e12, 3)
