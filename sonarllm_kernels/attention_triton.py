"""The "triton" path of ``sonarllm_kernels.attention``: FlashAttention-2 style kernels, forward and backward.

Computes ``softmax(scale * q k^T + causal_mask) v`` per (sequence, head) without materialising
the [Sq, Sk] scores (see sonarllm_kernels/attention_ref.py for the exact specification). Float32
accumulation throughout; the softmax runs in base 2 (``exp2``, with ``scale * log2(e)`` folded
into the scores).

* ``_attn_fwd_kernel``: one program per (sequence x head, block of BLOCK_M queries). It streams
  key/value blocks with an online softmax (running max ``m``, running sum ``l``) and writes the
  output and the per-row log-sum-exp ``lse`` (natural log, float32) for the backward. Key blocks
  that every query of the block may fully see run without masks; only the blocks on the causal
  diagonal and the ragged tail are masked.
* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(o * do)`` (float32), the softmax-Jacobian term.
* ``_attn_bwd_dkdv_kernel``: one program per (sequence x head, block of BLOCK_N keys); loops over
  the query blocks that can see those keys, recomputes ``p = exp(s - lse)``, accumulates
  ``dv += p^T do`` and ``dk += ds^T q`` with ``ds = p * (do v^T - delta)`` in registers.
* ``_attn_bwd_dq_kernel``: one program per (sequence x head, block of queries); ``dq += ds k``.

No atomics: every gradient tile is written once by one program, so results are deterministic.

Layouts: batched [B, S, H, Dh] and packed varlen [T, H, Dh] (sequence b spans rows
``cu_seqlens[b]:cu_seqlens[b+1]``) run through the same kernels (``IS_VARLEN``); arbitrary
strides are accepted (e.g. q, k, v as views of one fused qkv projection). Causal masks are
bottom-right aligned (query i sees key j <= i + Sk - Sq, flash-attn's convention); a query with
no visible key outputs zeros and stores lse = +inf. The grid is (B * H, query or key blocks):
B * H goes on axis 0 (limit 2**31 - 1) because the packed decoder's thousands of sentences x 16
heads exceed the 65,535 limit of axes 1 and 2.

Launch settings: pinned per kernel, precision and head dim (``_GPU_BLOCKS``), at most 64 rows
when the longest sequence has at most 64 (sentences of at most 60 tokens), and shrunk further at
the first launch if Triton reports that a config does not fit in shared memory (``_launch``).
Compiled variants: one per (kernel, dtype, head dim, layout, causal, short/long sequences);
batch sizes, token counts and sequence lengths are runtime ints (``_RUNTIME_SIZES``).

Supported: float32, bfloat16, float16 inputs; any head dim <= 128 (padded to a power of two >= 16
inside the kernels; powers of two waste nothing); no dropout. Under ``TRITON_INTERPRET=1`` the same
kernels run on the CPU with large blocks, operands upcast to float32 before ``tl.dot`` (the
interpreter cannot multiply bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sonarllm_kernels._dispatch import is_interpreter

MAX_HEAD_DIM = 128  # q, k, v, dk and dv tiles live in registers; 256 would need smaller blocks
LOG2E = 1.4426950408889634
# Kernels may only read constexpr globals (a plain float is a NameError when compiling for a GPU,
# although the interpreter accepts it).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Block sizes, pinned (no autotuning by default; see style.md 4.2.2), per input precision and head
# dim (<= 64 or <= 128): forward (BLOCK_M queries x BLOCK_N keys), dK/dV (BLOCK_N keys resident,
# BLOCK_M-query steps) and dQ (BLOCK_M queries resident, BLOCK_N-key steps). Hopper-sensible
# starting points after FlashAttention-2 and Triton's fused-attention tutorial, chosen so that an
# sm_90 compile (triton 3.7, checked without a GPU through cuobjdump) spills no or almost no
# registers; NOT yet timed on an H200. fp32 runs IEEE dots without tensor cores and needs small
# tiles; it exists for parity tests, not speed.
_GPU_BLOCKS = {
    (16, 64): dict(
        fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
        dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    ),
    (16, 128): dict(
        fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    ),
    (32, 64): dict(
        fwd=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
        dkdv=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
        dq=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ),
    (32, 128): dict(
        fwd=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
        dkdv=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
        dq=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    ),
}
# The interpreter pays ~5 ms per program loop step whatever the tile: one big tile for all.
_INTERP_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
SHORT_SEQ = 64  # sequences up to this long (sentences, documents of sentences) use one tile size

# Sizes that change with every batch (token counts, longest sequence, heads) are runtime ints,
# not specialised: Triton would otherwise compile one variant per "divisible by 16" / "== 1"
# class of each, i.e. new compilations in the middle of a run. None of them indexes a
# contiguous dimension, so specialising them would not change the generated loads.
_RUNTIME_SIZES = ["H", "seqlen_q", "seqlen_k", "stride_lh"]


@dataclass(frozen=True)
class AttnParams:
    """The non-tensor options of one call (one argument for the autograd Function)."""

    causal: bool
    softmax_scale: float
    max_seqlen_q: int
    max_seqlen_k: int


# ---------------------------------------------------------------------------------------------
# Device functions


@triton.jit
def _seq_bounds(cu_ptr, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first row of sequence b (int64), its length, its first row in the [H, N_rows] lse/delta).

    The element offset of the sequence in a tensor x is ``b * stride_xb + first * stride_xs``:
    in the packed layout stride_xb is 0 and ``first`` comes from cu_seqlens; batched, first is 0.
    """
    b64 = b.to(tl.int64)
    if IS_VARLEN:
        start = tl.load(cu_ptr + b)
        length = tl.load(cu_ptr + b + 1) - start
        first = start.to(tl.int64)
        row0 = first
    else:
        length = seqlen
        first = b64 * 0
        row0 = b64 * seqlen
    return first, length, row0


@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, stride_d, mask_r, mask_d, UPCAST: tl.constexpr):
    """A [rows, BLOCK_D] tile; masked rows/columns read as 0; float32 under the interpreter."""
    x = tl.load(
        base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
        mask=mask_r[:, None] & mask_d[None, :], other=0.0,
    )  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, mask_d, lo, hi, k_len, diag, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi); MASK=False only for blocks every row fully sees."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        mask_n = offs_n < k_len
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, mask_n, mask_d, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
        if MASK:
            visible = mask_n[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, mask_n, mask_d, UPCAST)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # in: [B, S, H, Dh] or [T, H, Dh]
    o_ptr,  # out: q's layout
    lse_ptr,  # out: [H, N_rows] float32, natural log; +inf for rows with no visible key
    cu_q_ptr, cu_k_ptr,  # in: int32 [B + 1] (varlen only)
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lh,
    H, seqlen_q, seqlen_k,  # seqlens: batched layout only
    qk_scale,  # softmax_scale * log2(e)
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # --- map the program to (sequence, head, query block)
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = pid_bh // H
    h = pid_bh % H
    q_first, q_len, row0 = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_first, k_len, _ = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + q_first * stride_qs + h * stride_qh
    k_base = k_ptr + b64 * stride_kb + k_first * stride_ks + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + k_first * stride_vs + h * stride_vh
    o_base = o_ptr + b64 * stride_ob + q_first * stride_os + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q = _load_rows(q_base, offs_m, offs_d, stride_qs, stride_qd, mask_m, mask_d, UPCAST)

    # --- key ranges: [0, full) is seen entirely by every row of the block, [full, hi) is masked
    diag = k_len - q_len  # bottom-right alignment: query i sees key j <= i + diag
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), k_len)
        full = tl.minimum(tl.maximum(start_m + 1 + diag, 0), k_len)
    else:
        hi = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N
    active = start_m < q_len  # blocks past a short sequence's end do nothing
    hi = tl.where(active, hi, 0)
    full = tl.where(active, full, 0)

    # --- online softmax, float32
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        offs_m, offs_d, mask_d, 0, full, k_len, diag, qk_scale,
        False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        offs_m, offs_d, mask_d, full, hi, k_len, diag, qk_scale,
        True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip

    # --- epilogue: normalise, store output and lse (rows with no visible key: 0 and +inf)
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * _LN2, float("inf"))
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + h * stride_lh + row0 + offs_m, lse, mask=mask_m)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr,  # in: q's layout
    delta_ptr,  # out: [H, N_rows] float32, rowsum(o * do)
    cu_q_ptr,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lh,
    H, seqlen_q,
    IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    q_first, q_len, row0 = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    b64 = b.to(tl.int64)
    o_base = o_ptr + b64 * stride_ob + q_first * stride_os + h * stride_oh
    do_base = do_ptr + b64 * stride_dob + q_first * stride_dos + h * stride_doh
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    o = _load_rows(o_base, offs_m, offs_d, stride_os, stride_od, mask_m, mask_d, True)
    do = _load_rows(do_base, offs_m, offs_d, stride_dos, stride_dod, mask_m, mask_d, True)
    tl.store(delta_ptr + h * stride_lh + row0 + offs_m, tl.sum(o * do, axis=1), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base,
    stride_qs, stride_qd, stride_dos, stride_dod,
    offs_n, offs_d, mask_d, lo, hi, q_len, diag, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over query blocks [lo, hi), in transposed form."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        mask_m = offs_m < q_len
        q = _load_rows(q_base, offs_m, offs_d, stride_qs, stride_qd, mask_m, mask_d, UPCAST)
        do = _load_rows(do_base, offs_m, offs_d, stride_dos, stride_dod, mask_m, mask_d, UPCAST)
        lse2 = tl.load(lse_base + offs_m, mask=mask_m, other=float("inf")) * _LOG2E
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK:
            visible = mask_m[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag)
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # in
    dk_ptr, dv_ptr,  # out: k's layout
    cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_lh,
    H, seqlen_q, seqlen_k,
    softmax_scale, qk_scale,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # --- map the program to (sequence, head, key block)
    pid_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = pid_bh // H
    h = pid_bh % H
    q_first, q_len, row0 = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_first, k_len, _ = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + q_first * stride_qs + h * stride_qh
    do_base = do_ptr + b64 * stride_dob + q_first * stride_dos + h * stride_doh
    k_base = k_ptr + b64 * stride_kb + k_first * stride_ks + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + k_first * stride_vs + h * stride_vh
    dk_base = dk_ptr + b64 * stride_dkb + k_first * stride_dks + h * stride_dkh
    dv_base = dv_ptr + b64 * stride_dvb + k_first * stride_dvs + h * stride_dvh

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < k_len
    mask_d = offs_d < HEAD_DIM
    k = _load_rows(k_base, offs_n, offs_d, stride_ks, stride_kd, mask_n, mask_d, UPCAST)
    v = _load_rows(v_base, offs_n, offs_d, stride_vs, stride_vd, mask_n, mask_d, UPCAST)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    # --- query ranges. Keys past k_len need no mask: they only pollute their own (unstored) rows.
    # [lo, band) crosses the causal diagonal (masked), [band, full_hi) sees the whole key block
    # (unmasked), [tail, end) is the ragged end of the queries (masked).
    diag = k_len - q_len
    end = ((q_len + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.minimum(tl.maximum(start_n - diag, 0), q_len) // BLOCK_M) * BLOCK_M
        band = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), q_len)
        band = ((band + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = end * 0
        band = end * 0
    full_hi = (q_len // BLOCK_M) * BLOCK_M
    tail = tl.maximum(band, full_hi)
    active = start_n < k_len
    lo = tl.where(active, lo, 0)
    band = tl.where(active, band, 0)
    full_hi = tl.where(active, full_hi, 0)
    tail = tl.where(active, tail, 0)
    end = tl.where(active, end, 0)

    lse_base = lse_ptr + h * stride_lh + row0
    delta_base = delta_ptr + h * stride_lh + row0
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
        offs_n, offs_d, mask_d, lo, band, q_len, diag, qk_scale,
        True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
        offs_n, offs_d, mask_d, band, full_hi, q_len, diag, qk_scale,
        False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
        offs_n, offs_d, mask_d, tail, end, q_len, diag, qk_scale,
        True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip

    # --- store (dk carries the softmax scale of s = scale * q k^T)
    mask = mask_n[:, None] & mask_d[None, :]
    dk_ptrs = dk_base + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * softmax_scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, mask_d, lo, hi, k_len, diag, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        mask_n = offs_n < k_len
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, mask_n, mask_d, UPCAST)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, mask_n, mask_d, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            visible = mask_n[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # in
    dq_ptr,  # out: q's layout
    cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_lh,
    H, seqlen_q, seqlen_k,
    softmax_scale, qk_scale,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # --- map the program to (sequence, head, query block)
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = pid_bh // H
    h = pid_bh % H
    q_first, q_len, row0 = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_first, k_len, _ = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + q_first * stride_qs + h * stride_qh
    do_base = do_ptr + b64 * stride_dob + q_first * stride_dos + h * stride_doh
    dq_base = dq_ptr + b64 * stride_dqb + q_first * stride_dqs + h * stride_dqh
    k_base = k_ptr + b64 * stride_kb + k_first * stride_ks + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + k_first * stride_vs + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q = _load_rows(q_base, offs_m, offs_d, stride_qs, stride_qd, mask_m, mask_d, UPCAST)
    do = _load_rows(do_base, offs_m, offs_d, stride_dos, stride_dod, mask_m, mask_d, UPCAST)
    lse2 = tl.load(lse_ptr + h * stride_lh + row0 + offs_m, mask=mask_m, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + h * stride_lh + row0 + offs_m, mask=mask_m, other=0.0)

    # --- key ranges, as in the forward
    diag = k_len - q_len
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), k_len)
        full = tl.minimum(tl.maximum(start_m + 1 + diag, 0), k_len)
    else:
        hi = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N
    active = start_m < q_len
    hi = tl.where(active, hi, 0)
    full = tl.where(active, full, 0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        offs_m, offs_d, mask_d, 0, full, k_len, diag, qk_scale,
        False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        offs_m, offs_d, mask_d, full, hi, k_len, diag, qk_scale,
        True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq_ptrs = dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * softmax_scale).to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (tf32 only when the user allows it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _fit(block: int, seqlen: int) -> int:
    """The block for sequences of at most ``seqlen``: at most SHORT_SEQ for short ones (the
    packed decoder's sentences of <= 60 tokens, documents of ~33 sentences), else the pinned
    size. Two classes only, so batches whose longest sequence differs share one compiled
    variant (Hopper's tensor-core tiles are 64 rows anyway)."""
    return block if seqlen > SHORT_SEQ else min(block, SHORT_SEQ)


def _blocks(kind: str, dtype: torch.dtype, head_dim: int, max_seqlen_q: int, max_seqlen_k: int) -> dict:
    """BLOCK_M / BLOCK_N / num_warps / num_stages of one kernel ("fwd", "dkdv" or "dq")."""
    if is_interpreter():
        cfg = dict(_INTERP_BLOCKS)
    else:
        bits = 32 if dtype == torch.float32 else 16
        cfg = dict(_GPU_BLOCKS[(bits, 64 if head_dim <= 64 else 128)][kind])
    cfg["BLOCK_M"] = _fit(cfg["BLOCK_M"], max_seqlen_q)
    cfg["BLOCK_N"] = _fit(cfg["BLOCK_N"], max_seqlen_k)
    return cfg


def _shrink(cfg: dict) -> dict | None:
    """The next smaller config after an out-of-resources failure (fewer stages, then smaller
    tiles), or None when nothing is left to shrink."""
    cfg = dict(cfg)
    if cfg["num_stages"] > 1:
        cfg["num_stages"] -= 1
        return cfg
    big = "BLOCK_M" if cfg["BLOCK_M"] >= cfg["BLOCK_N"] else "BLOCK_N"
    if cfg[big] <= MIN_BLOCK:
        return None
    cfg[big] //= 2
    return cfg


# Configs that compiled, per (kernel, dtype, head dim, pinned config): the pinned sizes are
# untuned guesses, and fp32 tiles or a smaller GPU can exceed shared memory; Triton raises
# OutOfResources at compile time, before anything runs, so retrying smaller is safe.
_WORKING: dict[tuple, dict] = {}


def _launch(kernel, kind: str, cfg: dict, dtype: torch.dtype, head_dim: int, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid(cfg)](*args, **kwargs, **cfg)``, shrinking cfg while it does not fit."""
    from triton.runtime.errors import OutOfResources

    key = (kind, dtype, head_dim, tuple(sorted(cfg.items())))
    cfg = _WORKING.get(key, cfg)
    while True:
        try:
            kernel[grid(cfg)](*args, **kwargs, **cfg)
        except OutOfResources:
            cfg = _shrink(cfg)
            if cfg is None:
                raise
            continue
        _WORKING[key] = cfg
        return


def _strides4(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, sequence, head, dim) strides; batch stride 0 in the packed layout."""
    return (0, *x.stride()) if varlen else tuple(x.stride())


def _common(q: torch.Tensor, k: torch.Tensor, cu_q, cu_k, params: AttnParams):
    varlen = cu_q is not None
    head_dim = q.shape[-1]
    if varlen:
        batch, seqlen_q, seqlen_k = cu_q.shape[0] - 1, params.max_seqlen_q, params.max_seqlen_k
        n_rows = q.shape[0]
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        n_rows = batch * seqlen_q
    return dict(
        varlen=varlen, head_dim=head_dim, batch=batch, heads=q.shape[-2],
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, n_rows=n_rows,
        block_d=max(MIN_BLOCK, triton.next_power_of_2(head_dim)),
    )  # fmt: skip


def _check_supported(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"impl='triton' supports float32, bfloat16 and float16, got {q.dtype}; use impl='torch'")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"impl='triton' supports head dims <= {MAX_HEAD_DIM}, got {q.shape[-1]}; use impl='torch'")


def attention_fwd(q, k, v, cu_q, cu_k, params: AttnParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (q's shape and dtype) and lse [H, N_rows] (float32; N_rows = B*Sq or Tq)."""
    _check_supported(q)
    c = _common(q, k, cu_q, cu_k, params)
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows a too-small max_seqlen skips stay 0
    lse = torch.empty((c["heads"], c["n_rows"]), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or c["seqlen_q"] == 0:
        return o.zero_(), lse.fill_(float("inf"))
    varlen, bh = c["varlen"], c["batch"] * c["heads"]
    _launch(
        _attn_fwd_kernel, "fwd", _blocks("fwd", q.dtype, c["head_dim"], c["seqlen_q"], c["seqlen_k"]), q.dtype, c["head_dim"],
        lambda cfg: (bh, triton.cdiv(c["seqlen_q"], cfg["BLOCK_M"])),
        q, k, v, o, lse, cu_q if varlen else lse, cu_k if varlen else lse,
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(o, varlen), lse.stride(0),
        c["heads"], c["seqlen_q"], c["seqlen_k"], params.softmax_scale * LOG2E,
        IS_VARLEN=varlen, CAUSAL=params.causal, UPCAST=is_interpreter(), DOT_PRECISION=_dot_precision(q.dtype),
        HEAD_DIM=c["head_dim"], BLOCK_D=c["block_d"],
    )  # fmt: skip
    return o, lse


def attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, params: AttnParams):
    """dq, dk, dv (the layouts and dtypes of q, k, v)."""
    c = _common(q, k, cu_q, cu_k, params)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or c["seqlen_q"] == 0 or c["seqlen_k"] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    varlen, bh, head_dim = c["varlen"], c["batch"] * c["heads"], c["head_dim"]
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    shared = dict(IS_VARLEN=varlen, HEAD_DIM=head_dim, BLOCK_D=c["block_d"])

    # delta = rowsum(o * do): a streaming pass, one [BLOCK_M, Dh] tile per program.
    delta = torch.empty_like(lse)
    block_m = _fit(64, c["seqlen_q"])
    _attn_bwd_preprocess_kernel[(bh, triton.cdiv(c["seqlen_q"], block_m))](
        o, do, delta, cu_q_arg,
        *_strides4(o, varlen), *_strides4(do, varlen), delta.stride(0),
        c["heads"], c["seqlen_q"], BLOCK_M=block_m, **shared,
    )  # fmt: skip

    kw = dict(CAUSAL=params.causal, UPCAST=is_interpreter(), DOT_PRECISION=_dot_precision(q.dtype), **shared)
    common = (
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen),
    )  # fmt: skip
    tail = (lse.stride(0), c["heads"], c["seqlen_q"], c["seqlen_k"], params.softmax_scale, params.softmax_scale * LOG2E)
    _launch(
        _attn_bwd_dkdv_kernel, "dkdv", _blocks("dkdv", q.dtype, head_dim, c["seqlen_q"], c["seqlen_k"]), q.dtype, head_dim,
        lambda cfg: (bh, triton.cdiv(c["seqlen_k"], cfg["BLOCK_N"])),
        q, k, v, do, lse, delta, dk, dv, cu_q_arg, cu_k_arg,
        *common, *_strides4(dk, varlen), *_strides4(dv, varlen), *tail, **kw,
    )  # fmt: skip
    _launch(
        _attn_bwd_dq_kernel, "dq", _blocks("dq", q.dtype, head_dim, c["seqlen_q"], c["seqlen_k"]), q.dtype, head_dim,
        lambda cfg: (bh, triton.cdiv(c["seqlen_q"], cfg["BLOCK_M"])),
        q, k, v, do, lse, delta, dq, cu_q_arg, cu_k_arg,
        *common, *_strides4(dq, varlen), *tail, **kw,
    )  # fmt: skip
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Triton attention with a recomputing backward. Inputs are already validated."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, params: AttnParams):
        o, lse = attention_fwd(q, k, v, cu_q, cu_k, params)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.params = params
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, ctx.params)
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, cu_q, cu_k, params: AttnParams) -> torch.Tensor:
    """Differentiable Triton attention (see the module docstring)."""
    return AttentionFunction.apply(q, k, v, cu_q, cu_k, params)

