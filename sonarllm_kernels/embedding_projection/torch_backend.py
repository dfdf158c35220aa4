"""The "torch" path of the fused embedding projection: the normalizer folded into one addmm,
where the fold is exact enough.

A per-feature affine map next to a linear layer is itself a linear layer, so the normalizer
can move into the (small) weight and bias instead of costing passes over the activations::

    mode "out":  W' = scale * W (per row),     b' = scale * b + center    y = x @ W'.T + b'
    mode "in":   W' = W / scale (per column),  b' = b - W' @ (center - c_x)
                                                       y = (x - c_x) @ W'.T + b'

with ``c_x`` = center rounded to x's dtype. The fold is computed in float32 (float64 for
float64 inputs), rounded once to the weight's dtype, and touches D x E elements, not N x E.
Gradients of x, weight, bias, center and scale all come from autograd through it.

Why "in" keeps one elementwise pass (``x - c_x``, at x's dtype, no float32 copy): folding the
center too would evaluate ``x @ W'.T - W' @ center`` instead of ``(x - center) @ W'.T``, whose
rounding error scales with ``|x|`` instead of ``|x - center|``, i.e. grows with
|center| / spread(x). Measured at E = 1024, D = 512: in bfloat16 the weight gradient then
misses the parity rule of tests/_numerics.py already at |center| = 3 spreads (SONAR's is
estimated at 0.3-0.8 from its norms, docs/sonar-llm.md §1), in float32 the output at about 20.
``x - c_x`` is a difference of two representable numbers, rounded once like the reference's;
the remainder ``center - c_x`` (zero when the center already has x's dtype) is exact in the
float32 bias. Folding the scale (and everything in "out", where the center is added after the
product) costs one rounding of W', like the reference's rounding of the normalized x. The
reference itself makes four passes over x (upcast, subtract, divide, downcast) before its GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_embedding_projection_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    center: torch.Tensor | None,
    scale: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Inputs already validated; x is [..., in_features]. Returns [..., out_features]."""
    if center is None:
        return F.linear(x, weight, bias)
    acc = torch.promote_types(weight.dtype, torch.float32)
    w, c, s = weight.to(acc), center.to(acc), scale.to(acc)
    if mode == "out":
        w_f = (w * s[:, None]).to(weight.dtype)  # [E, D] * [E, 1]
        b_f = c if bias is None else bias.to(acc) * s + c
        return F.linear(x, w_f, b_f.to(weight.dtype))

    w_f = (w / s).to(weight.dtype)  # [D, E] / [E]
    c_x = center.to(x.dtype)
    b_f = -(w_f.to(acc) @ (c - c_x.to(acc)))  # the remainder of the center; 0 when c_x == center
    if bias is not None:
        b_f = b_f + bias.to(acc)
    return F.linear(x - c_x, w_f, b_f.to(weight.dtype))
