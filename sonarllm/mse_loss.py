"""The MSE-LCM baseline objective: next-sentence embedding regression (LCM ``next_sentence_mse``).

The concept transformer's prediction at position t is compared with the true embedding of
sentence t + 1. Per predicted vector the loss is the **sum over the E channels** of the squared
error (not a channel mean: LCM's ``compute_rmse=False`` path), measured in the normalized space
when the model has a SONAR normalizer::

    l_n = sum_e ((pred[n, e] - target[n, e]) / scale[e]) ** 2          (scale = 1 without one)

Since ``normalize(x) = (x - center) / scale``, this is exactly ``||normalize(pred) -
normalize(target)||^2``: the center cancels. The model's predictions are denormalized, so
``scale`` recovers the normalized-space error without a second pass through the normalizer.

Reductions over the counted predictions (``mask`` True, all by default):

    "mean": sum_n l_n / num_items   (num_items defaults to the number of counted predictions)
    "sum":  sum_n l_n               (what LCM's recipes use)
    "none": l [...] per prediction, 0 where the mask is False

``num_items`` lets gradient-accumulation micro-batches and data-parallel ranks divide by the
global number of predictions, so that accumulated gradients equal those of one big batch.
Arithmetic is float32 (float64 inputs stay float64); the loss is returned in that dtype.

Shifting is the caller's job (``min_context_size = 1``: the first sentence is never a target)::

    # right-padded documents [B, S, E] with a validity mask valid_BS (True = a real sentence)
    pred_BSE = model(embeds_BSE)
    loss = mse(pred_BSE[:, :-1], embeds_BSE[:, 1:], mask=valid_BS[:, 1:])

    # packed documents [T, E] with int32 cu_seqlens [B + 1]
    pred_TE = model(embeds_TE, cu_seqlens=cu, max_seqlen=m)
    mask_T = torch.ones(T - 1, dtype=torch.bool); mask_T[cu[1:-1].long() - 1] = False
    loss = mse(pred_TE[:-1], embeds_TE[1:], mask=mask_T)   # no target across documents

Shape legend: N = predictions (any leading shape "..."), E = SONAR dim.
"""

from __future__ import annotations

import torch
from torch import nn

REDUCTIONS = ("mean", "sum", "none")


def _check_args(pred, target, scale, mask, reduction, num_items) -> None:
    """Raise TypeError/ValueError naming the offending argument (no host sync)."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if pred.dim() < 1:
        raise ValueError("pred must have shape [..., E], got a 0-d tensor")
    if target.shape != pred.shape:
        raise ValueError(
            f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    if scale is not None:
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"scale must be a torch.Tensor or None, got {type(scale).__name__}")
        if scale.shape != (pred.shape[-1],):
            raise ValueError(
                f"scale must have shape [E] = ({pred.shape[-1]},), got {tuple(scale.shape)}"
            )
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a float tensor, got {scale.dtype}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = counted), got {mask.dtype}")
        if mask.shape != pred.shape[:-1]:
            raise ValueError(
                f"mask must have pred's leading shape {tuple(pred.shape[:-1])}, got {tuple(mask.shape)}"
            )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None:
        if reduction != "mean":
            raise ValueError(
                f"num_items only applies to reduction='mean', got reduction={reduction!r}"
            )
        if isinstance(num_items, torch.Tensor):
            if num_items.dim() != 0 or num_items.dtype == torch.bool or num_items.is_complex():
                raise ValueError(
                    f"num_items must be an int or a 0-d real tensor, got shape {tuple(num_items.shape)}"
                )
        elif isinstance(num_items, bool) or not isinstance(num_items, int):
            raise TypeError(
                f"num_items must be an int, a 0-d tensor or None, got {type(num_items).__name__}"
            )
        elif num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")


def next_sentence_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed-over-channels squared error of each prediction, reduced (see the module docstring).

    Args:
        pred: [..., E] predicted next-sentence embeddings (already aligned with ``target``).
        target: [..., E] true next-sentence embeddings.
        scale: [E] normalizer scale (the error is divided by it), or None (raw space).
        mask: bool [...], True for the predictions that count; None counts all.
        reduction: "mean", "sum" or "none".
        num_items: "mean" denominator (int >= 1 or 0-d tensor) replacing the number of counted
            predictions, e.g. the global count over accumulation steps and ranks.

    Returns:
        A 0-d loss ("mean", "sum"), or [...] per-prediction losses ("none"), in float32
        (float64 for float64 inputs). "mean" over zero counted predictions is 0.
    """
    _check_args(pred, target, scale, mask, reduction, num_items)
    acc = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    err = pred.to(acc) - target.to(acc)
    if scale is not None:
        err = err / scale.to(device=pred.device, dtype=acc)
    loss_N = err.square().sum(dim=-1)
    if mask is not None:
        loss_N = torch.where(mask, loss_N, torch.zeros((), dtype=acc, device=loss_N.device))
    if reduction == "none":
        return loss_N
    total = loss_N.sum()
    if reduction == "sum":
        return total
    if num_items is None:
        count = loss_N.numel() if mask is None else mask.sum()
        denom = torch.as_tensor(count, dtype=acc, device=total.device).clamp_min(1)
    elif isinstance(num_items, torch.Tensor):
        denom = num_items.to(device=total.device, dtype=acc)
    else:  # an int divides as it is: under torch.compile a tensor made of it would pin its value
        denom = num_items
    return total / denom


class NextSentenceMSELoss(nn.Module):
    """Module form of :func:`next_sentence_mse` that remembers the reduction and the scale.

    Args:
        reduction: "mean" (default), "sum" or "none".
        scale: [E] normalizer scale to measure the error in normalized space, or None. Kept as a
            non-persistent float32 buffer (it follows ``.to(device)``; it belongs to the model's
            checkpoint, not to the loss's). See :meth:`for_model`.
    """

    def __init__(self, reduction: str = "mean", *, scale: torch.Tensor | None = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if scale is not None:
            if (
                not isinstance(scale, torch.Tensor)
                or scale.dim() != 1
                or not scale.is_floating_point()
            ):
                raise ValueError(f"scale must be a 1-d float tensor [E] or None, got {scale!r}")
            scale = scale.detach().to(torch.promote_types(scale.dtype, torch.float32), copy=True)
        self.reduction = reduction
        self.register_buffer("scale", scale, persistent=False)

    @classmethod
    def for_model(cls, model: nn.Module, reduction: str = "mean") -> NextSentenceMSELoss:
        """The loss in the normalized space of ``model`` (a ``sonarllm.SonarLLM``) when it has a
        normalizer, else in raw space. Copies the current scale: rebuild after refitting."""
        if not hasattr(model, "get_normalizer"):
            raise TypeError(
                f"model must be a sonarllm.SonarLLM (with get_normalizer), got {type(model).__name__}"
            )
        norm = model.get_normalizer()
        return cls(reduction, scale=None if norm is None else norm.scale)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        num_items: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :func:`next_sentence_mse` (pred, target [..., E]; mask bool [...])."""
        return next_sentence_mse(
            pred, target, scale=self.scale, mask=mask, reduction=self.reduction, num_items=num_items
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, normalized={self.scale is not None}"
