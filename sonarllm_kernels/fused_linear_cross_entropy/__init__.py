"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` without the logits.

At SONAR's vocabulary (V = 256,206) the logits of 65,536 tokens take 67 GB in float32. The
"torch" and "triton" paths hold one chunk of rows at a time and never materialise [N, V];
only the "reference" path (the specification, sonarllm_kernels/fused_linear_cross_entropy/reference.py) does.
"""

from __future__ import annotations

import torch
from torch import nn

from sonarllm_kernels._dispatch import NO_FLOAT64, KernelImpl, check_impl_name, resolve_impl
from sonarllm_kernels.fused_linear_cross_entropy.function import FLCEParams, valid_rows
from sonarllm_kernels.fused_linear_cross_entropy.custom_op import flce_apply
from sonarllm_kernels.fused_linear_cross_entropy.reference import fused_linear_cross_entropy_ref

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Argument names in messages; the torch-signature adapter passes torch's names.
NAMES = {"hidden": "hidden", "weight": "weight", "bias": "bias", "class_weight": "class_weight"}


def _check_args(hidden, weight, target, bias, class_weight, reduction, label_smoothing, z_loss, softcap, shift,
                num_items, names=NAMES):  # fmt: skip
    """Raise TypeError/ValueError naming the offending argument (checks that need no sync)."""
    h_, w_, b_ = names["hidden"], names["weight"], names["bias"]
    for name, t in ((h_, hidden), (w_, weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{b_} must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"{h_} must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{w_} must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_} must have shape [V, D] with D = {h_}.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_} must have at least one row (V >= 1)")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have {h_}'s leading shape {tuple(hidden.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{h_} must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_} dtype {weight.dtype} must equal {h_} dtype {hidden.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_} dtype {bias.dtype} must equal {h_} dtype {hidden.dtype}")
    tensors = [(w_, weight), ("target", target)] + ([(b_, bias)] if bias is not None else [])
    for name, t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {h_} is on {hidden.device}")
    if class_weight is not None:
        check_class_weight(class_weight, weight.shape[0], hidden.device, names["class_weight"])
    _check_options(reduction, label_smoothing, z_loss, softcap, shift)
    if shift and hidden.dim() < 2:
        raise ValueError(f"shift needs {h_} with a time axis, [..., T, D]; got shape {tuple(hidden.shape)}")
    if shift and shift >= hidden.shape[-2]:
        raise ValueError(f"shift must be < T = {h_}.shape[-2] = {hidden.shape[-2]}, got {shift}")
    _check_num_items(num_items, reduction, class_weight is not None)


def check_class_weight(class_weight, vocab: int, device: torch.device, name: str = "class_weight") -> None:
    """Per-class weights: a floating-point [V] tensor on ``device`` that needs no gradient (their
    values, finite and >= 0, are checked with the targets, in the call's one host sync)."""
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(class_weight).__name__}")
    if not class_weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {class_weight.dtype}")
    if class_weight.shape != (vocab,):
        raise ValueError(f"{name} must have shape [V] = ({vocab},), got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"{name} is on {class_weight.device} but the input is on {device}")
    if class_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} gets no gradient; pass a tensor that does not require grad (e.g. .detach())")


def _check_options(reduction, label_smoothing, z_loss, softcap, shift=0) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (float(z_loss) >= 0.0 and float(z_loss) != float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (0.0 < float(softcap) < float("inf")):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if not isinstance(shift, int):  # bool too, as cut-cross-entropy: True is 1
        raise TypeError(f"shift must be an int >= 0, got {type(shift).__name__}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")


def _check_num_items(num_items, reduction: str, weighted: bool) -> None:
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items is the 'mean' denominator; it has no effect with reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(f"num_items must be an int or a 0-d real tensor, got shape {tuple(num_items.shape)}")
    elif isinstance(num_items, bool) or not isinstance(num_items, int | float) or (
        isinstance(num_items, float) and not weighted
    ):
        raise TypeError(
            "num_items must be an int, a 0-d tensor or None (a float only with class_weight, where it is "
            f"a sum of class weights), got {type(num_items).__name__}"
        )
    elif not 0 <= num_items < float("inf"):
        raise ValueError(f"num_items must be finite and >= 0, got {num_items}")


def _shift_targets(target: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """``target[..., t + shift]`` at position t, ``ignore_index`` in the last ``shift`` positions:
    hidden keeps its shape (no copy) and the positions without a target are skipped as ignored."""
    shifted = torch.full(target.shape, ignore_index, dtype=torch.long, device=target.device)
    shifted[..., : target.shape[-1] - shift] = target[..., shift:]
    return shifted


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    num_items: int | float | torch.Tensor | None = None,
    return_lse: bool = False,
    return_z_loss: bool = False,
    impl: KernelImpl = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, without the logits.

    Equivalent to ``F.cross_entropy((hidden @ weight.T + bias).float(), target, weight=class_weight,
    ...)`` plus ``z_loss * class_weight[target] * lse**2`` per token (see
    sonarllm_kernels/fused_linear_cross_entropy/reference.py for the exact specification); no path but
    "reference" materialises the [N, V] logits.

    Args:
        hidden: [..., D] features (float32, bfloat16, float16 or float64). Always gets a gradient
            when it requires one.
        weight: [V, D] output projection, same dtype as hidden. Gets a gradient only when it
            requires one; a frozen weight costs no weight-gradient work.
        target: hidden's leading shape, integer class indices in [0, V) or ``ignore_index``.
        bias: optional [V] bias.
        class_weight: optional [V] per-class weights (finite, >= 0, any float dtype; no gradient),
            as ``weight=`` of ``F.cross_entropy``: a token's loss is scaled by its target's weight,
            the label-smoothing term weights each class, and "mean" divides by the sum of the
            non-ignored targets' weights. The z-loss is scaled by the target's weight too.
        ignore_index: target value that contributes nothing (loss 0, lse 0, zero gradient).
        reduction: "mean", "sum" or "none" (per token, hidden's leading shape).
        label_smoothing: in [0, 1], as in ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient of ``lse**2`` added to each token's loss.
        softcap: if given, logits become ``softcap * tanh(logits / softcap)``.
        shift: causal language modelling: ``hidden[..., t, :]`` predicts ``target[..., t + shift]``
            along the time axis T = hidden.shape[-2] (as cut-cross-entropy's ``shift``; 0 <= shift
            < T). The loss is that of ``hidden[..., :-shift, :]`` against ``target[..., shift:]``;
            with reduction="none" (and for lse) its shape is ``[..., T - shift]``. No copy is made.
        num_items: replaces the "mean" denominator (the number of non-ignored targets, or the sum
            of their class weights) — an int, a 0-d tensor, or a float with ``class_weight`` — so
            gradient-accumulation micro-batches and data-parallel ranks can all divide by the
            global value. Under torch.compile pass an int or a 0-d tensor: a float's value is
            specialised, so every new value compiles a new graph.
        return_lse: also return the per-token log-sum-exp (differentiable; 0 where ignored).
        return_z_loss: also return the z-loss part of the loss, reduced like the loss (for
            logging, as Liger-Kernel's ``return_z_loss``; differentiable).
        impl: "auto", "triton", "torch" or "reference" (see sonarllm_kernels/_dispatch.py). Under
            torch.compile "triton" and "torch" are custom ops that trace without a graph break
            (sonarllm_kernels/fused_linear_cross_entropy/custom_op.py), with the same numbers and errors.

    Returns:
        The loss (float32, or float64 for float64 inputs); with ``return_lse`` and/or
        ``return_z_loss`` a tuple ``(loss, lse, z_loss)`` of the requested outputs, in that order.
        With no non-ignored target (or zero total class weight) "mean" gives 0, not NaN.

    Raises:
        TypeError, ValueError: on bad input, naming the argument.
        RuntimeError: when the requested ``impl`` cannot run here; and, on the "torch" and
            "triton" paths, from the backward when a graph of the gradient is requested
            (``create_graph=True``): their gradient is computed in the forward, so they cannot
            differentiate twice ("reference" can).
    """
    _check_args(hidden, weight, target, bias, class_weight, reduction, label_smoothing, z_loss, softcap, shift,
                num_items)  # fmt: skip
    params = FLCEParams(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        shift=int(shift),
        return_lse=bool(return_lse),
        return_z_loss=bool(return_z_loss),
    )
    unsupported = NO_FLOAT64 if hidden.dtype == torch.float64 else None
    path = resolve_impl(impl, hidden.device, "fused_linear_cross_entropy", triton_unsupported=unsupported)
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    cw_V = None if class_weight is None else class_weight.detach().to(acc_dtype).contiguous()
    shifted = _shift_targets(target, params.shift, params.ignore_index) if params.shift else target
    y_N = shifted.reshape(-1).long()
    if path == "reference":
        # The target checks on the host: under torch.compile the specification breaks the graph here.
        valid_rows(y_N, weight.shape[0], params.ignore_index, num_items, cw_V)
        return fused_linear_cross_entropy_ref(
            hidden, weight, target, bias=bias, class_weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift,
            num_items=num_items, return_lse=return_lse, return_z_loss=return_z_loss,
        )  # fmt: skip

    h_ND = hidden.reshape(-1, hidden.shape[-1])
    loss, lse_N, zl = flce_apply(h_ND, weight, bias, cw_V, y_N, num_items, params, path)

    def per_token(x_N):  # hidden's leading shape, without the last `shift` positions
        x = x_N.reshape(hidden.shape[:-1])
        return x[..., : x.shape[-1] - params.shift] if params.shift else x

    if reduction == "none":
        loss, zl = per_token(loss), per_token(zl)
    outs = (loss,) + ((per_token(lse_N),) if return_lse else ()) + ((zl,) if return_z_loss else ())
    return outs if len(outs) > 1 else loss


class FusedLinearCrossEntropy(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`; holds the options and the optional class
    weights (a buffer, as in ``nn.CrossEntropyLoss``), not the projection weight.

    ``forward(hidden, weight, target, bias=None, num_items=None)`` returns what the function does.
    """

    def __init__(
        self,
        *,
        class_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: int = 0,
        return_lse: bool = False,
        return_z_loss: bool = False,
        impl: KernelImpl = "auto",
    ):
        super().__init__()
        _check_options(reduction, label_smoothing, z_loss, softcap, shift)
        check_impl_name(impl)
        if class_weight is not None:
            check_class_weight(class_weight, class_weight.numel(), class_weight.device)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.shift = shift
        self.return_lse = return_lse
        self.return_z_loss = return_z_loss
        self.impl = impl

    def forward(self, hidden, weight, target, bias=None, num_items=None):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias=bias, class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, shift=self.shift, num_items=num_items, return_lse=self.return_lse,
            return_z_loss=self.return_z_loss, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"shift={self.shift}, class_weight={self.class_weight is not None}, impl={self.impl!r}"
        )
