"""The parity rule of every kernel test, and input factories.

A fast path is compared with a float64 ground truth ``gold`` and must be no worse than twice
the error the plain-PyTorch reference makes at the same dtype, plus a per-dtype tolerance
relative to the tensor's scale (flash-attention's and cut-cross-entropy's rule)::

    max|fast - gold| <= 2 * max|ref - gold| + TOL[dtype] * max(max|gold|, 1e-30)
"""

from __future__ import annotations

import torch

TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
# Gradients pass through a second GEMM and the softmax: a looser floor (CCE uses 5e-4 for fp32).
TOL_GRAD = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def max_err(x: torch.Tensor, gold: torch.Tensor) -> float:
    """Largest elementwise |x - gold| (in float64); inf if NaN positions differ."""
    x64, g64 = x.detach().to(torch.float64), gold.detach().to(torch.float64)
    if not torch.equal(torch.isnan(x64), torch.isnan(g64)):
        return float("inf")
    both = ~torch.isnan(g64)
    if not both.any():
        return 0.0
    return (x64[both] - g64[both]).abs().max().item()


def assert_parity(fast, ref, gold, dtype: torch.dtype, what: str, grad: bool = False) -> None:
    """Assert the parity rule for one output (fast/ref/gold may be None together)."""
    if gold is None:
        assert fast is None and ref is None, f"{what}: expected no value (None), got one"
        return
    assert fast is not None, f"{what}: missing (None) but the reference produced a value"
    assert fast.shape == gold.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(gold.shape)}"
    scale = gold.detach().abs().nan_to_num(0.0).max().item() if gold.numel() else 0.0
    tol = (TOL_GRAD if grad else TOL)[dtype] * max(scale, 1e-30)
    err_fast, err_ref = max_err(fast, gold), max_err(ref, gold)
    bound = 2 * err_ref + tol
    assert err_fast <= bound, (
        f"{what} ({dtype}): max error {err_fast:.3e} > 2 * reference error {err_ref:.3e} "
        f"+ tol {tol:.3e} (scale {scale:.3e})"
    )


def flce_inputs(n, d, v, dtype, *, ignore_frac=0.2, peaky=True, bias=False, device="cpu", seed=0):
    """Hidden [n, d], weight [v, d], target [n] (some ignored), optional bias [v], all float64
    masters that tests cast. Peaky: some weight rows copy hidden rows so those targets dominate
    (the regime where softmax precision matters, after cut-cross-entropy's tests)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randint(0, v, (n,), generator=g)
    if peaky:
        k = min(n, v) // 2
        w[y[:k]] = h[:k] * 0.5
    if ignore_frac > 0:
        y[torch.rand(n, generator=g) < ignore_frac] = -100
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(h), cast(w), y.to(device), cast(b)
