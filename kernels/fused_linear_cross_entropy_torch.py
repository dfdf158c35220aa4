"""The "torch" path of fused linear cross-entropy: one chunk of rows at a time, in plain PyTorch.

Used on CPU and wherever Triton is unavailable. A chunk's logits live in one float32 (float64
for float64 inputs) buffer of at most ``CHUNK_BYTES`` (plus one more with softcap, for its
derivative); every elementwise step after the GEMM runs in place on that buffer, so the
memory high-water mark is independent of the number of tokens. The GEMMs run at the input
dtype, as the reference's do.
"""

from __future__ import annotations

import torch

from kernels.fused_linear_cross_entropy_function import ChunkResult, FLCEParams

# One chunk of float32 logits. CPU GEMMs repack W on every call, so CPU chunks are large
# (1,024 rows at V = 256,206); on CUDA, where memory is the scarcer resource, 256 rows.
CHUNK_BYTES = {"cpu": 2**30, "cuda": 256 * 2**20}


class TorchChunkBackend:
    """Per-chunk math in PyTorch (see ChunkBackend in fused_linear_cross_entropy_function)."""

    def __init__(self, chunk_bytes: int | None = None):
        self.chunk_bytes = chunk_bytes

    def chunk_rows(self, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        budget = self.chunk_bytes or CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
        acc_size = torch.promote_types(dtype, torch.float32).itemsize
        return max(1, min(n_rows, budget // max(1, vocab * acc_size)))

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
        acc_dtype = torch.promote_types(h_CD.dtype, torch.float32)
        vocab = w_VD.shape[0]
        if b_V is None:
            z_CV = torch.mm(h_CD, w_VD.t())
        else:
            z_CV = torch.addmm(b_V, h_CD, w_VD.t())
        z_CV = z_CV.to(acc_dtype)  # no copy for float32/float64 inputs

        finite_C = None
        softcap_grad_CV = None
        if params.softcap is not None:
            c = params.softcap
            finite_C = ~(torch.isnan(z_CV) | (z_CV == float("inf"))).any(dim=1)  # -inf: a masked class
            z_CV.div_(c).tanh_()
            if loss_scale_C is not None or lse_scale_C is not None:
                softcap_grad_CV = 1.0 - z_CV.square()  # d(c*tanh(x/c))/dx = 1 - tanh^2
            z_CV.mul_(c)

        rows_C = torch.arange(z_CV.shape[0], device=z_CV.device)
        target_C = z_CV[rows_C, y_C]
        sum_C = None
        if params.label_smoothing > 0:  # the smoothing term's (class-weighted) sum of logits
            sum_C = z_CV.sum(dim=1) if cw_V is None else torch.mv(z_CV, cw_V)
        # log-sum-exp in place: exp(z - max) overwrites the logits (no temporary, one exp pass),
        # and is the unnormalised softmax the gradient needs. A non-finite max makes the row NaN.
        max_C = z_CV.amax(dim=1)
        e_CV = z_CV.sub_(max_C[:, None]).exp_()
        sumexp_C = e_CV.sum(dim=1)
        lse_C = max_C + sumexp_C.log()
        bad_C = ~torch.isfinite(lse_C)
        if finite_C is not None:
            bad_C |= ~finite_C
        lse_C = lse_C.masked_fill(bad_C, float("nan"))

        dh_CD = None
        if loss_scale_C is not None or lse_scale_C is not None:
            # alpha, beta, gamma of fused_linear_cross_entropy_function.py
            ls = params.label_smoothing
            c_C = loss_scale_C if loss_scale_C is not None else torch.zeros_like(lse_C)
            if cw_V is None:
                alpha_C = c_C * (1.0 + 2.0 * params.z_loss * lse_C)
                beta_C = c_C * (1.0 - ls)
            else:
                r_C = cw_V[y_C]
                alpha_C = c_C * (r_C * (1.0 - ls + 2.0 * params.z_loss * lse_C) + ls / vocab * cw_V.sum())
                beta_C = c_C * r_C * (1.0 - ls)
            if lse_scale_C is not None:
                alpha_C = alpha_C + lse_scale_C
            dz_CV = e_CV.mul_((alpha_C / sumexp_C)[:, None])  # alpha * softmax
            if ls > 0:
                gamma_C = c_C * (ls / vocab)
                if cw_V is None:
                    dz_CV.sub_(gamma_C[:, None])
                else:
                    dz_CV.addr_(gamma_C, cw_V, alpha=-1)  # - gamma_i * cw_j, in place
            dz_CV[rows_C, y_C] -= beta_C
            if softcap_grad_CV is not None:
                dz_CV.mul_(softcap_grad_CV)
            dz_lp_CV = dz_CV.to(h_CD.dtype)
            if want_dh:
                dh_CD = torch.mm(dz_lp_CV, w_VD)
            if dw_acc_VD is not None:
                dw_acc_VD.addmm_(dz_CV.t(), h_CD.to(acc_dtype))
            if db_acc_V is not None:
                db_acc_V.add_(dz_CV.sum(dim=0))
        return ChunkResult(lse_C, target_C, sum_C, dh_CD)
