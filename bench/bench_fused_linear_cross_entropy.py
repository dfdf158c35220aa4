"""Fused linear cross-entropy: time and peak memory of every provider, side by side.

Providers: our reference / torch / triton paths; ``torch.nn.functional.linear_cross_entropy``
(torch >= 2.13) plain and with its chunking options; Liger-Kernel and cut-cross-entropy when
importable (CUDA). Modes: "fwd" (no grad) and "fwd_bwd" (gradient of hidden; weight frozen,
as in SONAR-LLM). Peak memory goes into extra_info["peak_mem_mb"] next to the time.
bench/sweep_flce.py retunes the "triton" path and compares it with the peers at more shapes,
dtypes and with a trainable weight.

    pytest bench/bench_fused_linear_cross_entropy.py --benchmark                  # seconds, CPU
    pytest bench/bench_fused_linear_cross_entropy.py --benchmark --bench-size full
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench._harness import flce_peers, measure, sync
from sonarllm_kernels import fused_linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N tokens, D, V, dtype) per device and --bench-size. "full" on CPU is the CPU target
# (N = 2048 at SONAR's D and V); on CUDA it is the SONAR training shape.
SHAPES = {
    ("cpu", "ci"): (256, 256, 32_000, torch.float32),
    ("cpu", "full"): (2048, 1024, 256_206, torch.float32),
    ("cuda", "ci"): (4096, 1024, 256_206, torch.bfloat16),
    ("cuda", "full"): (65_536, 1024, 256_206, torch.bfloat16),
}


def _ours(impl):
    return lambda h, w, y: fused_linear_cross_entropy(h, w, y, impl=impl)


def _torch_native(chunked: bool):
    if not hasattr(F, "linear_cross_entropy"):
        return None
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=options)


PROVIDERS = {
    "reference": lambda: _ours("reference"),
    "torch": lambda: _ours("torch"),
    "triton": lambda: _ours("triton") if DEVICE == "cuda" else None,
    "torch_native": lambda: _torch_native(chunked=False),
    "torch_native_chunked": lambda: _torch_native(chunked=True),
    "liger": lambda: flce_peers().get("liger") if DEVICE == "cuda" else None,
    "cce": lambda: flce_peers().get("cce") if DEVICE == "cuda" else None,
}
MATERIALISING = {"reference", "torch_native"}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_flce(benchmark, bench_size, provider, mode):
    fn = PROVIDERS[provider]()
    if fn is None:
        pytest.skip(f"{provider} is not available here (Triton timings need CUDA; Liger/CCE need their package)")
    n, d, v, dtype = SHAPES[(DEVICE, bench_size)]
    if DEVICE == "cuda" and provider in MATERIALISING:
        need = n * v * 4 * 3  # fp32 logits, their softmax and their gradient
        if need > 0.8 * torch.cuda.mem_get_info()[0]:
            pytest.skip(f"{provider} materialises {need / 2**30:.0f} GiB of logits: does not fit")
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).to(DEVICE, dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(DEVICE, dtype)  # frozen, as SONAR's
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    h.requires_grad_(mode == "fwd_bwd")

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(h, w, y)
        else:
            h.grad = None
            fn(h, w, y).backward()
        sync(DEVICE)

    measure(benchmark, step, device=DEVICE, group=f"flce-{mode}-{DEVICE}-N{n}-D{d}-V{v}-{str(dtype).split('.')[-1]}",
            rounds=3 if bench_size == "full" and DEVICE == "cpu" else 10,
            shape={"N": n, "D": d, "V": v, "dtype": str(dtype)})  # fmt: skip
