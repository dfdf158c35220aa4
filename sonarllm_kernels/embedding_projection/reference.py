"""The specification of the fused embedding projection: plain PyTorch, one op per step.

The concept transformer maps SONAR embeddings (E = 1024) to its width D and back. With the
SONAR normalizer (per-feature ``center``/``scale``, frozen buffers; LCM's ``SonarNormalizer``)::

    mode "in":   y = ((x - center) / scale) @ weight.T + bias     # normalize -> Linear(E -> D)
    mode "out":  y = (x @ weight.T + bias) * scale + center       # Linear(D -> E) -> denormalize

``center``/``scale`` None means no normalizer (a plain ``F.linear``). The normalizer may be
kept in a wider dtype than ``x`` (float32 buffers beside a bfloat16 model): the elementwise
step is computed in ``promote(x.dtype, float32)`` and rounded once to ``x``'s dtype; the
linear runs at ``x``'s dtype, as ``nn.Linear`` does. This is the test oracle (with float64
inputs it is the ground truth), the "reference" benchmark provider and ``impl="reference"``.
Gradients come from autograd, for every input that requires one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_embedding_projection_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    mode: str = "in",
) -> torch.Tensor:
    """Reference projection; same arguments as ``sonarllm_kernels.fused_embedding_projection``.

    Args:
        x: [..., in_features].
        weight: [out_features, in_features]; bias: [out_features] or None.
        center, scale: [in_features] (mode "in") or [out_features] (mode "out"), or None.
        mode: "in" (normalize, then project) or "out" (project, then denormalize).

    Returns:
        [..., out_features], x's dtype.
    """
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    if center is None:
        return F.linear(x, weight, bias)
    c, s = center.to(acc_dtype), scale.to(acc_dtype)
    if mode == "in":
        x_n = ((x.to(acc_dtype) - c) / s).to(x.dtype)
        return F.linear(x_n, weight, bias)
    z = F.linear(x, weight, bias)
    return (z.to(acc_dtype) * s + c).to(x.dtype)
