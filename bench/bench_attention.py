"""Attention: time and peak memory of every provider, side by side, at SONAR-LLM's three shapes.

Shapes (16 heads, head dim 64, as d = 1024):

* "concept": the concept transformer's training batch, causal, documents of S sentences
  (batched layout; 64 documents x 33 sentences on CUDA);
* "packed": the SONAR decoder/encoder over packed sentences of 5-60 tokens (mean ~15; varlen
  layout, causal, thousands of sentences). SDPA has no varlen entry point: the "torch" path
  and the sdpa_* providers run it on the zero-padded batch it needs;
* "decode": KV-cache decoding, one query per stream against 1..512 cached positions (batched,
  forward only).

Providers: our reference / torch (PyTorch SDPA, its own backend choice) / triton paths (triton:
CUDA only, the interpreter is not a benchmark); on CUDA each SDPA backend forced in turn
(sdpa_flash, sdpa_cudnn, sdpa_efficient: our "torch" path under ``sdpa_kernel``; skipped where
that backend refuses the call) and flash-attn when importable. Modes: "fwd" (no grad) and
"fwd_bwd" (gradients of q, k and v). extra_info: peak_mem_mb, flops (the causal visible pairs),
tflop_per_s.

    pytest bench/bench_attention.py --benchmark                  # seconds on a CPU
    pytest bench/bench_attention.py --benchmark --bench-size full
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench._harness import measure, sync
from sonarllm_kernels.attention import attention, cu_seqlens_from_lengths, flash_attn_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, HEAD_DIM = 16, 64
# concept: (documents B, sentences S); packed: number of sentences; decode: (streams, cache
# lengths). Per device and --bench-size.
SHAPES = {
    ("cpu", "ci"): dict(concept=(1, 256), packed=64, decode=(2, (1, 64)), dtype=torch.float32),
    ("cpu", "full"): dict(concept=(2, 1024), packed=1024, decode=(4, (1, 512)), dtype=torch.float32),
    ("cuda", "ci"): dict(concept=(64, 33), packed=1024, decode=(16, (1, 512)), dtype=torch.bfloat16),
    ("cuda", "full"): dict(concept=(64, 33), packed=8192, decode=(64, (1, 128, 512)), dtype=torch.bfloat16),
}
_SDPA = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
PROVIDERS = ("reference", "torch", "triton", "flash", *_SDPA)


def _provider(name: str):
    """(impl, context manager factory), or None when the provider cannot run here."""
    if name in ("reference", "torch"):
        return name, contextlib.nullcontext
    if DEVICE != "cuda":
        return None
    if name == "triton":
        return "triton", contextlib.nullcontext
    if name == "flash":
        return ("flash", contextlib.nullcontext) if flash_attn_available() else None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA[name])
    return "torch", lambda: sdpa_kernel([backend])


def packed_lengths(n_sentences: int, seed: int = 0) -> torch.Tensor:
    """Sentence lengths of the SONAR decoder's packed batches: 5..60 tokens, mean ~15."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.randn(n_sentences, generator=g) * 8 + 15).round().clamp(5, 60).long()
    lens[0] = 60
    return lens


def _problem(shape: str, size: str, cached: int = 0):
    """(q, k, v, attention kwargs, FLOPs of the forward, description)."""
    cfg = SHAPES[(DEVICE, size)]
    dtype = cfg["dtype"]
    g = torch.Generator().manual_seed(0)
    if shape == "concept":
        b, s = cfg["concept"]
        q_dims = kv_dims = (b, s, HEADS, HEAD_DIM)
        kwargs, pairs, desc = {}, b * s * (s + 1) / 2, {"B": b, "S": s}
    elif shape == "decode":
        b = cfg["decode"][0]
        q_dims, kv_dims = (b, 1, HEADS, HEAD_DIM), (b, cached, HEADS, HEAD_DIM)
        kwargs, pairs, desc = {}, b * cached, {"streams": b, "cached": cached}
    else:
        lens = packed_lengths(cfg["packed"])
        q_dims = kv_dims = (int(lens.sum()), HEADS, HEAD_DIM)
        longest = int(lens.max())
        kwargs = dict(cu_seqlens_q=cu_seqlens_from_lengths(lens).to(DEVICE), max_seqlen_q=longest, max_seqlen_k=longest)
        pairs = float((lens * (lens + 1) / 2).sum())
        desc = {"sentences": cfg["packed"], "tokens": q_dims[0], "mean_len": round(q_dims[0] / cfg["packed"], 1),
                "padded_tokens": cfg["packed"] * longest}  # fmt: skip
    q = torch.randn(q_dims, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(kv_dims, generator=g).to(DEVICE, dtype) for _ in range(2))
    flops = 4 * pairs * HEADS * HEAD_DIM  # two GEMMs over the visible (query, key) pairs
    return q, k, v, kwargs, flops, desc | {"H": HEADS, "Dh": HEAD_DIM, "dtype": str(dtype)}


def _measure(benchmark, size, provider, shape, mode, cached=0):
    spec = _provider(provider)
    if spec is None:
        pytest.skip(f"{provider} is not available here (Triton and SDPA backends need CUDA; flash needs flash-attn)")
    impl, context = spec
    q, k, v, kwargs, flops, desc = _problem(shape, size, cached)
    for t in (q, k, v):
        t.requires_grad_(mode == "fwd_bwd")
    grad_out = torch.randn_like(q)

    def clear():
        q.grad = k.grad = v.grad = None

    def step():
        with context():
            if mode == "fwd":
                with torch.no_grad():
                    attention(q, k, v, causal=True, impl=impl, **kwargs)
            else:
                attention(q, k, v, causal=True, impl=impl, **kwargs).backward(grad_out)
        sync(DEVICE)

    group = f"attention-{shape}-{mode}-{DEVICE}-{size}" + (f"-cached{cached}" if shape == "decode" else "")
    flops *= 1 if mode == "fwd" else 3  # model FLOPs: bwd = 2 x fwd
    rounds = 3 if provider == "reference" and size == "full" else (5 if DEVICE == "cpu" else 10)
    try:
        median = measure(benchmark, step, device=DEVICE, group=group, rounds=rounds, setup=clear, shape=desc, flops=flops)
    except RuntimeError as exc:  # an SDPA backend that refuses this call ("No available kernel")
        if provider in _SDPA:
            pytest.skip(f"{provider} cannot run this call: {str(exc).splitlines()[0][:200]}")
        raise
    if median is not None:
        benchmark.extra_info["tflop_per_s"] = round(flops / median / 1e12, 3)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", ["concept", "packed"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, bench_size, provider, shape, mode):
    _measure(benchmark, bench_size, provider, shape, mode)


def pytest_generate_tests(metafunc):
    if "cached" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size", default="ci")
        metafunc.parametrize("cached", SHAPES[(DEVICE, size)]["decode"][1], ids=lambda n: f"cached{n}")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_decode(benchmark, bench_size, provider, cached):
    _measure(benchmark, bench_size, provider, "decode", "fwd", cached)
