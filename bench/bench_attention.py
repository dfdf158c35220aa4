"""Attention: time and peak memory of every provider, side by side, at SONAR-LLM's two shapes.

Shapes (causal, 16 heads, head dim 64, as d = 1024):

* "concept": the concept transformer, a batch of documents of S sentences each (batched layout,
  up to 4,096 sentences per document);
* "packed": the SONAR decoder/encoder over packed sentences (varlen layout, mean ~15 tokens,
  max 60, thousands of sentences).

Providers: our reference / torch (PyTorch SDPA) / triton paths (triton: CUDA only, the
interpreter is not a benchmark) and flash-attn when importable (CUDA). Modes: "fwd" (no grad)
and "fwd_bwd" (gradients of q, k and v). Peak memory goes into extra_info["peak_mem_mb"], the
FLOPs of one call (causal half of the scores counted) into extra_info["flops"].

    pytest bench/bench_attention.py --benchmark                  # seconds on a CPU
    pytest bench/bench_attention.py --benchmark --bench-size full
"""

from __future__ import annotations

import pytest
import torch

from bench._harness import machine_info, peak_memory_mb, sync
from kernels.attention import attention, cu_seqlens_from_lengths, flash_attn_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, HEAD_DIM = 16, 64
# concept: (documents B, sentences S); packed: number of sentences. Per device and --bench-size.
SHAPES = {
    ("cpu", "ci"): dict(concept=(1, 256), packed=64, dtype=torch.float32),
    ("cpu", "full"): dict(concept=(2, 1024), packed=1024, dtype=torch.float32),
    ("cuda", "ci"): dict(concept=(4, 1024), packed=1024, dtype=torch.bfloat16),
    ("cuda", "full"): dict(concept=(8, 4096), packed=8192, dtype=torch.bfloat16),
}
PROVIDERS = {
    "reference": lambda: "reference",
    "torch": lambda: "torch",
    "triton": lambda: "triton" if DEVICE == "cuda" else None,
    "flash": lambda: "flash" if DEVICE == "cuda" and flash_attn_available() else None,
}


def packed_lengths(n_sentences: int, seed: int = 0) -> torch.Tensor:
    """Sentence lengths of the SONAR decoder's packed batches: 1..60 tokens, mean ~15."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.randn(n_sentences, generator=g) * 8 + 15).round().clamp(1, 60).long()
    lens[0] = 60
    return lens


def _problem(shape: str, size: str):
    """(q, k, v, attention kwargs, FLOPs of the forward, description)."""
    cfg = SHAPES[(DEVICE, size)]
    dtype = cfg["dtype"]
    g = torch.Generator().manual_seed(0)
    if shape == "concept":
        b, s = cfg["concept"]
        dims, kwargs = (b, s, HEADS, HEAD_DIM), {}
        pairs = b * s * (s + 1) / 2
        desc = {"B": b, "S": s}
    else:
        lens = packed_lengths(cfg["packed"])
        dims = (int(lens.sum()), HEADS, HEAD_DIM)
        kwargs = dict(cu_seqlens_q=cu_seqlens_from_lengths(lens).to(DEVICE), max_seqlen_q=60, max_seqlen_k=60)
        pairs = float((lens * (lens + 1) / 2).sum())
        desc = {"sentences": cfg["packed"], "tokens": dims[0], "mean_len": round(dims[0] / cfg["packed"], 1)}
    q, k, v = (torch.randn(dims, generator=g).to(DEVICE, dtype) for _ in range(3))
    flops = 4 * pairs * HEADS * HEAD_DIM  # two GEMMs over the visible (query, key) pairs
    return q, k, v, kwargs, flops, desc | {"H": HEADS, "Dh": HEAD_DIM, "dtype": str(dtype)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", ["concept", "packed"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_attention(benchmark, bench_size, provider, shape, mode):
    impl = PROVIDERS[provider]()
    if impl is None:
        pytest.skip(f"{provider} is not available here (Triton timings need CUDA; flash needs flash-attn on CUDA)")
    q, k, v, kwargs, flops, desc = _problem(shape, bench_size)
    for t in (q, k, v):
        t.requires_grad_(mode == "fwd_bwd")
    grad_out = torch.randn_like(q)

    def clear():
        q.grad = k.grad = v.grad = None

    def step():
        if mode == "fwd":
            with torch.no_grad():
                attention(q, k, v, causal=True, impl=impl, **kwargs)
        else:
            attention(q, k, v, causal=True, impl=impl, **kwargs).backward(grad_out)
        sync(DEVICE)

    step()  # compile / warm up
    clear()
    benchmark.group = f"attention-{shape}-{mode}-{DEVICE}-{bench_size}"
    benchmark.extra_info.update(machine_info(DEVICE))
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(step, DEVICE), 1)  # gradients included
    benchmark.extra_info["shape"] = desc
    benchmark.extra_info["flops"] = flops * (1 if mode == "fwd" else 3.5)  # bwd: 5 GEMMs, recompute incl.
    rounds = 3 if provider == "reference" and bench_size == "full" else (5 if DEVICE == "cpu" else 10)
    benchmark.pedantic(step, setup=clear, rounds=rounds, iterations=1, warmup_rounds=0)
