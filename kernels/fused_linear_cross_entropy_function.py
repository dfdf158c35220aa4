"""The chunked autograd Function shared by the "torch" and "triton" fused cross-entropy paths.

Non-ignored rows are processed in chunks; a backend computes, per chunk, the log-sum-exp of
the logits and, when asked, the gradient, without ever holding more than one chunk of logits.

Schedule (Liger-style, two GEMM-equivalents): when a gradient is needed, the gradient of the
token sum is computed during the forward, while the chunk's logits exist, and the backward only
scales it (by the incoming gradient and the "mean" denominator, in float32). The logits are
recomputed in the backward only when that cannot work: reduction="none" with a trainable weight
or bias (the per-token incoming gradient must weight each token before the sum over tokens that
forms dW), and a gradient flowing into the returned log-sum-exp. A frozen weight (SONAR's case) does no weight-gradient work at all.

Per valid row i, with loss weight c_i and log-sum-exp weight d_i, class weights cw (all 1 when
not given; r_i = cw[y_i] is the row's weight and S = sum_j cw[j]), the logit gradient is::

    dz_ij = (alpha_i * p_ij - beta_i * [j == y_i] - gamma_i * cw[j]) * softcap'(raw_ij)
    alpha_i = c_i * (r_i * (1 - ls + 2 * z_loss * lse_i) + ls * S / V) + d_i
    beta_i = c_i * r_i * (1 - ls),  gamma_i = c_i * ls / V

(without class weights alpha_i = c_i * (1 + 2 * z_loss * lse_i) + d_i). The z-loss part returned
with ``return_z_loss`` is differentiable too: its gradient is a log-sum-exp weight
d_i = g_i * 2 * z_loss * r_i * lse_i.

Backends implement ``chunk_rows(n_rows, vocab, dtype, device)`` and ``chunk(...)`` (ChunkBackend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable


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
    """Per-row outputs of one chunk: lse, target logit, and the sum of logits over the vocabulary
    (only with label smoothing; weighted by the class weights when given) — all float32 or
    float64 — plus the hidden gradient when asked."""

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
        """Log-sum-exp of one chunk; with ``loss_scale_C`` or ``lse_scale_C`` also the gradient:
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
    """Run every chunk; return per-valid-row stats and the gradients (dh over all N rows)."""
    acc_dtype = torch.promote_types(h_ND.dtype, torch.float32)
    device = h_ND.device
    lse_M = torch.empty(n_valid, dtype=acc_dtype, device=device)
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
        lse_M[start:stop] = res.lse_C
        target_M[start:stop] = res.target_logit_C
        if sum_M is not None:
            sum_M[start:stop] = res.sum_logit_C
        if dh_ND is not None:
            if rows_N is None:
                dh_ND[start:stop] = res.dh_CD
            else:
                dh_ND.index_copy_(0, rows_N[start:stop], res.dh_CD.to(dh_ND.dtype))
    return lse_M, target_M, sum_M, dh_ND, dw_VD, db_V


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


def _token_losses(lse_M, target_M, sum_M, r_M, cw_V, vocab: int, params: FLCEParams):
    """Per-valid-row loss and its z-loss part from the chunk statistics (NaN where lse is)."""
    ls = params.label_smoothing
    if r_M is None:
        ce_M = lse_M - (1.0 - ls) * target_M
        if sum_M is not None:
            ce_M = ce_M - ls * sum_M / vocab
        zl_M = params.z_loss * lse_M.square()
    else:
        ce_M = (1.0 - ls) * r_M * (lse_M - target_M)
        if sum_M is not None:
            ce_M = ce_M + (ls / vocab) * (cw_V.sum() * lse_M - sum_M)
        zl_M = params.z_loss * r_M * lse_M.square()
    finite_M = torch.isfinite(lse_M)
    nan = torch.tensor(float("nan"), dtype=lse_M.dtype, device=lse_M.device)
    return torch.where(finite_M, ce_M + zl_M, nan), torch.where(finite_M, zl_M, nan)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked fused linear cross-entropy. Inputs are already validated and flattened; ``cw_V``
    (class weights in the accumulation dtype, or None) gets no gradient.

    Returns the loss, the per-row log-sum-exp (differentiable only with ``return_lse``) and the
    z-loss part of the loss, reduced like the loss (differentiable only with ``return_z_loss``)."""

    @staticmethod
    def forward(
        ctx,
        h_ND: torch.Tensor,
        w_VD: torch.Tensor,
        b_V: torch.Tensor | None,
        cw_V: torch.Tensor | None,
        y_N: torch.Tensor,
        rows_N: torch.Tensor | None,
        n_valid: int,
        denom: torch.Tensor,
        params: FLCEParams,
        backend: ChunkBackend,
        grad_enabled: bool,
    ):
        # needs_input_grad ignores torch.no_grad(), so the caller passes the grad mode it saw.
        want_dh = grad_enabled and ctx.needs_input_grad[0]
        want_dw = grad_enabled and ctx.needs_input_grad[1]
        want_db = grad_enabled and b_V is not None and ctx.needs_input_grad[2]
        any_grad = want_dh or want_dw or want_db
        per_token = params.reduction == "none"
        grad_in_forward = any_grad and not (per_token and (want_dw or want_db))
        acc_dtype = torch.promote_types(h_ND.dtype, torch.float32)
        n_rows, vocab = h_ND.shape[0], w_VD.shape[0]

        # The forward's gradient is that of the unscaled token sum: 1/denom and the incoming
        # gradient (a loss scale of 2^16 under fp16 training, say) are applied together in the
        # backward, in float32, so a low-precision gradient never underflows before it is scaled.
        loss_scale_N = torch.ones(n_valid, dtype=acc_dtype, device=h_ND.device) if grad_in_forward else None
        lse_M, target_M, sum_M, dh_ND, dw_VD, db_V = _run_chunks(
            backend, h_ND, w_VD, b_V, y_N, rows_N, n_valid, params, cw_V,
            loss_scale_N=loss_scale_N, lse_scale_N=None,
            want_dh=want_dh, want_dw=want_dw, want_db=want_db,
        )  # fmt: skip

        loss_M, zl_M = _token_losses(lse_M, target_M, sum_M, _row_weights(cw_V, y_N, rows_N), cw_V, vocab, params)

        def reduce(x_M):
            if per_token:
                return _scatter_rows(x_M, rows_N, n_rows)
            if params.reduction == "sum":
                return x_M.sum()
            return x_M.sum() / denom.to(acc_dtype)

        loss, zl = reduce(loss_M), reduce(zl_M)
        lse_N = _scatter_rows(lse_M, rows_N, n_rows)

        ctx.params, ctx.backend, ctx.n_valid = params, backend, n_valid
        ctx.grad_in_forward = grad_in_forward
        ctx.wants = (want_dh, want_dw, want_db)
        ctx.grad_like = [(t.shape, t.dtype, t.device) if t is not None else None for t in (h_ND, w_VD, b_V)]
        ctx.set_materialize_grads(False)
        need_inputs = any_grad and (not grad_in_forward or params.return_lse or params.return_z_loss)
        saved = [dh_ND, dw_VD, db_V, denom]
        saved += [h_ND, w_VD, b_V, cw_V, y_N, rows_N] if need_inputs else [None] * 6
        saved += [lse_M if need_inputs and params.return_z_loss else None]
        ctx.save_for_backward(*saved)
        if not params.return_lse:
            ctx.mark_non_differentiable(lse_N)
        if not params.return_z_loss:
            ctx.mark_non_differentiable(zl)
        return loss, lse_N, zl

    @staticmethod
    @once_differentiable  # the gradient is precomputed in the forward: a double backward raises
    def backward(ctx, g_loss, g_lse, g_zl):
        dh_ND, dw_VD, db_V, denom, h_ND, w_VD, b_V, cw_V, y_N, rows_N, lse_M = ctx.saved_tensors
        params, backend = ctx.params, ctx.backend
        want_dh, want_dw, want_db = ctx.wants
        per_token = params.reduction == "none"
        grads = [None, None, None]
        if g_loss is not None and ctx.grad_in_forward:
            scale = g_loss.double() / denom if params.reduction == "mean" else g_loss.double()
            grads = [
                None if dh_ND is None else _scale_rows(dh_ND, scale.reshape(-1, 1) if per_token else scale),
                None if dw_VD is None else dw_VD * scale.to(dw_VD.dtype),
                None if db_V is None else db_V * scale.to(db_V.dtype),
            ]

        # Recompute pass: per-token loss weights that reach dW/db, and/or a gradient into lse
        # (from the returned lse, or from the returned z-loss: d(z * r * lse^2) = 2 * z * r * lse).
        if ctx.n_valid > 0 and h_ND is not None:
            acc_dtype = torch.promote_types(h_ND.dtype, torch.float32)

            def per_row(g, reduced: bool):  # an output's incoming gradient, per valid row
                if g is None:
                    return None
                g_N = g.expand(h_ND.shape[0]) if reduced and not per_token else g.reshape(-1)
                if reduced and params.reduction == "mean":
                    g_N = g_N / denom
                g_N = g_N.to(acc_dtype)
                return g_N if rows_N is None else g_N.index_select(0, rows_N)

            rec_loss = per_row(g_loss, True) if not ctx.grad_in_forward else None
            rec_lse = per_row(g_lse, False) if params.return_lse else None
            g_zl_M = per_row(g_zl, True) if params.return_z_loss and params.z_loss != 0 else None
            if g_zl_M is not None:
                r_M = _row_weights(cw_V, y_N, rows_N)
                zl_lse_M = g_zl_M * (2.0 * params.z_loss) * lse_M * (1.0 if r_M is None else r_M)
                rec_lse = zl_lse_M if rec_lse is None else rec_lse + zl_lse_M
            if rec_loss is not None or rec_lse is not None:
                _, _, _, dh2, dw2, db2 = _run_chunks(
                    backend, h_ND, w_VD, b_V, y_N, rows_N, ctx.n_valid, params, cw_V,
                    loss_scale_N=rec_loss, lse_scale_N=rec_lse,
                    want_dh=want_dh, want_dw=want_dw, want_db=want_db,
                )  # fmt: skip
                for i, extra in enumerate((dh2, dw2, db2)):
                    if extra is not None:
                        grads[i] = extra if grads[i] is None else grads[i] + extra

        # Every input that wants a gradient gets a tensor, zeros when no token reached it (all
        # targets ignored, N = 0): optimizers and accumulation code skip or break on None.
        for i, want in enumerate(ctx.wants):
            if want and grads[i] is None:
                shape, dtype, device = ctx.grad_like[i]
                grads[i] = torch.zeros(shape, dtype=dtype, device=device)
        dh, dw, db = grads
        if dw is not None:
            dw = dw.to(ctx.grad_like[1][1])
        if db is not None:
            db = db.to(ctx.grad_like[2][1])
        return dh, dw, db, None, None, None, None, None, None, None, None
