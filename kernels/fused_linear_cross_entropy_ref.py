"""The specification of fused linear cross-entropy: plain PyTorch with materialised logits.

This is the test oracle, the "reference" benchmark provider and the definition every fast
path must agree with. It computes the logits ``hidden @ weight.T + bias`` at the input dtype
(what plain PyTorch does), then the loss in at least float32 (float64 inputs stay float64, which
is how the tests obtain their ground truth). Per non-ignored token ``i`` with target ``y``::

    z      = softcap * tanh(logits / softcap)          (when softcap is given)
    lse    = logsumexp(z)
    loss_i = (1 - ls) * (lse - z[y]) + ls * (lse - mean(z)) + z_loss * lse**2

which is ``F.cross_entropy(z, y, label_smoothing=ls)`` plus the z-loss. A logit of -inf (a
class masked out, e.g. by the bias) has probability 0 (a target there costs +inf). A NaN or
+inf logit — NaN or inf in the inputs — makes that token's loss NaN, also under softcap, which
would otherwise map inf to a finite value; so does a row whose logits are all -inf. Ignored tokens contribute 0 and their ``lse`` is 0.
"mean" divides the sum by ``num_items`` when given, else by the number of non-ignored
tokens; with no such token the loss is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_linear_cross_entropy_ref(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference linear cross-entropy; same arguments as ``kernels.fused_linear_cross_entropy``.

    Args:
        hidden: [..., D] input features.
        weight: [V, D] output projection.
        target: hidden's leading shape, class indices or ``ignore_index``.

    Returns:
        The loss (a scalar, or hidden's leading shape for reduction="none"), and with
        ``return_lse`` also the per-token log-sum-exp (hidden's leading shape).
    """
    lead_shape = hidden.shape[:-1]
    h_ND = hidden.reshape(-1, hidden.shape[-1])
    y_N = target.reshape(-1).long()
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)

    raw_NV = F.linear(h_ND, weight, bias).to(acc_dtype)
    logits_NV = raw_NV
    if softcap is not None:
        logits_NV = softcap * torch.tanh(raw_NV / softcap)
    bad_N = (torch.isnan(raw_NV) | (raw_NV == float("inf"))).any(dim=-1)

    valid_N = y_N != ignore_index
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    ce_N = F.cross_entropy(
        logits_NV, y_N, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    loss_N = ce_N + z_loss * lse_N.square()
    bad_N |= ~torch.isfinite(lse_N)  # every logit -inf
    loss_N = torch.where(bad_N, torch.full_like(loss_N, float("nan")), loss_N)
    loss_N = torch.where(valid_N, loss_N, torch.zeros_like(loss_N))
    lse_N = torch.where(valid_N, lse_N, torch.zeros_like(lse_N))

    if reduction == "none":
        loss = loss_N.reshape(lead_shape)
    elif reduction == "sum":
        loss = loss_N.sum()
    else:
        denom = valid_N.sum() if num_items is None else torch.as_tensor(num_items, device=loss_N.device)
        loss = loss_N.sum() / denom.to(acc_dtype).clamp_min(1)
    if return_lse:
        return loss, lse_N.reshape(lead_shape)
    return loss
