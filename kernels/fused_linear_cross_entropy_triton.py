"""The "triton" path of fused linear cross-entropy: two fused GEMMs per chunk of rows.

For one chunk of C rows (float32 accumulation throughout):

1. ``_flce_logits_kernel`` — GEMM ``h @ W.T`` (+bias, softcap) over (C-block, V-block) tiles. Its
   epilogue writes, per row and tile, the tile max and the sum of exp(logit - max), the target
   logit in float32 (exactly one tile holds it) and, with label smoothing, the tile's sum of
   logits (each times its class weight, with class weights); and it stores the logits *relative
   to their tile max* in the input dtype. Relative storage keeps the logits that carry
   probability mass (those near the row max) close to 0, where bf16/fp16 are most precise.
2. ``_flce_lse_kernel`` — merges the per-tile statistics into the row log-sum-exp and the
   gradient coefficients (alpha, beta, gamma of fused_linear_cross_entropy_function.py; with
   class weights they take the target's weight and the weights' sum).
3. ``_flce_grad_hidden_kernel`` — GEMM ``dlogits @ W`` with K = V: every tile of the stored
   logits is turned into ``dz = alpha*softmax - beta*onehot - gamma*cw`` (times the softcap
   derivative; ``cw`` is the column's class weight, 1 without class weights) in registers on
   load, and never written back. V is split across programs (split-K) so that C x D output
   tiles fill the GPU; the partial sums are reduced deterministically (no atomics).
4. ``_flce_grad_weight_kernel`` — only for a trainable weight: ``dW += dz.T @ h`` and
   ``db += sum(dz)`` into float32 accumulators, from the same stored logits.

A frozen weight therefore costs two GEMM-equivalents (``h @ W.T`` and ``dz @ W``) and one chunk
buffer of C x V logits; the chunk holds ``CHUNK_BYTES`` of logits (512 rows at V = 256,206 in
bf16). Under ``TRITON_INTERPRET=1`` the same kernels run on the CPU (with large blocks, and
operands upcast to float32 before ``tl.dot`` since the interpreter cannot multiply bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import is_interpreter
from kernels.fused_linear_cross_entropy_function import ChunkResult, FLCEParams

CHUNK_BYTES = 256 * 2**20
SPLIT: int | None = None

# Tiles and pipelining per kernel kind ("logits": kernel 1; "grad": kernels 3 and 4) and operand
# size. Chosen for Hopper by the usual GEMM rules (128x128 tiles, 64-deep K steps for 16-bit
# operands; half as deep or fewer stages for float32, so every stage fits in 228 KiB of shared
# memory — checked by compiling for sm_90 in the tests); not yet timed on hardware. BLOCK_V is
# shared by all kernels: kernels 3 and 4 read the tile max of the same V-tiles kernel 1 wrote.
_GPU_BLOCKS = {
    ("logits", 2): dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ("grad", 2): dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=128, num_warps=8, num_stages=3),
    ("logits", 4): dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
    ("grad", 4): dict(BLOCK_C=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2),
}
# The interpreter pays ~5 ms per program step whatever the tile size: use big tiles.
_INTERP_BLOCKS = dict(BLOCK_C=64, BLOCK_V=512, BLOCK_D=128, num_warps=4, num_stages=1)


@triton.jit
def _tanh(x):
    """tanh that also runs in the interpreter (libdevice does not); exact to ~1e-7 absolute."""
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    small = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    y = tl.where(ax < 0.1, small, big)
    return tl.where(x < 0, -y, y)


@triton.jit
def _flce_logits_kernel(
    h_ptr, w_ptr, b_ptr, cw_ptr, y_ptr,  # inputs: h [C, D], w [V, D], bias [V], class weights [V], target [C]
    z_ptr,  # out: logits minus their tile max [C, V], input dtype
    tile_max_ptr, tile_sum_ptr, tile_zsum_ptr,  # out: per (row, V-tile) stats [C, NT], fp32
    target_ptr,  # out: target logit [C], fp32
    C, V, D,
    stride_hc, stride_hd, stride_wv, stride_wd, stride_zc, stride_tc,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, STORE_LOGITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_v = offs_v < V

    # --- GEMM: acc[c, v] = sum_d h[c, d] * w[v, d], float32 accumulation
    acc = tl.zeros((BLOCK_C, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + offs_d < D
        h = tl.load(
            h_ptr + offs_c[:, None].to(tl.int64) * stride_hc + (d0 + offs_d)[None, :].to(tl.int64) * stride_hd,
            mask=mask_c[:, None] & mask_d[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(
            w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + (d0 + offs_d)[:, None].to(tl.int64) * stride_wd,
            mask=mask_d[:, None] & mask_v[None, :], other=0.0,
        )  # fmt: skip
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

    # --- epilogue: bias, softcap, per-tile statistics
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:  # NaN and +inf logits make the row NaN; -inf (a masked class) stays allowed
        valid = (acc == acc) & (acc < float("inf"))
        acc = tl.where(valid, softcap * _tanh(acc / softcap), float("nan"))
    acc_m = tl.where(mask_v[None, :], acc, float("-inf"))
    tile_max = tl.max(acc_m, axis=1)
    # A tile whose logits are all -inf has no mass: shift by 0 there (its exp terms are 0).
    shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    tile_sum = tl.sum(tl.exp2((acc_m - shift[:, None]) * 1.4426950408889634), axis=1)
    t_offs = offs_c * stride_tc + pid_v
    tl.store(tile_max_ptr + t_offs, tile_max, mask=mask_c)  # -inf for an all -inf tile: no mass in the merge
    tl.store(tile_sum_ptr + t_offs, tile_sum, mask=mask_c)
    if HAS_SMOOTHING:
        zs = tl.where(mask_v[None, :], acc, 0.0)
        if HAS_CLASS_WEIGHT:  # the smoothing term sums cw[j] * z[j]
            zs *= tl.load(cw_ptr + offs_v, mask=mask_v, other=0.0)[None, :]
        tl.store(tile_zsum_ptr + t_offs, tl.sum(zs, axis=1), mask=mask_c)
    y = tl.load(y_ptr + offs_c, mask=mask_c, other=-1)
    hit = offs_v[None, :] == y[:, None]
    in_tile = (y >= pid_v * BLOCK_V) & (y < pid_v * BLOCK_V + BLOCK_V)
    tl.store(target_ptr + offs_c, tl.sum(tl.where(hit, acc, 0.0), axis=1), mask=mask_c & in_tile)
    if STORE_LOGITS:
        z_ptrs = z_ptr + offs_c[:, None].to(tl.int64) * stride_zc + offs_v[None, :]
        z = acc - shift[:, None]
        tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_v[None, :])


@triton.jit
def _flce_lse_kernel(
    tile_max_ptr, tile_sum_ptr, tile_zsum_ptr,  # in: per (row, V-tile) stats [C, NT]
    loss_scale_ptr, lse_scale_ptr,  # in: per-row weights of the loss and of lse [C] (optional)
    row_weight_ptr, weight_sum_ptr,  # in: class weight of each row's target [C], sum of the class weights [1]
    lse_ptr, zsum_ptr, alpha_ptr, beta_ptr, gamma_ptr,  # out [C]
    C, NT, stride_tc, V,
    z_loss, smoothing,
    HAS_SMOOTHING: tl.constexpr, HAS_LOSS_SCALE: tl.constexpr, HAS_LSE_SCALE: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < C
    offs_t = tl.arange(0, BLOCK_T)
    # --- pass 1: row max over tiles; pass 2: rescaled sum of the tile sums
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        mask = mask_r[:, None] & (t0 + offs_t < NT)[None, :]
        tm = tl.load(tile_max_ptr + offs_r[:, None] * stride_tc + t0 + offs_t[None, :], mask=mask, other=float("-inf"))
        m = tl.maximum(m, tl.max(tm, axis=1))
    m = tl.where(mask_r, m, 0.0)  # rows past C: keep the arithmetic finite
    s = tl.zeros((BLOCK_R,), tl.float32)
    zs = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        mask = mask_r[:, None] & (t0 + offs_t < NT)[None, :]
        offs = offs_r[:, None] * stride_tc + t0 + offs_t[None, :]
        tm = tl.load(tile_max_ptr + offs, mask=mask, other=float("-inf"))
        ts = tl.load(tile_sum_ptr + offs, mask=mask, other=0.0)
        s += tl.sum(tl.where(mask, ts * tl.exp2((tm - m[:, None]) * 1.4426950408889634), 0.0), axis=1)
        if HAS_SMOOTHING:
            zs += tl.sum(tl.load(tile_zsum_ptr + offs, mask=mask, other=0.0), axis=1)
    lse = m + tl.log(tl.where(mask_r, s, 1.0))
    lse = tl.where((lse == lse) & (tl.abs(lse) < float("inf")), lse, float("nan"))
    tl.store(lse_ptr + offs_r, lse, mask=mask_r)
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
    tl.store(alpha_ptr + offs_r, alpha, mask=mask_r)
    tl.store(beta_ptr + offs_r, beta, mask=mask_r)
    tl.store(gamma_ptr + offs_r, c * (smoothing / V), mask=mask_r)


@triton.jit
def _dlogits(z_ptr, tile_max_ptr, cw_ptr, y, lse, alpha, beta, gamma, offs_c, offs_v, mask_c, mask_v,
             stride_zc, stride_tc, tile_idx, softcap,
             HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr):  # fmt: skip
    """dz[c, v] for a [C-block, V-block] tile, from the stored relative logits (float32)."""
    zrel = tl.load(
        z_ptr + offs_c[:, None].to(tl.int64) * stride_zc + offs_v[None, :],
        mask=mask_c[:, None] & mask_v[None, :], other=0.0,
    ).to(tl.float32)  # fmt: skip
    tmax = tl.load(tile_max_ptr + offs_c * stride_tc + tile_idx, mask=mask_c, other=0.0)
    z = zrel + tl.where(tmax == float("-inf"), 0.0, tmax)[:, None]  # kernel 1 stored z - shift
    dz = alpha[:, None] * tl.exp2((z - lse[:, None]) * 1.4426950408889634)
    if HAS_GAMMA:
        if HAS_CLASS_WEIGHT:
            dz -= gamma[:, None] * tl.load(cw_ptr + offs_v, mask=mask_v, other=0.0)[None, :]
        else:
            dz -= gamma[:, None]
    dz -= tl.where(offs_v[None, :] == y[:, None], beta[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / softcap
        dz *= 1.0 - t * t
    return tl.where(mask_c[:, None] & mask_v[None, :], dz, 0.0)


@triton.jit
def _flce_grad_hidden_kernel(
    z_ptr, tile_max_ptr, w_ptr, cw_ptr, y_ptr, lse_ptr, alpha_ptr, beta_ptr, gamma_ptr,
    part_ptr,  # out: partial dh [SPLIT, C, D], fp32
    C, V, D, v_per_split,
    stride_zc, stride_tc, stride_wv, stride_wd,
    softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    pid_c = pid // num_pid_d
    pid_d = pid % num_pid_d
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_d = offs_d < D
    y = tl.load(y_ptr + offs_c, mask=mask_c, other=-1)
    lse = tl.load(lse_ptr + offs_c, mask=mask_c, other=0.0)
    alpha = tl.load(alpha_ptr + offs_c, mask=mask_c, other=0.0)
    beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
    gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0)

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    v_start = split * v_per_split
    for v0 in range(v_start, tl.minimum(v_start + v_per_split, V), BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        dz = _dlogits(z_ptr, tile_max_ptr, cw_ptr, y, lse, alpha, beta, gamma, offs_c, offs_v, mask_c, mask_v,
                      stride_zc, stride_tc, v0 // BLOCK_V, softcap, HAS_SOFTCAP, HAS_GAMMA, HAS_CLASS_WEIGHT)  # fmt: skip
        w = tl.load(
            w_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_d[None, :].to(tl.int64) * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :], other=0.0,
        )  # fmt: skip
        if UPCAST:
            acc = tl.dot(dz, w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    part_ptrs = part_ptr + (split * C + offs_c[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(part_ptrs, acc, mask=mask_c[:, None] & mask_d[None, :])


@triton.jit
def _flce_grad_weight_kernel(
    z_ptr, tile_max_ptr, h_ptr, cw_ptr, y_ptr, lse_ptr, alpha_ptr, beta_ptr, gamma_ptr,
    dw_ptr, db_ptr,  # in/out: float32 accumulators dW [V, D], db [V]
    C, V, D,
    stride_zc, stride_tc, stride_hc, stride_hd,
    softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    pid_v = pid // num_pid_d
    pid_d = pid % num_pid_d
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_v = offs_v < V
    mask_d = offs_d < D

    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        y = tl.load(y_ptr + offs_c, mask=mask_c, other=-1)
        lse = tl.load(lse_ptr + offs_c, mask=mask_c, other=0.0)
        alpha = tl.load(alpha_ptr + offs_c, mask=mask_c, other=0.0)
        beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
        gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0)
        dz = _dlogits(z_ptr, tile_max_ptr, cw_ptr, y, lse, alpha, beta, gamma, offs_c, offs_v, mask_c, mask_v,
                      stride_zc, stride_tc, pid_v, softcap, HAS_SOFTCAP, HAS_GAMMA, HAS_CLASS_WEIGHT)  # fmt: skip
        if HAS_DW:
            h = tl.load(
                h_ptr + offs_c[:, None].to(tl.int64) * stride_hc + offs_d[None, :].to(tl.int64) * stride_hd,
                mask=mask_c[:, None] & mask_d[None, :], other=0.0,
            )  # fmt: skip
            if UPCAST:
                acc = tl.dot(tl.trans(dz), h.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(tl.trans(dz.to(h.dtype)), h, acc, input_precision=DOT_PRECISION)
        if HAS_DB:
            dbias += tl.sum(dz, axis=0)
    if HAS_DW:
        dw_ptrs = dw_ptr + offs_v[:, None].to(tl.int64) * D + offs_d[None, :]
        mask = mask_v[:, None] & mask_d[None, :]
        tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask, other=0.0) + acc, mask=mask)
    if HAS_DB:
        if pid_d == 0:
            tl.store(db_ptr + offs_v, tl.load(db_ptr + offs_v, mask=mask_v, other=0.0) + dbias, mask=mask_v)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (tf32 only when the user allows it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


class TritonChunkBackend:
    """Per-chunk math in Triton (see ChunkBackend in fused_linear_cross_entropy_function).

    Args:
        chunk_bytes: memory for one chunk of stored logits (default: the module's CHUNK_BYTES).
        split: number of V-splits of the hidden-gradient GEMM (default: the module's SPLIT;
            None means enough splits to give every SM two programs).
    """

    def __init__(self, chunk_bytes: int | None = None, split: int | None = None):
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.split = SPLIT if split is None else split
        self.interpret = is_interpreter()

    def _blocks(self, grad: bool, dtype: torch.dtype) -> dict:
        if self.interpret:
            return dict(_INTERP_BLOCKS)
        return dict(_GPU_BLOCKS[("grad" if grad else "logits", dtype.itemsize)])

    def chunk_rows(self, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        block_c = self._blocks(False, dtype)["BLOCK_C"]
        rows = self.chunk_bytes // max(1, vocab * dtype.itemsize)
        rows = max(block_c, rows // block_c * block_c)
        return max(1, min(n_rows, rows))

    def _split(self, device: torch.device, n_tiles: int, n_vblocks: int) -> int:
        if self.split is not None:
            return max(1, min(self.split, n_vblocks))
        if self.interpret or device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_vblocks, triton.cdiv(2 * sms, n_tiles)))

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
        C, D = h_CD.shape
        V = w_VD.shape[0]
        dev = h_CD.device
        grad = loss_scale_C is not None or lse_scale_C is not None
        blocks = self._blocks(False, h_CD.dtype)
        BLOCK_V = blocks["BLOCK_V"]
        NT = triton.cdiv(V, BLOCK_V)
        smoothing = params.label_smoothing > 0
        softcap = params.softcap if params.softcap is not None else 1.0
        precision = _dot_precision(h_CD.dtype)
        f32 = dict(dtype=torch.float32, device=dev)

        tile_max = torch.empty((C, NT), **f32)
        tile_sum = torch.empty((C, NT), **f32)
        tile_zsum = torch.empty((C, NT), **f32) if smoothing else tile_sum
        target = torch.empty(C, **f32)
        z = torch.empty((C, V), dtype=h_CD.dtype, device=dev) if grad else tile_sum
        y_C = y_C.contiguous()
        b_V = None if b_V is None else b_V.contiguous()  # the kernels index the bias densely
        loss_scale_C = None if loss_scale_C is None else loss_scale_C.float().contiguous()
        lse_scale_C = None if lse_scale_C is None else lse_scale_C.float().contiguous()
        has_cw = cw_V is not None  # float32 and contiguous (the Function's accumulation dtype)
        if has_cw:
            row_weight_C = cw_V[y_C].contiguous()
            weight_sum = cw_V.sum().reshape(1)
        cw_smoothing = has_cw and smoothing  # kernels 1, 3, 4 read the class weights only for smoothing
        grid = (triton.cdiv(C, blocks["BLOCK_C"]) * NT,)
        _flce_logits_kernel[grid](
            h_CD, w_VD, b_V if b_V is not None else target, cw_V if has_cw else target, y_C,
            z, tile_max, tile_sum, tile_zsum, target,
            C, V, D,
            h_CD.stride(0), h_CD.stride(1), w_VD.stride(0), w_VD.stride(1), z.stride(0) if grad else 0, NT,
            softcap,
            HAS_BIAS=b_V is not None, HAS_SOFTCAP=params.softcap is not None, HAS_SMOOTHING=smoothing,
            HAS_CLASS_WEIGHT=cw_smoothing, STORE_LOGITS=grad, UPCAST=self.interpret, DOT_PRECISION=precision,
            BLOCK_C=blocks["BLOCK_C"], BLOCK_V=BLOCK_V, BLOCK_D=blocks["BLOCK_D"], GROUP_C=8,
            num_warps=blocks["num_warps"], num_stages=blocks["num_stages"],
        )  # fmt: skip

        lse = torch.empty(C, **f32)
        zsum = torch.empty(C, **f32) if smoothing else lse
        alpha, beta, gamma = (torch.empty(C, **f32) for _ in range(3))
        BLOCK_R = 16
        _flce_lse_kernel[(triton.cdiv(C, BLOCK_R),)](
            tile_max, tile_sum, tile_zsum,
            loss_scale_C if loss_scale_C is not None else lse,
            lse_scale_C if lse_scale_C is not None else lse,
            row_weight_C if has_cw else lse, weight_sum if has_cw else lse,
            lse, zsum, alpha, beta, gamma,
            C, NT, NT, V,
            params.z_loss, params.label_smoothing,
            HAS_SMOOTHING=smoothing, HAS_LOSS_SCALE=loss_scale_C is not None,
            HAS_LSE_SCALE=lse_scale_C is not None, HAS_CLASS_WEIGHT=has_cw,
            BLOCK_R=BLOCK_R, BLOCK_T=min(256, triton.next_power_of_2(NT)) if not self.interpret else triton.next_power_of_2(NT),
        )  # fmt: skip

        dh_CD = None
        if grad:
            gblocks = self._blocks(True, h_CD.dtype)
            gblocks["BLOCK_V"] = BLOCK_V  # must match the tiles whose max kernel 1 stored
            common = dict(
                HAS_SOFTCAP=params.softcap is not None, HAS_GAMMA=smoothing, HAS_CLASS_WEIGHT=cw_smoothing,
                UPCAST=self.interpret,
                DOT_PRECISION=precision, BLOCK_C=gblocks["BLOCK_C"], BLOCK_V=BLOCK_V,
                BLOCK_D=gblocks["BLOCK_D"], num_warps=gblocks["num_warps"],
                num_stages=gblocks["num_stages"],
            )  # fmt: skip
            if want_dh:
                n_tiles = triton.cdiv(C, gblocks["BLOCK_C"]) * triton.cdiv(D, gblocks["BLOCK_D"])
                split = self._split(dev, n_tiles, NT)
                v_per_split = triton.cdiv(NT, split) * BLOCK_V
                split = triton.cdiv(V, v_per_split)
                part = torch.empty((split, C, D), **f32)
                _flce_grad_hidden_kernel[(n_tiles, split)](
                    z, tile_max, w_VD, cw_V if has_cw else lse, y_C, lse, alpha, beta, gamma, part,
                    C, V, D, v_per_split,
                    z.stride(0), NT, w_VD.stride(0), w_VD.stride(1),
                    softcap, **common,
                )  # fmt: skip
                dh_CD = (part[0] if split == 1 else part.sum(dim=0)).to(h_CD.dtype)
            if dw_acc_VD is not None or db_acc_V is not None:
                grid_w = (NT * triton.cdiv(D, gblocks["BLOCK_D"]),)
                _flce_grad_weight_kernel[grid_w](
                    z, tile_max, h_CD, cw_V if has_cw else lse, y_C, lse, alpha, beta, gamma,
                    dw_acc_VD if dw_acc_VD is not None else lse, db_acc_V if db_acc_V is not None else lse,
                    C, V, D,
                    z.stride(0), NT, h_CD.stride(0), h_CD.stride(1),
                    softcap, HAS_DW=dw_acc_VD is not None, HAS_DB=db_acc_V is not None, **common,
                )  # fmt: skip
        return ChunkResult(lse, target, zsum if smoothing else None, dh_CD)
