"""The chunked forward and backward shared by the "torch" and "triton" fused cross-entropy paths
(registered as the custom ops of sonarllm_kernels/fused_linear_cross_entropy/custom_op.py).

Non-ignored rows are processed in chunks; a backend computes, per chunk, the log-sum-exp of
the logits and, when asked, the gradient, without ever holding more than one chunk of logits.

Schedule (Liger-style, two GEMM-equivalents): when a gradient is needed, the gradient of the
token sum is computed during the forward, while the chunk's logits exist, and the backward only
scales it (by the incoming gradient and the "mean" denominator, in float32). The logits are
recomputed in the backward only when that cannot work: reduction="none" with a trainable weight
or bias (the per-token incoming gradient must weight each token before the sum over tokens that
forms dW), and a gradient flowing into the returned log-sum-exp (or z-loss). A frozen weight
(SONAR's case) does no weight-gradient work at all.

Per valid row i, with loss weight c_i and log-sum-exp weight d_i, class weights cw (all 1 when
not given; r_i = cw[y_i] is the row's weight and S = sum_j cw[j]), the logit gradient is::

    dz_ij = (alpha_i * p_ij - beta_i * [j == y_i] - gamma_i * cw[j]) * softcap'(raw_ij)
    alpha_i = c_i * (r_i * (1 - ls + 2 * z_loss * lse_i) + ls * S / V) + d_i
    beta_i = c_i * r_i * (1 - ls),  gamma_i = c_i * ls / V

(without class weights alpha_i = c_i * (1 + 2 * z_loss * lse_i) + d_i). The z-loss part returned
with ``return_z_loss`` is differentiable too: its gradient is a log-sum-exp weight
d_i = g_i * 2 * z_loss * r_i * lse_i.

Precision at large logits: backends work in the frame shifted by the row's largest logit m_i
(ChunkResult). The loss is ``lse'_i - (z_iy - m_i)`` with ``lse'_i = log(sum_j exp(z_ij - m_i))``
and the softmax ``p_ij = exp((z_ij - m_i) - lse'_i)``, never ``lse_i - z_iy`` or
``exp(z_ij - lse_i)``: ``lse_i = m_i + lse'_i`` is rounded at the size of m_i (an error of 1e-3 at
logits of 1e4 in float32), which would pass into a loss and a softmax that are much smaller.

Backends implement ``chunk_rows(n_rows, vocab, dtype, device)`` and ``chunk(...)`` (ChunkBackend).

Size: a little over 400 lines, one idea (the chunk schedule, its per-token math in the
max-shifted frame and the autograd glue); split, its halves would each need the other to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class FLCEParams:
    """The non-tensor options of one call (one argument for the autograd Function).

    ``shift`` is applied to the targets before the Function runs; it is kept here so that all
    options of a call travel together."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    shift: int
    return_lse: bool
    return_z_loss: bool


@dataclass
class ChunkResult:
    """Per-row outputs of one chunk, all float32 (float64 for float64 inputs), in the frame
    shifted by the row's largest logit ``m``: ``m`` itself, the shifted log-sum-exp
    ``log(sum_j exp(z_j - m))`` (NaN where the row's loss is NaN), the shifted target logit
    ``z_y - m``, and the shifted sum ``sum_j cw[j] * (z_j - m)`` over the vocabulary (only with
    label smoothing; cw all 1 without class weights) — plus the hidden gradient when asked.

    Why shifted: the loss ``lse - z_y`` is small next to logits of 1e4, and a log-sum-exp
    rounded at the size of the top logit before the subtraction would carry an error of that
    size; every shifted value is of the size of the loss, so the loss's error is too."""

    max_C: torch.Tensor
    lse_C: torch.Tensor
    target_logit_C: torch.Tensor
    sum_logit_C: torch.Tensor | None
    dh_CD: torch.Tensor | None


class ChunkBackend(Protocol):
    def chunk_rows(self, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        """How many rows one chunk holds."""

    def chunk(
        self,
        h_CD: torch.Tensor,
        w_VD: torch.Tensor,
        b_V: torch.Tensor | None,
        y_C: torch.Tensor,
        params: FLCEParams,
        *,
        cw_V: torch.Tensor | None,
        loss_scale_C: torch.Tensor | None,
        lse_scale_C: torch.Tensor | None,
        want_dh: bool,
        dw_acc_VD: torch.Tensor | None,
        db_acc_V: torch.Tensor | None,
    ) -> ChunkResult:
        """Statistics of one chunk; with ``loss_scale_C`` or ``lse_scale_C`` also the gradient:
        returned for hidden (``want_dh``), added into the float32 accumulators for weight/bias.
        ``cw_V``: class weights (float32, float64 for float64 inputs, contiguous) or None."""


def _chunks(n_valid: int, rows_per_chunk: int):
    for start in range(0, n_valid, rows_per_chunk):
        yield start, min(start + rows_per_chunk, n_valid)


def _gather(x: torch.Tensor, rows_N: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    if rows_N is None:
        return x[start:stop]
    return x.index_select(0, rows_N[start:stop])


def _run_chunks(
    backend: ChunkBackend,
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    b_V: torch.Tensor | None,
    y_N: torch.Tensor,
    rows_N: torch.Tensor | None,
    n_valid: int,
    params: FLCEParams,
    cw_V: torch.Tensor | None,
    *,
    loss_scale_N: torch.Tensor | None,
    lse_scale_N: torch.Tensor | None,
    want_dh: bool,
    want_dw: bool,
    want_db: bool,
):
    """Run every chunk; return the per-valid-row stats ``(max_M, lse_M, target_M, sum_M)`` (the
    shifted frame of ChunkResult) and the gradients (dh over all N rows)."""
    acc_dtype = torch.promote_types(h_ND.dtype, torch.float32)
    device = h_ND.device
    max_M = torch.empty(n_valid, dtype=acc_dtype, device=device)
    lse_M = torch.empty_like(max_M)
    target_M = torch.empty_like(lse_M)
    sum_M = torch.empty_like(lse_M) if params.label_smoothing > 0 else None
    grad = loss_scale_N is not None or lse_scale_N is not None
    dh_ND = torch.zeros_like(h_ND) if grad and want_dh else None
    dw_VD = torch.zeros(w_VD.shape, dtype=acc_dtype, device=device) if grad and want_dw else None
    db_V = torch.zeros(w_VD.shape[0], dtype=acc_dtype, device=device) if grad and want_db else None

    rows_per_chunk = backend.chunk_rows(n_valid, w_VD.shape[0], h_ND.dtype, device)
    for start, stop in _chunks(n_valid, rows_per_chunk):
        res = backend.chunk(
            _gather(h_ND, rows_N, start, stop),
            w_VD,
            b_V,
            _gather(y_N, rows_N, start, stop),
            params,
            cw_V=cw_V,
            loss_scale_C=None if loss_scale_N is None else loss_scale_N[start:stop],
            lse_scale_C=None if lse_scale_N is None else lse_scale_N[start:stop],
            want_dh=dh_ND is not None,
            dw_acc_VD=dw_VD,
            db_acc_V=db_V,
        )
        max_M[start:stop] = res.max_C
        lse_M[start:stop] = res.lse_C
        target_M[start:stop] = res.target_logit_C
        if sum_M is not None:
            sum_M[start:stop] = res.sum_logit_C
        if dh_ND is not None:
            if rows_N is None:
                dh_ND[start:stop] = res.dh_CD
            else:
                dh_ND.index_copy_(0, rows_N[start:stop], res.dh_CD.to(dh_ND.dtype))
    return (max_M, lse_M, target_M, sum_M), dh_ND, dw_VD, db_V


def _scale_rows(x_ND: torch.Tensor, scale: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """``x * scale`` computed in float32 (float64 for float64) and rounded once to x's dtype,
    a block of rows at a time so the temporary stays small. ``scale`` is 0-d or [N, 1]."""
    acc_dtype = torch.promote_types(x_ND.dtype, torch.float32)
    scale = scale.to(acc_dtype)
    if x_ND.dtype == acc_dtype:
        return x_ND * scale
    out = torch.empty_like(x_ND)
    for start in range(0, x_ND.shape[0], block):
        s = scale if scale.dim() == 0 else scale[start : start + block]
        out[start : start + block] = (x_ND[start : start + block].to(acc_dtype) * s).to(x_ND.dtype)
    return out


def _scatter_rows(values_M: torch.Tensor, rows_N: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    if rows_N is None:
        return values_M
    out_N = values_M.new_zeros(n_rows)
    return out_N.index_copy_(0, rows_N, values_M)


def _row_weights(cw_V: torch.Tensor | None, y_N: torch.Tensor, rows_N: torch.Tensor | None) -> torch.Tensor | None:
    """The class weight of each valid row's target (None without class weights)."""
    if cw_V is None:
        return None
    return cw_V[y_N if rows_N is None else y_N.index_select(0, rows_N)]


def _token_losses(stats, r_M, cw_V, vocab: int, params: FLCEParams):
    """Per-valid-row loss, its z-loss part and the log-sum-exp ``m + lse'`` from the chunk
    statistics (NaN where lse is).

    The cross-entropy is shift-invariant, so it is computed from the shifted values alone
    (``lse - z_y = lse' - (z_y - m)``; the smoothing sum likewise): its error scales with the
    loss, not with the logits. Only the z-loss needs the log-sum-exp itself."""
    max_M, lse_M, target_M, sum_M = stats
    ls = params.label_smoothing
    full_lse_M = max_M + lse_M
    if r_M is None:
        ce_M = lse_M - (1.0 - ls) * target_M
        if sum_M is not None:
            ce_M = ce_M - ls * sum_M / vocab
        zl_M = params.z_loss * full_lse_M.square()
    else:
        ce_M = (1.0 - ls) * r_M * (lse_M - target_M)
        if sum_M is not None:
            ce_M = ce_M + (ls / vocab) * (cw_V.sum() * lse_M - sum_M)
        zl_M = params.z_loss * r_M * full_lse_M.square()
    finite_M = torch.isfinite(full_lse_M)
    nan = torch.tensor(float("nan"), dtype=lse_M.dtype, device=lse_M.device)
    full_lse_M = torch.where(finite_M, full_lse_M, nan)
    return torch.where(finite_M, ce_M + zl_M, nan), torch.where(finite_M, zl_M, nan), full_lse_M


def grad_in_forward(reduction: str, want_dh: bool, want_dw: bool, want_db: bool) -> bool:
    """Whether the forward computes the gradient (see the module docstring's schedule)."""
    return (want_dh or want_dw or want_db) and not (reduction == "none" and (want_dw or want_db))


def saves_inputs(params: FLCEParams, want_dh: bool, want_dw: bool, want_db: bool) -> bool:
    """Whether the backward needs the inputs (a recompute pass may run)."""
    any_grad = want_dh or want_dw or want_db
    in_forward = grad_in_forward(params.reduction, want_dh, want_dw, want_db)
    return any_grad and (not in_forward or params.return_lse or params.return_z_loss)


def valid_rows(
    y_N: torch.Tensor,
    vocab: int,
    ignore_index: int,
    num_items: int | float | torch.Tensor | None,
    cw_V: torch.Tensor | None,
) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """Check target values (and class weights) and count non-ignored rows with one host sync.

    Returns the number of valid rows, their indices (None when every row is valid) and the
    "mean" denominator as a float64 tensor: ``num_items``, else the valid count (the sum of the
    valid targets' class weights with ``cw_V``). A zero denominator (nothing to average over)
    is returned as +inf, so that the "mean" and its gradients are 0 — also where label
    smoothing spreads loss onto classes of non-zero weight.
    """
    valid_N = y_N != ignore_index
    bad_N = valid_N & ((y_N < 0) | (y_N >= vocab))
    parts = [valid_N.sum(), bad_N.sum()]
    if cw_V is not None:
        bad_w_V = ~torch.isfinite(cw_V) | (cw_V < 0)
        safe_N = torch.where(valid_N & ~bad_N, y_N, 0)
        parts += [bad_w_V.sum(), (cw_V.double()[safe_N] * valid_N).sum()]
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
    base = float(n_valid)
    if cw_V is not None:
        if values[2]:
            examples = cw_V[bad_w_V][:5].tolist()
            raise ValueError(
                "class weights (class_weight; weight in linear_cross_entropy) must be finite and >= 0; "
                f"found {int(values[2])} others, e.g. {examples}"
            )
        base = values[3]
    items = values[-1] if isinstance(num_items, torch.Tensor) else num_items
    if items is not None:
        if not 0 <= items < float("inf"):
            raise ValueError(f"num_items must be finite and >= 0, got {items}")
        if items == 0 and base > 0:
            what = f"{n_valid} targets are not ignored" if cw_V is None else f"the targets' class weights sum to {base}"
            raise ValueError(f"num_items is 0 but {what}")
    rows_N = None if n_valid == y_N.numel() else torch.nonzero(valid_N).squeeze(1)
    denom = float(items) if items else (base if base > 0 else float("inf"))
    return n_valid, rows_N, torch.tensor(denom, dtype=torch.float64, device=y_N.device)


def flce_forward(
    backend: ChunkBackend,
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    b_V: torch.Tensor | None,
    cw_V: torch.Tensor | None,
    y_N: torch.Tensor,
    num_items: int | float | torch.Tensor | None,
    params: FLCEParams,
    want_dh: bool,
    want_dw: bool,
    want_db: bool,
):
    """The forward: check the targets, compact the valid rows, run the chunks.

    Inputs are validated (but for the values checked here) and flattened; ``cw_V`` (class
    weights in the accumulation dtype, or None) gets no gradient; ``want_*``: the inputs whose
    gradient is wanted. Returns ``(loss, lse_N, zl, dh_ND, dw_VD, db_V, denom)``: the loss, the
    per-row log-sum-exp (0 where ignored), the z-loss part reduced like the loss, the gradient
    of the unscaled token sum when computed here (else None) and the "mean" denominator."""
    n_valid, rows_N, denom = valid_rows(y_N, w_VD.shape[0], params.ignore_index, num_items, cw_V)
    in_forward = grad_in_forward(params.reduction, want_dh, want_dw, want_db)
    acc_dtype = torch.promote_types(h_ND.dtype, torch.float32)
    n_rows, vocab = h_ND.shape[0], w_VD.shape[0]
    per_token = params.reduction == "none"

    # The forward's gradient is that of the unscaled token sum: 1/denom and the incoming
    # gradient (a loss scale of 2^16 under fp16 training, say) are applied together in the
    # backward, in float32, so a low-precision gradient never underflows before it is scaled.
    loss_scale_N = torch.ones(n_valid, dtype=acc_dtype, device=h_ND.device) if in_forward else None
    stats, dh_ND, dw_VD, db_V = _run_chunks(
        backend, h_ND, w_VD, b_V, y_N, rows_N, n_valid, params, cw_V,
        loss_scale_N=loss_scale_N, lse_scale_N=None,
        want_dh=want_dh, want_dw=want_dw, want_db=want_db,
    )  # fmt: skip

    loss_M, zl_M, lse_M = _token_losses(stats, _row_weights(cw_V, y_N, rows_N), cw_V, vocab, params)

    def reduce(x_M):
        if per_token:
            return _scatter_rows(x_M, rows_N, n_rows)
        if params.reduction == "sum":
            return x_M.sum()
        return x_M.sum() / denom.to(acc_dtype)

    return reduce(loss_M), _scatter_rows(lse_M, rows_N, n_rows), reduce(zl_M), dh_ND, dw_VD, db_V, denom


def flce_backward(
    backend: ChunkBackend,
    params: FLCEParams,
    grads_out: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    forward_grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    denom: torch.Tensor,
    inputs: tuple | None,
    lse_N: torch.Tensor | None,
    wants: tuple[bool, bool, bool],
    grad_like: list,
    y_N: torch.Tensor | None = None,
):
    """The backward: scale the forward's gradient, recompute where the schedule needs it.

    Args:
        grads_out: incoming gradients of (loss, lse_N, zl), None where none arrived.
        forward_grads: (dh_ND, dw_VD, db_V) of ``flce_forward``.
        inputs: (h_ND, w_VD, b_V, cw_V, y_N) when ``saves_inputs``, else None.
        lse_N: the forward's lse, with ``inputs`` and ``return_z_loss``.
        wants: (want_dh, want_dw, want_db) of the forward.
        grad_like: (shape, dtype, device) of hidden, weight and bias (None where absent).
        y_N: the targets, for reduction "none": an ignored row's incoming gradient is not used
            (0 * NaN would make its zero gradient NaN; the reference's masking gives 0).

    Returns ``(dh, dw, db)``: a tensor for every wanted input (zeros when no token reached
    it), None for the others.
    """
    g_loss, g_lse, g_zl = grads_out
    dh_ND, dw_VD, db_V = forward_grads
    want_dh, want_dw, want_db = wants
    per_token = params.reduction == "none"
    in_forward = grad_in_forward(params.reduction, *wants)
    grads = [None, None, None]
    if g_loss is not None and in_forward:
        scale = g_loss.double() / denom if params.reduction == "mean" else g_loss.double()
        if per_token and y_N is not None:
            scale = torch.where(y_N.reshape(-1) != params.ignore_index, scale, 0.0)
        grads = [
            None if dh_ND is None else _scale_rows(dh_ND, scale.reshape(-1, 1) if per_token else scale),
            None if dw_VD is None else dw_VD * scale.to(dw_VD.dtype),
            None if db_V is None else db_V * scale.to(db_V.dtype),
        ]

    # Recompute pass: per-token loss weights that reach dW/db, and/or a gradient into lse
    # (from the returned lse, or from the returned z-loss: d(z * r * lse^2) = 2 * z * r * lse).
    if inputs is not None:
        h_ND, w_VD, b_V, cw_V, y_N = inputs
        valid_N = y_N != params.ignore_index
        n_valid = int(valid_N.sum())  # a host sync, in recomputing backwards only
        rows_N = None if n_valid == y_N.numel() else torch.nonzero(valid_N).squeeze(1)
        acc_dtype = torch.promote_types(h_ND.dtype, torch.float32)

        def per_row(g, reduced: bool):  # an output's incoming gradient, per valid row
            if g is None:
                return None
            g_N = g.expand(h_ND.shape[0]) if reduced and not per_token else g.reshape(-1)
            if reduced and params.reduction == "mean":
                g_N = g_N / denom
            g_N = g_N.to(acc_dtype)
            return g_N if rows_N is None else g_N.index_select(0, rows_N)

        rec_loss = per_row(g_loss, True) if not in_forward else None
        rec_lse = per_row(g_lse, False) if params.return_lse else None
        g_zl_M = per_row(g_zl, True) if params.return_z_loss and params.z_loss != 0 else None
        if g_zl_M is not None:
            r_M = _row_weights(cw_V, y_N, rows_N)
            lse_M = lse_N if rows_N is None else lse_N.index_select(0, rows_N)
            zl_lse_M = g_zl_M * (2.0 * params.z_loss) * lse_M * (1.0 if r_M is None else r_M)
            rec_lse = zl_lse_M if rec_lse is None else rec_lse + zl_lse_M
        if n_valid > 0 and (rec_loss is not None or rec_lse is not None):
            _, dh2, dw2, db2 = _run_chunks(
                backend, h_ND, w_VD, b_V, y_N, rows_N, n_valid, params, cw_V,
                loss_scale_N=rec_loss, lse_scale_N=rec_lse,
                want_dh=want_dh, want_dw=want_dw, want_db=want_db,
            )  # fmt: skip
            for i, extra in enumerate((dh2, dw2, db2)):
                if extra is not None:
                    grads[i] = extra if grads[i] is None else grads[i] + extra

    # Every input that wants a gradient gets a tensor, zeros when no token reached it (all
    # targets ignored, N = 0): optimizers and accumulation code skip or break on None.
    for i, want in enumerate(wants):
        if want and grads[i] is None:
            shape, dtype, device = grad_like[i]
            grads[i] = torch.zeros(shape, dtype=dtype, device=device)
    dh, dw, db = grads
    if dw is not None:
        dw = dw.to(grad_like[1][1])
    if db is not None:
        db = db.to(grad_like[2][1])
    return dh, dw, db
