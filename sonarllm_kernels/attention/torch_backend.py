"""The "torch" path of ``sonarllm_kernels.attention``: PyTorch's ``scaled_dot_product_attention``.

Used on CPU, wherever Triton is missing, and whenever dropout is asked for (our Triton kernels
have none). SDPA picks its own backend (flash / memory-efficient / cuDNN on CUDA, a fused or
math kernel on CPU); this module only adapts layouts and masks:

* batched q [B, Sq, H, Dh]: transposed views to SDPA's [B, H, S, Dh]; ``is_causal`` when
  Sq == Sk, ``causal_lower_right`` (flash-attn's bottom-right alignment) when Sq < Sk, and an
  explicit mask when Sq > Sk;
* varlen q [Tq, H, Dh]: every sequence is gathered into a zero-padded [B, H, Smax, Dh] batch,
  attended, and scattered back. Causal self-attention (k/v share q's cu_seqlens, the SONAR
  decoder's case) needs no mask at all; otherwise a boolean [B, 1, Smax_q, Smax_k] mask holds
  the key padding and the per-sequence causal diagonal. Index maps are built on the device from
  ``cu_seqlens`` and ``max_seqlen``, so this path adds no host sync. Padding costs compute
  (Smax^2 per sequence instead of S^2; mean 15 vs max 60 tokens wastes most of it).

SDPA backends disagree on rows with no allowed key (NaN, or zeros with NaN gradients), so such
rows (Sq > Sk under causal, empty key sequences, padding) are given every key to attend, and
their output is multiplied by 0 afterwards: zeros forward, exactly zero gradients backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def _sdpa(q_BHQD, k_BHKD, v_BHKD, mask, causal, scale, dropout_p):
    return F.scaled_dot_product_attention(
        q_BHQD, k_BHKD, v_BHKD, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale
    )


def attention_torch_batched(
    q_BQHD: torch.Tensor,
    k_BKHD: torch.Tensor,
    v_BKHD: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """SDPA on the batched layout; returns [B, Sq, H, Dh]."""
    n_q, n_k = q_BQHD.shape[1], k_BKHD.shape[1]
    if n_k == 0:
        return torch.zeros_like(q_BQHD)
    q_BHQD, k_BHKD, v_BHKD = (t.transpose(1, 2) for t in (q_BQHD, k_BKHD, v_BKHD))
    if not causal or n_q == n_k:
        out_BHQD = _sdpa(q_BHQD, k_BHKD, v_BHKD, None, causal, softmax_scale, dropout_p)
    elif n_q < n_k:
        mask = causal_lower_right(n_q, n_k)
        out_BHQD = _sdpa(q_BHQD, k_BHKD, v_BHKD, mask, False, softmax_scale, dropout_p)
    else:  # the first Sq - Sk queries see no key
        i_Q = torch.arange(n_q, device=q_BQHD.device)
        j_K = torch.arange(n_k, device=q_BQHD.device)
        allowed_QK = j_K[None, :] <= i_Q[:, None] + (n_k - n_q)
        has_key_Q = allowed_QK.any(dim=1)
        mask_QK = allowed_QK | ~has_key_Q[:, None]
        out_BHQD = _sdpa(q_BHQD, k_BHKD, v_BHKD, mask_QK, False, softmax_scale, dropout_p)
        out_BHQD = out_BHQD * has_key_Q[:, None].to(out_BHQD.dtype)
    return out_BHQD.transpose(1, 2)


def _slots(cu_B1: torch.Tensor, n_tokens: int, max_len: int):
    """Per token, its padded slot ``b * max_len + position``; per sequence, the lengths [B]."""
    t_T = torch.arange(n_tokens, device=cu_B1.device)
    seq_T = torch.searchsorted(cu_B1[1:].long(), t_T, right=True)
    slot_T = seq_T * max_len + (t_T - cu_B1.long()[seq_T])
    return slot_T, (cu_B1[1:] - cu_B1[:-1]).long()


def _pad(x_THD: torch.Tensor, slot_T: torch.Tensor, n_seq: int, max_len: int) -> torch.Tensor:
    """[T, H, Dh] -> zero-padded [B, H, max_len, Dh] (differentiable; backward is a gather)."""
    padded = x_THD.new_zeros((n_seq * max_len, *x_THD.shape[1:])).index_copy_(0, slot_T, x_THD)
    return padded.view(n_seq, max_len, *x_THD.shape[1:]).transpose(1, 2)


def attention_torch_varlen(
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """SDPA on the packed layout (gather to a padded batch, attend, scatter back); [Tq, H, Dh]."""
    n_tq, n_tk, n_seq = q_THD.shape[0], k_THD.shape[0], cu_seqlens_q.shape[0] - 1
    if n_tq == 0 or n_tk == 0 or max_seqlen_k == 0:
        return torch.zeros_like(q_THD)
    slot_q_T, len_q_B = _slots(cu_seqlens_q, n_tq, max_seqlen_q)
    same_lengths = cu_seqlens_k is cu_seqlens_q
    if same_lengths and max_seqlen_k == max_seqlen_q:
        slot_k_T, len_k_B = slot_q_T, len_q_B
    else:
        slot_k_T, len_k_B = _slots(cu_seqlens_k, n_tk, max_seqlen_k)

    # Padded copies in SDPA's layout [B, H, S, Dh]: padding key slots are masked out below,
    # padding query slots are discarded (and receive a zero gradient).
    q_BHQD = _pad(q_THD, slot_q_T, n_seq, max_seqlen_q)
    k_BHKD = _pad(k_THD, slot_k_T, n_seq, max_seqlen_k)
    v_BHKD = _pad(v_THD, slot_k_T, n_seq, max_seqlen_k)

    if same_lengths and causal and max_seqlen_k == max_seqlen_q:
        # Causal self-attention over right-padded sequences needs no mask: a real query i only
        # sees keys j <= i < length, never padding; padding queries are dropped and get a zero
        # gradient, so the padding keys they see get zero gradients too. Mask-free SDPA can use
        # its flash kernels (CPU and CUDA).
        out_BHQD = _sdpa(q_BHQD, k_BHKD, v_BHKD, None, True, softmax_scale, dropout_p)
        out_BQHD = out_BHQD.transpose(1, 2)
        return out_BQHD.reshape(n_seq * max_seqlen_q, *q_THD.shape[1:]).index_select(0, slot_q_T)

    i_Q = torch.arange(max_seqlen_q, device=q_THD.device)
    j_K = torch.arange(max_seqlen_k, device=q_THD.device)
    allowed_BQK = (j_K[None, :] < len_k_B[:, None])[:, None, :]
    if causal:
        diag_B = len_k_B - len_q_B  # bottom-right alignment, per sequence
        allowed_BQK = allowed_BQK & (j_K[None, None, :] <= i_Q[None, :, None] + diag_B[:, None, None])
    # Padding query rows may see every slot (their output is dropped). Real rows without a key
    # exist only when a sequence has fewer keys than queries; self-attention never has them.
    real_BQ = i_Q[None, :] < len_q_B[:, None]
    no_key_BQ = ~real_BQ if same_lengths else ~(allowed_BQK.any(dim=2) & real_BQ)
    mask_B1QK = (allowed_BQK | no_key_BQ[:, :, None])[:, None]
    out_BHQD = _sdpa(q_BHQD, k_BHKD, v_BHKD, mask_B1QK, False, softmax_scale, dropout_p)
    out_BQHD = out_BHQD.transpose(1, 2)
    if not same_lengths:
        out_BQHD = out_BQHD * (~no_key_BQ)[:, :, None, None].to(out_BQHD.dtype)
    return out_BQHD.reshape(n_seq * max_seqlen_q, *q_THD.shape[1:]).index_select(0, slot_q_T)
