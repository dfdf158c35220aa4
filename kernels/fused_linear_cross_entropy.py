"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` without the logits.

At SONAR's vocabulary (V = 256,206) the logits of 65,536 tokens take 67 GB in float32. The
"torch" and "triton" paths hold one chunk of rows at a time and never materialise [N, V];
only the "reference" path (the specification, kernels/fused_linear_cross_entropy_ref.py) does.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels._dispatch import NO_FLOAT64, KernelImpl, check_impl_name, resolve_impl
from kernels.fused_linear_cross_entropy_function import FLCEParams, FusedLinearCrossEntropyFunction
from kernels.fused_linear_cross_entropy_ref import fused_linear_cross_entropy_ref
from kernels.fused_linear_cross_entropy_torch import TorchChunkBackend

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_args(hidden, weight, target, bias, reduction, label_smoothing, z_loss, softcap, num_items):
    """Raise TypeError/ValueError naming the offending argument (checks that need no sync)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    tensors = [("weight", weight), ("target", target)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    _check_options(reduction, label_smoothing, z_loss, softcap)
    if num_items is not None and reduction != "mean":
        raise ValueError(f"num_items is the 'mean' denominator; it has no effect with reduction={reduction!r}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.dim() != 0 or num_items.is_complex() or num_items.dtype == torch.bool:
                raise ValueError(f"num_items must be an int or a 0-d real tensor, got shape {tuple(num_items.shape)}")
        elif isinstance(num_items, bool) or not isinstance(num_items, int):
            raise TypeError(f"num_items must be an int, a 0-d tensor or None, got {type(num_items).__name__}")
        elif num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")


def _check_options(reduction, label_smoothing, z_loss, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (0.0 <= float(label_smoothing) < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not (float(z_loss) >= 0.0 and float(z_loss) != float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (0.0 < float(softcap) < float("inf")):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


def _valid_rows(
    y_N: torch.Tensor, vocab: int, ignore_index: int, num_items: int | torch.Tensor | None
) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """Check target values and count non-ignored rows with a single host sync.

    Returns the number of valid rows, their indices (None when every row is valid) and the
    "mean" denominator (``num_items``, else the valid count; at least 1) as a float64 tensor.
    """
    valid_N = y_N != ignore_index
    bad_N = valid_N & ((y_N < 0) | (y_N >= vocab))
    parts = [valid_N.sum(), bad_N.sum()]
    if isinstance(num_items, torch.Tensor):
        parts.append(num_items.to(y_N.device))
    values = torch.stack([p.to(torch.float64) for p in parts]).tolist()
    n_valid, n_bad = int(values[0]), int(values[1])
    if n_bad:
        examples = y_N[bad_N][:5].tolist()
        raise ValueError(
            f"target values must be in [0, V) = [0, {vocab}) or ignore_index ({ignore_index}); "
            f"found {n_bad} outside, e.g. {examples}"
        )
    items = values[2] if isinstance(num_items, torch.Tensor) else num_items
    if items is not None:
        if not items >= 0:
            raise ValueError(f"num_items must be >= 0, got {items}")
        if items == 0 and n_valid > 0:
            raise ValueError(f"num_items is 0 but {n_valid} targets are not ignored")
    rows_N = None if n_valid == y_N.numel() else torch.nonzero(valid_N).squeeze(1)
    denom = float(items) if items else max(float(n_valid), 1.0)  # items == 0 only with no valid row
    return n_valid, rows_N, torch.tensor(denom, dtype=torch.float64, device=y_N.device)


def _triton_backend():
    from kernels.fused_linear_cross_entropy_triton import TritonChunkBackend

    return TritonChunkBackend()


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    return_lse: bool = False,
    impl: KernelImpl = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, without the logits.

    Equivalent to ``F.cross_entropy((hidden @ weight.T + bias).float(), target, ...)`` plus
    ``z_loss * lse**2`` per token (see kernels/fused_linear_cross_entropy_ref.py for the exact
    specification); no path but "reference" materialises the [N, V] logits.

    Args:
        hidden: [..., D] features (float32, bfloat16, float16 or float64). Always gets a gradient
            when it requires one.
        weight: [V, D] output projection, same dtype as hidden. Gets a gradient only when it
            requires one; a frozen weight costs no weight-gradient work.
        target: hidden's leading shape, integer class indices in [0, V) or ``ignore_index``.
        bias: optional [V] bias.
        ignore_index: target value that contributes nothing (loss 0, lse 0, zero gradient).
        reduction: "mean", "sum" or "none" (per token, hidden's leading shape).
        label_smoothing: in [0, 1), as in ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient of ``lse**2`` added to each token's loss.
        softcap: if given, logits become ``softcap * tanh(logits / softcap)``.
        num_items: replaces the number of non-ignored targets as the "mean" denominator (int or
            0-d tensor), so gradient-accumulation micro-batches and data-parallel ranks can all
            divide by the global count.
        return_lse: also return the per-token log-sum-exp (differentiable; 0 where ignored).
        impl: "auto", "triton", "torch" or "reference" (see kernels/_dispatch.py).

    Returns:
        The loss (float32, or float64 for float64 inputs), and the lse when ``return_lse``.

    Raises:
        TypeError, ValueError: on bad input, naming the argument.
        RuntimeError: when the requested ``impl`` cannot run here.
    """
    _check_args(hidden, weight, target, bias, reduction, label_smoothing, z_loss, softcap, num_items)
    unsupported = NO_FLOAT64 if hidden.dtype == torch.float64 else None
    path = resolve_impl(impl, hidden.device, "fused_linear_cross_entropy", triton_unsupported=unsupported)
    y_N = target.reshape(-1).long()
    vocab = weight.shape[0]
    n_valid, rows_N, denom = _valid_rows(y_N, vocab, ignore_index, num_items)
    if path == "reference":
        return fused_linear_cross_entropy_ref(
            hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, num_items=num_items,
            return_lse=return_lse,
        )  # fmt: skip

    params = FLCEParams(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        return_lse=bool(return_lse),
    )
    backend = _triton_backend() if path == "triton" else TorchChunkBackend()
    h_ND = hidden.reshape(-1, hidden.shape[-1])
    loss, lse_N = FusedLinearCrossEntropyFunction.apply(
        h_ND, weight, bias, y_N, rows_N, n_valid, denom, params, backend, torch.is_grad_enabled()
    )
    lead_shape = hidden.shape[:-1]
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    if return_lse:
        return loss, lse_N.reshape(lead_shape)
    return loss


class FusedLinearCrossEntropy(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`; holds the options, not the weight.

    ``forward(hidden, weight, target, bias=None, num_items=None)`` returns what the function does.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        impl: KernelImpl = "auto",
    ):
        super().__init__()
        _check_options(reduction, label_smoothing, z_loss, softcap)
        check_impl_name(impl)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.impl = impl

    def forward(self, hidden, weight, target, bias=None, num_items=None):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias=bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, num_items=num_items, return_lse=self.return_lse, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"impl={self.impl!r}"
        )
