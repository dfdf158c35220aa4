"""The specification of fused linear cross-entropy: plain PyTorch with materialised logits.

This is the test oracle, the "reference" benchmark provider and the definition every fast
path must agree with. It computes the logits ``hidden @ weight.T + bias`` at the input dtype
(what plain PyTorch does), then the loss in at least float32 (float64 inputs stay float64, which
is how the tests obtain their ground truth). Per non-ignored token ``i`` with target ``y`` and
class weights ``cw`` (all 1 when not given)::

    z      = softcap * tanh(logits / softcap)          (when softcap is given)
    lse    = logsumexp(z)
    ce_i   = (1 - ls) * cw[y] * (lse - z[y]) + ls / V * sum_j cw[j] * (lse - z[j])
    zl_i   = z_loss * cw[y] * lse**2
    loss_i = ce_i + zl_i

``ce_i`` is ``F.cross_entropy(z, y, weight=cw, label_smoothing=ls, reduction="none")``; the z-loss
is weighted by the target's class weight like the cross-entropy term. A logit of -inf (a class
masked out, e.g. by the bias) has probability 0 (a target there costs +inf). A NaN or +inf logit —
NaN or inf in the inputs — makes that token's loss NaN, also under softcap, which would otherwise
map inf to a finite value; so does a row whose logits are all -inf. Ignored tokens contribute 0
and their ``lse`` is 0. "mean" divides the sums by ``num_items`` when given, else by the sum of
``cw[y]`` over the non-ignored tokens (their number without class weights); with a zero
denominator there is nothing to average and the mean is 0 (zero gradients), not NaN. ``shift = k`` scores ``hidden[..., t, :]``
against ``target[..., t + k]`` (causal language modelling), dropping the last ``k`` positions of
hidden and the first ``k`` of target.
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
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Reference linear cross-entropy; same arguments as ``sonarllm_kernels.fused_linear_cross_entropy``.

    Args:
        hidden: [..., D] input features ([..., T, D] with ``shift``).
        weight: [V, D] output projection.
        target: hidden's leading shape, class indices or ``ignore_index``.

    Returns:
        The loss (a scalar, or the per-token shape for reduction="none"), then the per-token
        log-sum-exp with ``return_lse``, then the z-loss part of the loss (reduced like the loss)
        with ``return_z_loss``.
    """
    if shift:
        hidden = hidden[..., : hidden.shape[-2] - shift, :]
        target = target[..., shift:]
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
    cw_V = None if class_weight is None else class_weight.to(acc_dtype)
    row_w_N = torch.ones_like(y_N, dtype=acc_dtype) if cw_V is None else cw_V[y_N.masked_fill(~valid_N, 0)]
    row_w_N = row_w_N * valid_N
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    ce_N = F.cross_entropy(
        logits_NV, y_N, weight=cw_V, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    zl_N = z_loss * row_w_N * lse_N.square()
    bad_N |= ~torch.isfinite(lse_N)  # every logit -inf
    nan = torch.tensor(float("nan"), dtype=acc_dtype, device=h_ND.device)
    loss_N = torch.where(valid_N, torch.where(bad_N, nan, ce_N + zl_N), 0.0)
    zl_N = torch.where(valid_N, torch.where(bad_N, nan, zl_N), 0.0)
    lse_N = torch.where(valid_N, lse_N, 0.0)

    if reduction == "mean":
        denom = row_w_N.sum() if num_items is None else torch.as_tensor(num_items, device=loss_N.device)
        denom = denom.to(acc_dtype)
        denom = torch.where(denom == 0, torch.full_like(denom, float("inf")), denom)  # nothing to average: 0
    outs = []
    for x_N in (loss_N, zl_N):
        if reduction == "none":
            outs.append(x_N.reshape(lead_shape))
        elif reduction == "sum":
            outs.append(x_N.sum())
        else:
            outs.append(x_N.sum() / denom)
    loss, zl = outs
    if not (return_lse or return_z_loss):
        return loss
    return (loss,) + ((lse_N.reshape(lead_shape),) if return_lse else ()) + ((zl,) if return_z_loss else ())
