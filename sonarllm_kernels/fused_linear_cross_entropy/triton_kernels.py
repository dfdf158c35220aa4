"""Triton kernels of the fused linear cross-entropy's "triton" path (orchestrated, per chunk of
rows, by triton_backend.py; the math of alpha, beta, gamma is in
function.py).

Shared by both schedules:
- ``_flce_lse_kernel`` merges per-(row, block) softmax statistics into the row max ``m``, the
  shifted log-sum-exp ``lse' = log(s)`` with ``s = sum exp(z - m)``, the shifted target logit and
  smoothing sum, the gradient coefficients (the softmax's as ``alpha / s``), and optionally the
  per-block gradient scale ``(alpha / s) * exp(block_max - m)``.

Precision: the loss and the softmax are formed in the frame shifted by the row max (see
function.py): the softmax is ``exp(z - m) / s`` (as in the "torch"
path; one rounding of ``alpha / s`` shared by the whole row), never ``exp(z - lse)`` with
``lse = m + lse'`` rounded at the size of the logits. The smoothing sums are kept relative to the
running block max as well (``sum_j w_j * (z_j - frame)``; a change of frame adds
``(old frame - new frame) * sum_j w_j``, a sum of terms of one sign), so no sum of logits of 1e4
is ever subtracted from another.

"hybrid" schedule (cuBLAS writes the logits and multiplies the logit gradient by W):
- ``_flce_row_stats_kernel``: per (row, segment of the vocabulary), the max, the sum of
  exp(logit - max), the target logit and the smoothing sum relative to the max, from logits
  stored in the input dtype.
- ``_flce_row_dz_kernel``: overwrites those logits with the logit gradient dz, in place.

"fused" schedule (both GEMMs in Triton, the logits never leave in any other form):
- ``_flce_logits_kernel``: GEMM ``h @ W.T`` whose epilogue writes per-tile statistics and
  stores ``exp(logit - tile max)`` (in [0, 1], input dtype; with softcap the relative logit
  itself, which the softcap derivative needs).
- ``_flce_grad_hidden_kernel``: GEMM ``dz @ W`` with dz formed as its A operand is loaded:
  ``dz = e * scale - beta * onehot - gamma * cw`` (no exp: the scale folds alpha and
  exp(tile max - lse)), split over V into float32 partial sums that are added deterministically.
- ``_flce_grad_weight_kernel``: ``dW += dz.T @ h`` (and ``db += sum(dz)``) from the same tiles.

The stored chunk's row stride is a multiple of 64 elements and its rows are read and written up
to that stride (the padding columns hold values no one uses; results are masked at V): the JIT
then marks stride and bound divisible by 16, and loads and stores of the chunk are 16-byte
vectors (asynchronous copies in the GEMMs' K loops) even though V = 256,206 is not. Under ``TRITON_INTERPRET=1`` the kernels
run on the CPU in float32 (``UPCAST`` casts dot operands to float32; the interpreter cannot
multiply bf16).

Size: about 500 lines, the kernels of both schedules ("hybrid" and "fused") and their shared
helpers; the H200 sweep (issue 26) keeps one schedule and this file then loses the other's kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# log2(e) = LOG2E_HI + LOG2E_LO + LOG2E_TAIL: HI and LO have 12 significant bits each (their sum is
# log2(e) rounded to float32), so a 12-bit number times either is exact (see _exp).
LOG2E_HI = tl.constexpr(1.44287109375)
LOG2E_LO = tl.constexpr(-0.0001760721206665039)
LOG2E_TAIL = tl.constexpr(1.92596298909109e-08)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp(a):
    """exp(a) in float32 whose error does not grow with |a|.

    ``exp2(a * LOG2E)`` rounds the product, an error of about |a| * 2^-24 relative in the result
    (5e-7 at a = -8, five times torch.exp's): a softmax gradient at logits of 1e4 is multiplied
    by weights of that size, so this error is what remains of its precision. Here the rounding
    ``r = a * log2(e) - t`` of ``t = fl(a * log2(e))`` is recovered exactly (Dekker's product: a
    split into 12-bit halves, each product with LOG2E_HI/LO exact) and applied to first order,
    ``exp2(t) * (1 + r * ln 2)`` (|r| <= 2^-24 |t|, so the second-order term is negligible).
    ±inf, NaN and huge |a| behave as exp2: 0, inf, NaN.
    """
    t = a * LOG2E
    # |a| >= 128 (exp under- or overflows: 0 or inf; -3.4e38 from a finfo.min mask must not
    # overflow the products below into a NaN), ±inf, NaN: no correction needed
    f = tl.where(tl.abs(a) < 128.0, a, 0.0)
    tf = f * LOG2E
    f_hi = (f.to(tl.int32, bitcast=True) & -4096).to(tl.float32, bitcast=True)  # top 12 significant bits
    f_lo = f - f_hi
    r = ((f_hi * LOG2E_HI - tf) + f_hi * LOG2E_LO + f_lo * LOG2E_HI) + f_lo * LOG2E_LO + f * LOG2E_TAIL
    return tl.exp2(t) * (1.0 + r * LN2)


@triton.jit
def _tanh(x):
    """tanh that also runs in the interpreter (libdevice does not), to ~2e-7 relative.

    ``(1 - t) / (1 + t)`` with ``t = exp(-2|x|)`` cancels for small |x| (6e-7 relative at 0.1,
    3e-7 at 0.3), and softcap multiplies the error by the cap: at logits of 1e4 that is more
    than torch.tanh's rounding. Below 0.6 the Taylor series (10 terms; the next one is below
    2^-24 relative there) gives 1e-7, as torch.tanh."""
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    p = -0.00023912911424355248 * x2 + 0.000590027440945586
    p = p * x2 - 0.0014558343870513183
    p = p * x2 + 0.003592128036572481
    p = p * x2 - 0.008863235529902197
    p = p * x2 + 0.021869488536155203
    p = p * x2 - 0.05396825396825397
    p = p * x2 + 0.13333333333333333
    p = p * x2 - 0.3333333333333333
    small = ax + ax * (p * x2)
    y = tl.where(ax < 0.6, small, big)
    return tl.where(x < 0, -y, y)


@triton.jit
def _softcap(x, softcap):
    """softcap * tanh(x / softcap); NaN and +inf give NaN (the row's loss is NaN), -inf (a
    masked class) gives -softcap."""
    valid = (x == x) & (x < float("inf"))
    return tl.where(valid, softcap * _tanh(x / softcap), float("nan"))


# --- shared: merge of per-block statistics --------------------------------------------------


# Counts that vary between calls are not specialised (no recompile for a ragged last chunk).
@triton.jit(do_not_specialize=["C", "NB", "stride_bc"])
def _flce_lse_kernel(
    blk_max_ptr, blk_sum_ptr, blk_zsum_ptr,  # in: per (row, block) stats [C, NB]; zsum relative to the block max
    blk_weight_ptr,  # in (HAS_SMOOTHING): the (class-)weight sum of each block's columns [NB]
    loss_scale_ptr, lse_scale_ptr,  # in: per-row weights of the loss and of lse [C] (optional)
    row_weight_ptr, weight_sum_ptr,  # in: class weight of each row's target [C], sum of the class weights [1]
    target_ptr,  # in/out: the target logit [C], overwritten with target - m
    max_ptr, lse_ptr, zsum_ptr, pscale_ptr, beta_ptr, gamma_ptr,  # out [C]: m, lse', sum_j w_j (z_j - m), alpha / s, ...
    scale_ptr,  # out (WRITE_SCALE): (alpha / s) * exp(block max - m) [C, NB]; may alias blk_sum_ptr
    C, NB, stride_bc, V,
    z_loss, smoothing,
    HAS_SMOOTHING: tl.constexpr, HAS_LOSS_SCALE: tl.constexpr, HAS_LSE_SCALE: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, WRITE_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < C
    offs_t = tl.arange(0, BLOCK_T)
    # --- pass 1: row max over blocks; pass 2: rescaled sum of the block sums
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for t0 in range(0, NB, BLOCK_T):
        mask = mask_r[:, None] & (t0 + offs_t < NB)[None, :]
        bm = tl.load(blk_max_ptr + offs_r[:, None] * stride_bc + t0 + offs_t[None, :], mask=mask, other=float("-inf"))
        m = tl.maximum(m, tl.max(bm, axis=1))
    m = tl.where(mask_r, m, 0.0)  # rows past C: keep the arithmetic finite
    s = tl.zeros((BLOCK_R,), tl.float32)
    zs = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, NB, BLOCK_T):
        mask = mask_r[:, None] & (t0 + offs_t < NB)[None, :]
        offs = offs_r[:, None] * stride_bc + t0 + offs_t[None, :]
        bm = tl.load(blk_max_ptr + offs, mask=mask, other=float("-inf"))
        bs = tl.load(blk_sum_ptr + offs, mask=mask, other=0.0)
        s += tl.sum(tl.where(mask, bs * _exp(bm - m[:, None]), 0.0), axis=1)
        if HAS_SMOOTHING:  # move each block's sum from its frame (its max, 0 if all -inf) to m
            bz = tl.load(blk_zsum_ptr + offs, mask=mask, other=0.0)
            bw = tl.load(blk_weight_ptr + t0 + offs_t, mask=t0 + offs_t < NB, other=0.0)
            frame = tl.where(bm == float("-inf"), 0.0, bm)
            zs += tl.sum(tl.where(mask, bz + (frame - m[:, None]) * bw[None, :], 0.0), axis=1)
    lse_s = tl.log(tl.where(mask_r, s, 1.0))  # lse', of the size of the loss
    lse = m + lse_s  # the log-sum-exp itself: only the z-loss uses it
    ok = (lse == lse) & (tl.abs(lse) < float("inf"))
    lse = tl.where(ok, lse, float("nan"))
    lse_s = tl.where(ok, lse_s, float("nan"))
    tl.store(max_ptr + offs_r, m, mask=mask_r)
    tl.store(lse_ptr + offs_r, lse_s, mask=mask_r)
    tl.store(target_ptr + offs_r, tl.load(target_ptr + offs_r, mask=mask_r, other=0.0) - m, mask=mask_r)
    if HAS_SMOOTHING:
        tl.store(zsum_ptr + offs_r, zs, mask=mask_r)
    # --- gradient coefficients
    if HAS_LOSS_SCALE:
        c = tl.load(loss_scale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    else:
        c = tl.zeros((BLOCK_R,), tl.float32)
    if HAS_CLASS_WEIGHT:
        r = tl.load(row_weight_ptr + offs_r, mask=mask_r, other=0.0)
        alpha = c * (r * (1.0 - smoothing + 2.0 * z_loss * lse) + smoothing / V * tl.load(weight_sum_ptr))
        beta = c * r * (1.0 - smoothing)
    else:
        alpha = c * (1.0 + 2.0 * z_loss * lse)
        beta = c * (1.0 - smoothing)
    if HAS_LSE_SCALE:
        alpha += tl.load(lse_scale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    pscale = tl.where(ok, alpha / tl.where(mask_r, s, 1.0), float("nan"))  # dz = pscale * exp(z - m) - ...
    tl.store(pscale_ptr + offs_r, pscale, mask=mask_r)
    tl.store(beta_ptr + offs_r, beta, mask=mask_r)
    tl.store(gamma_ptr + offs_r, c * (smoothing / V), mask=mask_r)
    if WRITE_SCALE:  # pass 3: the softmax scale of every block (0 for an all -inf block)
        for t0 in range(0, NB, BLOCK_T):
            mask = mask_r[:, None] & (t0 + offs_t < NB)[None, :]
            offs = offs_r[:, None] * stride_bc + t0 + offs_t[None, :]
            bm = tl.load(blk_max_ptr + offs, mask=mask, other=float("-inf"))
            tl.store(scale_ptr + offs, pscale[:, None] * _exp(bm - m[:, None]), mask=mask)


# --- "hybrid" schedule: row passes over logits that cuBLAS wrote --------------------------------


@triton.jit(do_not_specialize=["n_iter", "stride_sc"])
def _flce_row_stats_kernel(
    z_ptr,  # in: logits [C, V] (row stride stride_zc), input dtype, bias already added
    cw_ptr, y_ptr,  # in: class weights [V] (HAS_CLASS_WEIGHT), targets [C]
    max_ptr, sum_ptr, zsum_ptr,  # out: per (row, segment) max, sum of exp(logit - max), smoothing sum [C, S]
    # (the smoothing sum is sum_j w_j * (logit_j - max), w = class weight or 1; max -> 0 if it is -inf)
    target_ptr,  # out: target logit [C] (written by the segment holding it)
    V, seg_len, n_iter, stride_zc, stride_sc,
    softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    z_row = z_ptr + row.to(tl.int64) * stride_zc
    v_first = seg * seg_len
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    frame = 0.0  # the smoothing sums' frame: the running max (0 while it is -inf)
    zs = tl.zeros((BLOCK_V,), tl.float32)  # per lane: sum_j w_j * (z_j - frame)
    cnt = tl.zeros((BLOCK_V,), tl.float32)  # per lane: sum_j w_j
    for i in range(0, n_iter):  # same trip count in every program (seg_len = n_iter * BLOCK_V)
        offs_v = v_first + i * BLOCK_V + offs
        mask = offs_v < V
        x = tl.load(z_row + offs_v, mask=offs_v < stride_zc, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = _softcap(x, softcap)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf block has no mass
        s = s * _exp(m - shift) + tl.sum(_exp(x - shift), axis=0)
        m = m_new
        if HAS_SMOOTHING:  # the smoothing term sums cw[j] * z[j], kept relative to the running max
            if HAS_CLASS_WEIGHT:
                w = tl.load(cw_ptr + offs_v, mask=mask, other=0.0)
            else:
                w = tl.where(mask, 1.0, 0.0)
            zs += (frame - shift) * cnt + tl.where(mask, x - shift, 0.0) * w
            cnt += w
            frame = shift
    out = row * stride_sc + seg
    tl.store(max_ptr + out, m)
    tl.store(sum_ptr + out, s)
    if HAS_SMOOTHING:
        tl.store(zsum_ptr + out, tl.sum(zs, axis=0))
    y = tl.load(y_ptr + row)
    mine = (y >= v_first) & (y < v_first + seg_len)
    t = tl.load(z_row + y, mask=mine, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = _softcap(t, softcap)
    tl.store(target_ptr + row, t, mask=mine)


@triton.jit(do_not_specialize=["n_iter"])
def _flce_row_dz_kernel(
    z_ptr,  # in/out: logits [C, V] -> dz, in place, input dtype
    cw_ptr, y_ptr, max_ptr, pscale_ptr, beta_ptr, gamma_ptr,  # in: [V], [C] x 5 (pscale: alpha / sum exp(z - max))
    V, seg_len, n_iter, stride_zc,
    softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    z_row = z_ptr + row.to(tl.int64) * stride_zc
    v_first = seg * seg_len
    offs = tl.arange(0, BLOCK_V)
    y = tl.load(y_ptr + row)
    m = tl.load(max_ptr + row)
    pscale = tl.load(pscale_ptr + row)
    beta = tl.load(beta_ptr + row)
    gamma = tl.load(gamma_ptr + row)
    for i in range(0, n_iter):
        offs_v = v_first + i * BLOCK_V + offs
        mask = offs_v < V
        x = tl.load(z_row + offs_v, mask=offs_v < stride_zc, other=0.0).to(tl.float32)
        x = tl.where(mask, x, 0.0)  # the padding holds whatever cuBLAS left there
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            x = softcap * t
        dz = pscale * _exp(x - m) - tl.where(offs_v == y, beta, 0.0)
        if HAS_GAMMA:
            if HAS_CLASS_WEIGHT:
                dz -= gamma * tl.load(cw_ptr + offs_v, mask=mask, other=0.0)
            else:
                dz -= gamma
        if HAS_SOFTCAP:
            dz *= 1.0 - t * t  # d(c * tanh(x / c)) / dx
        tl.store(z_row + offs_v, dz.to(z_ptr.dtype.element_ty), mask=offs_v < stride_zc)  # padding too


# --- "fused" schedule: both GEMMs in Triton --------------------------------------------------


@triton.jit(do_not_specialize=["C", "stride_tc"])
def _flce_logits_kernel(
    h_ptr, w_ptr, b_ptr, cw_ptr, y_ptr,  # in: h [C, D], w [V, D], bias [V], class weights [V], target [C]
    e_ptr,  # out (STORE): exp(logit - tile max) [C, V], or with softcap logit - tile max; input dtype
    tile_max_ptr, tile_sum_ptr, tile_zsum_ptr,  # out: per (row, V-tile) stats [C, NT], fp32 (zsum: relative to the max)
    target_ptr,  # out: target logit [C], fp32
    C, V, D,
    stride_hc, stride_hd, stride_wv, stride_wd, stride_ec, stride_tc,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, STORE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EXACT_EXP: tl.constexpr,  # float32 inputs: _exp (16-bit stores round far more than exp2 errs)
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_C: tl.constexpr,
):  # fmt: skip
    # --- map the program to a (C-block, V-block) tile, grouped so W tiles are reused from L2
    pid = tl.program_id(0)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    group = pid // (GROUP_C * num_pid_v)
    first_c = group * GROUP_C
    group_size = tl.minimum(num_pid_c - first_c, GROUP_C)
    pid_c = first_c + (pid % (GROUP_C * num_pid_v)) % group_size
    pid_v = (pid % (GROUP_C * num_pid_v)) // group_size

    c0 = pid_c * BLOCK_C
    v0 = pid_v * BLOCK_V
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_D)
    mask_c = c0 + rows < C
    mask_v = v0 + cols < V
    h_tile = h_ptr + (c0 + rows)[:, None].to(tl.int64) * stride_hc + ks[None, :] * stride_hd
    w_tile = w_ptr + (v0 + cols)[None, :].to(tl.int64) * stride_wv + ks[:, None] * stride_wd

    # --- GEMM: acc[c, v] = sum_d h[c, d] * w[v, d], float32 accumulation
    acc = tl.zeros((BLOCK_C, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_D)):
        mask_d = k * BLOCK_D + ks < D
        h = tl.load(h_tile + k * BLOCK_D * stride_hd, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_tile + k * BLOCK_D * stride_wd, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

    # --- epilogue: bias, softcap, per-tile statistics (one C x V tile live at a time)
    offs_c = c0 + rows
    offs_v = v0 + cols
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    acc = tl.where(mask_v[None, :], acc, float("-inf"))
    t_offs = offs_c * stride_tc + pid_v
    y = tl.load(y_ptr + offs_c, mask=mask_c, other=-1)
    in_tile = (y >= v0) & (y < v0 + BLOCK_V)
    tl.store(target_ptr + offs_c, tl.sum(tl.where(offs_v[None, :] == y[:, None], acc, 0.0), axis=1),
             mask=mask_c & in_tile)  # fmt: skip
    tile_max = tl.max(acc, axis=1)
    tl.store(tile_max_ptr + t_offs, tile_max, mask=mask_c)  # -inf for an all -inf tile: no mass in the merge
    # A tile whose logits are all -inf has no mass: shift by 0 there (its exp terms are 0).
    acc -= tl.where(tile_max == float("-inf"), 0.0, tile_max)[:, None]
    if HAS_SMOOTHING:  # the smoothing term sums cw[j] * z[j]: here relative to the tile max
        zs = tl.where(mask_v[None, :], acc, 0.0)
        if HAS_CLASS_WEIGHT:
            zs *= tl.load(cw_ptr + offs_v, mask=mask_v, other=0.0)[None, :]
        tl.store(tile_zsum_ptr + t_offs, tl.sum(zs, axis=1), mask=mask_c)
    if EXACT_EXP:
        e = _exp(acc)
    else:
        e = tl.exp2(acc * LOG2E)
    tl.store(tile_sum_ptr + t_offs, tl.sum(e, axis=1), mask=mask_c)
    if STORE:
        if HAS_SOFTCAP:  # the softcap derivative needs the logit itself
            e = acc
        e_tile = e_ptr + offs_c[:, None].to(tl.int64) * stride_ec + offs_v[None, :]
        tl.store(e_tile, e.to(e_ptr.dtype.element_ty), mask=mask_c[:, None] & (offs_v < stride_ec)[None, :])


@triton.jit
def _fused_dz(e, sc, tmax, y, beta, gamma, cw, offs_v, softcap, HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr,
              EXACT_EXP: tl.constexpr):  # fmt: skip
    """dz of a tile from what ``_flce_logits_kernel`` stored (float32 in and out). Per-row
    values (sc = (alpha / s) * exp(tile max - m), tmax, y, beta, gamma) and per-column values (cw:
    class weight or 1, offs_v: column index) come broadcastable against ``e``."""
    if HAS_SOFTCAP:
        if EXACT_EXP:  # (alpha / s) * exp(z - m), e = z - tile max
            dz = sc * _exp(e)
        else:
            dz = sc * tl.exp2(e * LOG2E)
    else:
        dz = sc * e
    dz -= tl.where(offs_v == y, beta, 0.0)
    if HAS_GAMMA:
        dz -= gamma * cw
    if HAS_SOFTCAP:
        t = (e + tmax) / softcap
        dz *= 1.0 - t * t  # d(c * tanh(x / c)) / dx
    return dz


@triton.jit(do_not_specialize=["C", "n_k", "stride_tc"])
def _flce_grad_hidden_kernel(
    e_ptr, scale_ptr, tile_max_ptr, w_ptr, cw_ptr, y_ptr, beta_ptr, gamma_ptr,
    part_ptr,  # out: partial dh [SPLIT, C, D], fp32
    C, V, D, n_k,  # n_k: K steps per split (the same in every program)
    stride_ec, stride_tc, stride_wv, stride_wd,
    softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EXACT_EXP: tl.constexpr,
    TILE_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    pid_c = pid // num_pid_d
    pid_d = pid % num_pid_d
    c0 = pid_c * BLOCK_C
    d0 = pid_d * BLOCK_D
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    offs_c = c0 + rows
    mask_c = offs_c < C
    mask_d = d0 + cols < D
    y = tl.load(y_ptr + offs_c, mask=mask_c, other=-1)
    beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
    gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0)
    v_start = split * n_k * BLOCK_K
    e_tile = e_ptr + offs_c[:, None].to(tl.int64) * stride_ec + ks[None, :]
    w_tile = w_ptr + ks[:, None].to(tl.int64) * stride_wv + (d0 + cols)[None, :] * stride_wd
    t_row = tile_max_ptr + offs_c * stride_tc
    s_row = scale_ptr + offs_c * stride_tc

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for k in range(0, n_k):
        v0 = v_start + k * BLOCK_K
        offs_v = v0 + ks
        mask_v = offs_v < V
        e = tl.load(e_tile + v0, mask=mask_c[:, None] & (offs_v < stride_ec)[None, :], other=0.0).to(tl.float32)
        sc = tl.load(s_row + v0 // TILE_V, mask=mask_c, other=0.0)
        if HAS_SOFTCAP:
            tmax = tl.load(t_row + v0 // TILE_V, mask=mask_c, other=0.0)
        else:
            tmax = sc
        if HAS_CLASS_WEIGHT:
            cw = tl.load(cw_ptr + offs_v, mask=mask_v, other=0.0)
        else:
            cw = tl.full((BLOCK_K,), 1.0, tl.float32)
        dz = _fused_dz(e, sc[:, None], tmax[:, None], y[:, None], beta[:, None], gamma[:, None], cw[None, :],
                       offs_v[None, :], softcap, HAS_SOFTCAP, HAS_GAMMA, EXACT_EXP)  # fmt: skip
        dz = tl.where(mask_v[None, :], dz, 0.0)
        w = tl.load(w_tile + v0.to(tl.int64) * stride_wv, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(dz, w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    part = part_ptr + (split * C + offs_c)[:, None].to(tl.int64) * D + (d0 + cols)[None, :]
    tl.store(part, acc, mask=mask_c[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["C", "stride_tc"])
def _flce_grad_weight_kernel(
    e_ptr, scale_ptr, tile_max_ptr, h_ptr, cw_ptr, y_ptr, beta_ptr, gamma_ptr,
    dw_ptr, db_ptr,  # in/out: float32 accumulators dW [V, D], db [V]
    C, V, D,
    stride_ec, stride_tc, stride_hc, stride_hd,
    softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EXACT_EXP: tl.constexpr,
    TILE_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_DW:
        num_pid_d = tl.cdiv(D, BLOCK_D)
    else:  # bias gradient only: one program per V-block
        num_pid_d = 1
    pid_v = pid // num_pid_d
    pid_d = pid % num_pid_d
    v0 = pid_v * BLOCK_V
    d0 = pid_d * BLOCK_D
    vs = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_D)
    offs_v = v0 + vs
    mask_v = offs_v < V
    mask_d = d0 + cols < D
    tile = v0 // TILE_V  # BLOCK_V divides TILE_V: one statistics tile per program
    if HAS_CLASS_WEIGHT:
        cw = tl.load(cw_ptr + offs_v, mask=mask_v, other=0.0)
    else:
        cw = tl.full((BLOCK_V,), 1.0, tl.float32)
    e_tile = e_ptr + offs_v[:, None] + ks[None, :].to(tl.int64) * stride_ec  # dz.T: the chunk's rows along axis 1
    h_tile = h_ptr + ks[:, None].to(tl.int64) * stride_hc + (d0 + cols)[None, :] * stride_hd

    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k in range(0, tl.cdiv(C, BLOCK_C)):
        c0 = k * BLOCK_C
        offs_c = c0 + ks
        mask_c = offs_c < C
        y = tl.load(y_ptr + offs_c, mask=mask_c, other=-1)
        beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
        gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0)
        sc = tl.load(scale_ptr + offs_c * stride_tc + tile, mask=mask_c, other=0.0)
        if HAS_SOFTCAP:
            tmax = tl.load(tile_max_ptr + offs_c * stride_tc + tile, mask=mask_c, other=0.0)
        else:
            tmax = sc
        e = tl.load(e_tile + c0.to(tl.int64) * stride_ec, mask=(offs_v < stride_ec)[:, None] & mask_c[None, :],
                    other=0.0)  # fmt: skip
        dz = _fused_dz(e.to(tl.float32), sc[None, :], tmax[None, :], y[None, :], beta[None, :], gamma[None, :],
                       cw[:, None], offs_v[:, None], softcap, HAS_SOFTCAP, HAS_GAMMA, EXACT_EXP)  # fmt: skip
        dz = tl.where(mask_v[:, None] & mask_c[None, :], dz, 0.0)
        if HAS_DW:
            h = tl.load(h_tile + c0.to(tl.int64) * stride_hc, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(dz, h.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(dz.to(h.dtype), h, acc, input_precision=DOT_PRECISION)
        if HAS_DB:
            dbias += tl.sum(dz, axis=1)
    if HAS_DW:
        dw = dw_ptr + offs_v[:, None].to(tl.int64) * D + (d0 + cols)[None, :]
        mask = mask_v[:, None] & mask_d[None, :]
        tl.store(dw, tl.load(dw, mask=mask, other=0.0) + acc, mask=mask)
    if HAS_DB:
        if pid_d == 0:
            tl.store(db_ptr + offs_v, tl.load(db_ptr + offs_v, mask=mask_v, other=0.0) + dbias, mask=mask_v)
