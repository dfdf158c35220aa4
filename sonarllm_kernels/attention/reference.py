"""The specification of ``sonarllm_kernels.attention``: plain PyTorch, one sequence at a time.

This is the test oracle, the "reference" benchmark provider and the definition every fast path
must agree with. Per sequence (a batch row, or one ``cu_seqlens`` segment) with Sq queries and
Sk keys, per head::

    s[i, j] = softmax_scale * q[i] . k[j]                 (GEMM at the input dtype)
    allowed[i, j] = j <= i + (Sk - Sq)   if causal        (flash-attn's bottom-right alignment)
    p[i, :] = softmax(s[i, allowed[i]])                    (explicit, in float32; float64 stays)
    out[i]  = sum_j dropout(p)[i, j] * v[j]               (GEMM at the input dtype)

A query row with no allowed key (Sq > Sk under causal, or Sk = 0) outputs zeros, as flash-attn
does. With ``upcast=True`` q, k and v are first cast to float32 (float64 stays float64), so the
only rounding to the input dtype is the output's; the tests obtain their ground truth by calling
this function on float64 inputs. Dropout (``dropout_p > 0``) is always applied: this is a
training-mode functional, like ``flash_attn_func``; pass 0 in evaluation.

Shapes: batched q [B, Sq, H, Dh], k/v [B, Sk, H, Dh]; varlen q [Tq, H, Dh], k/v [Tk, H, Dh] with
int32 ``cu_seqlens_q/k`` [B + 1]. The reference does not validate (``sonarllm_kernels.attention`` does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _attend_one(
    q_QHD: torch.Tensor,
    k_KHD: torch.Tensor,
    v_KHD: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    upcast: bool,
) -> torch.Tensor:
    """Attention of one sequence: q [Sq, H, Dh], k/v [Sk, H, Dh] -> [Sq, H, Dh] (q's dtype)."""
    out_dtype = q_QHD.dtype
    acc_dtype = torch.promote_types(q_QHD.dtype, torch.float32)
    if upcast:
        q_QHD, k_KHD, v_KHD = (t.to(acc_dtype) for t in (q_QHD, k_KHD, v_KHD))
    n_q, n_k = q_QHD.shape[0], k_KHD.shape[0]

    s_HQK = torch.einsum("qhd,khd->hqk", q_QHD, k_KHD).to(acc_dtype) * scale
    allowed_QK = torch.ones(n_q, n_k, dtype=torch.bool, device=q_QHD.device)
    if causal:
        i_Q = torch.arange(n_q, device=q_QHD.device)
        j_K = torch.arange(n_k, device=q_QHD.device)
        allowed_QK = j_K[None, :] <= i_Q[:, None] + (n_k - n_q)
    s_HQK = s_HQK.masked_fill(~allowed_QK, float("-inf"))

    # Explicit softmax; a row with no allowed key gets p = 0 (hence a zero output).
    if n_k > 0:
        m_HQ1 = s_HQK.amax(dim=-1, keepdim=True).detach()
        m_HQ1 = torch.where(torch.isfinite(m_HQ1), m_HQ1, torch.zeros_like(m_HQ1))
        e_HQK = torch.exp(s_HQK - m_HQ1)
        l_HQ1 = e_HQK.sum(dim=-1, keepdim=True)
        p_HQK = e_HQK / torch.where(l_HQ1 > 0, l_HQ1, torch.ones_like(l_HQ1))
    else:
        p_HQK = s_HQK
    if dropout_p > 0:
        p_HQK = F.dropout(p_HQK, p=dropout_p, training=True)

    out_QHD = torch.einsum("hqk,khd->qhd", p_HQK.to(v_KHD.dtype), v_KHD)
    return out_QHD.to(out_dtype)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference attention; same arguments as ``sonarllm_kernels.attention`` (without max_seqlen/impl).

    Args:
        q: [B, Sq, H, Dh], or [Tq, H, Dh] with ``cu_seqlens_q``.
        k, v: [B, Sk, H, Dh], or [Tk, H, Dh] with ``cu_seqlens_k`` (default: ``cu_seqlens_q``).
        causal: bottom-right aligned causal mask per sequence.
        softmax_scale: default 1 / sqrt(Dh).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] cumulative sequence lengths (varlen layout).
        dropout_p: dropout probability on the attention weights (always applied when > 0).
        upcast: compute from float32 copies of q, k, v (float64 stays float64).

    Returns:
        The output, q's shape and dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if cu_seqlens_q is None:
        outs = [_attend_one(q[b], k[b], v[b], causal, scale, dropout_p, upcast) for b in range(q.shape[0])]
        return torch.stack(outs) if outs else q.new_zeros(q.shape)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_k.tolist()
    outs = [
        _attend_one(
            q[bounds_q[b] : bounds_q[b + 1]],
            k[bounds_k[b] : bounds_k[b + 1]],
            v[bounds_k[b] : bounds_k[b + 1]],
            causal, scale, dropout_p, upcast,
        )  # fmt: skip
        for b in range(len(bounds_q) - 1)
    ]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
