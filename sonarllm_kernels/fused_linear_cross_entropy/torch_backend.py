"""The "torch" path of fused linear cross-entropy: one chunk of rows at a time, in plain PyTorch.

Used on CPU and wherever Triton is unavailable. The GEMMs run at the input dtype, as the
reference's do, into one chunk of logits; the softmax work runs in one float32 (float64 for
float64 inputs) buffer of at most ``CHUNK_BYTES`` (for 16-bit inputs the logits stay in their
own buffer beside it; with softcap one more buffer holds its derivative). Every step after the
GEMM is a single in-place or into-buffer pass, so the memory high-water mark is independent of
the number of tokens:

- stats: row max, ``z - max`` written once into the float32 buffer (on CUDA, for 16-bit
  inputs, the subtraction reads the 16-bit logits: no separate upcast pass) — the shifted target
  logit (and smoothing sum) are read from it, so the loss never subtracts two numbers of the size
  of the logits — then ``exp(z - max)`` in place, its row sum;
- gradient: ``dz = (alpha / sum) * exp(z - max) - beta * onehot`` — for 16-bit inputs without
  softcap, class-weighted smoothing or a weight/bias gradient, written straight into the 16-bit
  logits buffer (one multiply-and-round pass; the target column is recomputed in float32, so
  ``p - 1`` is rounded once); otherwise in place in float32, then rounded once.
"""

from __future__ import annotations

import torch

from sonarllm_kernels.fused_linear_cross_entropy.function import ChunkResult, FLCEParams

# One chunk of float32 logits. CPU GEMMs repack W on every call, so CPU chunks are large
# (1,024 rows at V = 256,206); on CUDA 512 rows (plus their bf16 logits): the hidden-gradient GEMM
# (K = V) needs enough rows to fill the GPU.
CHUNK_BYTES = {"cpu": 2**30, "cuda": 512 * 2**20}


class TorchChunkBackend:
    """Per-chunk math in PyTorch (see ChunkBackend in function)."""

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
        grad = loss_scale_C is not None or lse_scale_C is not None
        ls = params.label_smoothing
        z_CV = torch.mm(h_CD, w_VD.t()) if b_V is None else torch.addmm(b_V, h_CD, w_VD.t())
        low = z_CV.dtype != acc_dtype  # 16-bit logits: the float32 work goes into a second buffer
        rows_C = torch.arange(z_CV.shape[0], device=z_CV.device)

        finite_C = None
        softcap_grad_CV = None
        if params.softcap is not None or (low and ((cw_V is not None and ls > 0) or not z_CV.is_cuda)):
            # Softcap and class-weighted smoothing need the float32 logits themselves: upcast once,
            # then work in place (also on CPU, where the copy is faster than a mixed-dtype subtraction).
            f_CV = z_CV.to(acc_dtype)  # no copy for float32/float64 inputs
            if params.softcap is not None:
                c = params.softcap
                finite_C = ~(torch.isnan(f_CV) | (f_CV == float("inf"))).any(dim=1)  # -inf: a masked class
                f_CV.div_(c).tanh_()
                if grad:
                    softcap_grad_CV = 1.0 - f_CV.square()  # d(c*tanh(x/c))/dx = 1 - tanh^2
                f_CV.mul_(c)
            src_CV = f_CV
        else:
            f_CV = z_CV if not low else torch.empty(z_CV.shape, dtype=acc_dtype, device=z_CV.device)
            src_CV = z_CV

        # Everything in the frame shifted by the row max (see ChunkResult): z - max written once
        # into the float32 buffer (in place for float32 inputs), the shifted target logit and
        # smoothing sum read from it, then exp(z - max) in place, the unnormalised softmax the
        # gradient needs. A non-finite max makes the row NaN.
        max_C = src_CV.amax(dim=1).to(acc_dtype)
        shifted_CV = torch.sub(src_CV, max_C[:, None], out=f_CV)
        target_C = shifted_CV[rows_C, y_C]
        sum_C = None
        if ls > 0:  # the smoothing term's (class-weighted) sum of shifted logits
            sum_C = shifted_CV.sum(dim=1) if cw_V is None else torch.mv(shifted_CV, cw_V)
        e_CV = shifted_CV.exp_()
        sumexp_C = e_CV.sum(dim=1)
        lse_C = sumexp_C.log()
        full_lse_C = max_C + lse_C  # for the z-loss only
        bad_C = ~torch.isfinite(full_lse_C)
        if finite_C is not None:
            bad_C |= ~finite_C
        lse_C = lse_C.masked_fill(bad_C, float("nan"))
        full_lse_C = full_lse_C.masked_fill(bad_C, float("nan"))

        dh_CD = None
        if grad:
            # alpha, beta, gamma of function.py
            c_C = loss_scale_C if loss_scale_C is not None else torch.zeros_like(lse_C)
            if cw_V is None:
                alpha_C = c_C * (1.0 + 2.0 * params.z_loss * full_lse_C)
                beta_C = c_C * (1.0 - ls)
            else:
                r_C = cw_V[y_C]
                alpha_C = c_C * (r_C * (1.0 - ls + 2.0 * params.z_loss * full_lse_C) + ls / vocab * cw_V.sum())
                beta_C = c_C * r_C * (1.0 - ls)
            if lse_scale_C is not None:
                alpha_C = alpha_C + lse_scale_C
            p_scale_C = alpha_C / sumexp_C  # dz = p_scale * exp(z - max) - ...
            gamma_C = c_C * (ls / vocab)
            plain = softcap_grad_CV is None and (ls == 0 or cw_V is None)
            direct = low and plain and dw_acc_VD is None and db_acc_V is None
            if direct:  # one pass: float32 in, rounded once into the 16-bit logits buffer
                dz_CV = z_CV
                if ls > 0:
                    torch.addcmul(-gamma_C[:, None], e_CV, p_scale_C[:, None], out=dz_CV)
                else:
                    torch.mul(e_CV, p_scale_C[:, None], out=dz_CV)
                # the target column again in float32, so that p - 1 is rounded once
                dz_CV[rows_C, y_C] = (e_CV[rows_C, y_C] * p_scale_C - beta_C - gamma_C).to(dz_CV.dtype)
            else:
                dz_CV = e_CV.mul_(p_scale_C[:, None])
                if ls > 0:
                    if cw_V is None:
                        dz_CV.sub_(gamma_C[:, None])
                    else:
                        dz_CV.addr_(gamma_C, cw_V, alpha=-1)  # - gamma_i * cw_j, in place
                dz_CV[rows_C, y_C] -= beta_C
                if softcap_grad_CV is not None:
                    dz_CV.mul_(softcap_grad_CV)
                if dw_acc_VD is not None:
                    dw_acc_VD.addmm_(dz_CV.t(), h_CD.to(acc_dtype))
                if db_acc_V is not None:
                    db_acc_V.add_(dz_CV.sum(dim=0))
                if low and want_dh:
                    dz_CV = z_CV.copy_(dz_CV)  # round once, into the 16-bit logits buffer
            if want_dh:
                dh_CD = torch.mm(dz_CV, w_VD)
        return ChunkResult(max_C, lse_C, target_C, sum_C, dh_CD)
