"""``linear_cross_entropy`` with the signature and semantics of ``torch.nn.functional.linear_cross_entropy``.

Code written for torch >= 2.13 switches with one import::

    from sonarllm_kernels import linear_cross_entropy   # was: from torch.nn.functional import linear_cross_entropy

and runs on our fused paths (no [N, C] logits on the "torch" and "triton" paths). Where we differ
on purpose, see :func:`linear_cross_entropy`.
"""

from __future__ import annotations

import torch

from sonarllm_kernels._dispatch import KernelImpl
from sonarllm_kernels.fused_linear_cross_entropy import NAMES, _check_args, fused_linear_cross_entropy

_TORCH_NAMES = NAMES | {"hidden": "input", "weight": "linear_weight", "bias": "linear_bias", "class_weight": "weight"}


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: object | None = None,
    impl: KernelImpl = "auto",
) -> torch.Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, weight=weight, ...)``,
    exactly as ``torch.nn.functional.linear_cross_entropy`` with class-index targets.

    Args:
        input: [D] or [N, D] (any leading shape [..., D] is accepted too).
        linear_weight: [C, D], same dtype as input.
        target: input's leading shape, class indices in [0, C) or ``ignore_index``.
        linear_bias: optional [C] bias.
        weight: optional [C] per-class weights, as in ``F.cross_entropy`` ("mean" divides by the
            sum of the non-ignored targets' weights; label smoothing weights each class).
        reduction: "mean", "sum" or "none".
        ignore_index: target value to skip; None means -100, as in torch.
        label_smoothing: in [0, 1].
        options: torch's ``LinearCrossEntropyOptions`` (chunking strategy) or None; accepted and
            ignored — every path but "reference" is chunked, with its own chunk sizes.
        impl: our path: "auto", "triton", "torch" or "reference" (an addition to torch's signature).

    Returns:
        The loss in input's dtype, as torch returns it (computed in float32, or float64).

    Differences from torch, on purpose:
        * "mean" with no target to average (every target ignored, N = 0, or class weights of the
          targets summing to 0, also with label smoothing) is 0 with zero gradients, not NaN.
        * Negative or non-finite class weights, and target values outside [0, C), raise
          ValueError; input may have any number of leading dimensions; ``weight`` may be any
          floating dtype; any integer target dtype is accepted.
        * Not supported (TypeError/ValueError when called): class-probability targets,
          K-dimensional loss (``linear_weight`` of shape [C, d1, ..., D]), class weights that
          require a gradient.
        * Gradients of gradients: on the "torch" and "triton" paths the backward raises
          RuntimeError as soon as a graph of the gradient is requested (``create_graph=True``,
          e.g. a gradient penalty; under torch.compile, torch's own RuntimeError); the gradient
          is computed in the forward, so it would be wrong. impl="reference" supports them.
        * Bad arguments raise ValueError (shapes, values, a negative ``label_smoothing``, which
          torch accepts) or TypeError (dtypes) naming the argument, where torch raises
          RuntimeError (or IndexError for targets out of range): ``except RuntimeError``
          around a torch call does not catch them.
    """
    if isinstance(linear_weight, torch.Tensor) and linear_weight.dim() > 2:
        raise ValueError(
            f"linear_weight must have shape [C, D]; K-dimensional loss (shape {tuple(linear_weight.shape)}) "
            "is not supported, use torch.nn.functional.linear_cross_entropy"
        )
    if isinstance(target, torch.Tensor) and (target.is_floating_point() or target.is_complex()):
        raise TypeError(
            f"target must hold class indices (an integer tensor); class-probability targets (dtype "
            f"{target.dtype}) are not supported, use torch.nn.functional.linear_cross_entropy"
        )
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None and not (options_type is not None and isinstance(options, options_type)):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}")
    ignore_index = -100 if ignore_index is None else ignore_index
    _check_args(input, linear_weight, target, linear_bias, weight, reduction, label_smoothing, 0.0, None, 0, None,
                names=_TORCH_NAMES)  # fmt: skip
    loss = fused_linear_cross_entropy(
        input, linear_weight, target, bias=linear_bias, class_weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, impl=impl,
    )  # fmt: skip
    return loss.to(input.dtype)
