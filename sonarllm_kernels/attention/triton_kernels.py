"""The Triton kernels of ``sonarllm_kernels.attention``'s "triton" path (FlashAttention-2 style);
their launch settings, launchers and autograd Function are in triton_backend.py, whose docstring
describes what each kernel computes and how it is laid out. The kernels are one idea (online
softmax forward, recomputing backward): kept together in one file of about 400 lines.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernels may only read constexpr globals (a plain float is a NameError when compiling for a GPU,
# although the interpreter accepts it).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Sizes that change with every batch (token counts, longest sequence, heads) are runtime ints,
# not specialised: Triton would otherwise compile one variant per "divisible by 16" / "== 1"
# class of each, i.e. new compilations in the middle of a run. None of them indexes a
# contiguous dimension, so specialising them would not change the generated loads.
_RUNTIME_SIZES = ["H", "seqlen_q", "seqlen_k", "stride_lh"]


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
