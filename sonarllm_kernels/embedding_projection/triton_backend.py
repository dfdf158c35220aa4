"""The "triton" path of the fused embedding projection: one GEMM kernel with a normalizing
prologue and an affine epilogue, used for the forward and for both backward products.

Computes what sonarllm_kernels/embedding_projection/reference.py specifies, without a pass of its own
for the normalizer (N tokens, I = in_features, O = out_features, per-feature c = center,
s = scale, r = 1/s; all products accumulate in float32)::

    mode "in"  forward  y  = ((x - c) * r) @ W.T + b    normalization on load of x's K-tiles,
                                                        rounded to x's dtype before tl.dot
               backward dx = (dy @ W) * r               r in the epilogue
                        dW = dy.T @ ((x - c) * r)       normalization on load of x; split-K over
                        db = sum_n dy                   tokens; db from the same loads of dy
    mode "out" forward  y  = (x @ W.T + b) * s + c      epilogue
               backward dx = (dy * s) @ W               s on load of dy's K-tiles
                        dW = s * (dy.T @ x)             s in the epilogue, split-K over tokens
                        db = s * sum_n dy

Gradients are computed only for inputs that require one (a frozen weight costs no dW GEMM).
Gradients of center/scale (rarely wanted: the normalizer is a frozen, fitted buffer) are
supported with PyTorch reductions in the backward: "in" dc = -sum_n dx, ds = -sum_n dx * x_n;
"out" dc = sum_n dy, ds = sum_n dy * (x @ W.T + b) (one recomputed GEMM).

The normalization runs on CUDA cores inside the GEMM main loop (BLOCK_M x BLOCK_K fp32 ops per
step beside BLOCK_M x BLOCK_N x BLOCK_K MACs), so x is read once and no normalized copy of it
is ever written. Supported dtypes: float32 (tl.dot in IEEE fp32 unless
``torch.set_float32_matmul_precision`` allows tf32), bfloat16, float16; center/scale in any
float dtype (converted to float32, E elements). Split-K partial sums of dW are reduced
deterministically (no atomics). Under ``TRITON_INTERPRET=1`` the same kernel runs on the CPU
with large blocks and operands upcast to float32 before ``tl.dot`` (the interpreter cannot
multiply bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sonarllm_kernels._dispatch import is_interpreter, multiprocessor_count

# Number of token splits of the weight-gradient GEMM (K = tokens, few output tiles); None picks
# enough splits to give every SM two programs. Tests set it to exercise the split path.
SPLIT_K: int | None = None

# Hopper-style GEMM tiles, chosen by the usual rules, not yet tuned on hardware: 64 x 128 output
# tiles (one warpgroup's wgmma height; 4 warps), 64-deep (16-bit) or 32-deep (fp32) K steps, 3
# stages. One size for every token count, so that a run compiles one variant per product: a
# training micro-batch of 64 x 33 tokens at D = 1024 makes 264 tiles, two full waves on an
# H200's 132 SMs (128-row tiles would make 136: a second wave of 4).
_GPU_BLOCKS = {
    2: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    4: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3),
}
# The interpreter pays ~5 ms per program loop step whatever the tile size: use big tiles.
_INTERP_BLOCKS = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=1)

_NONE, _ALONG_N, _ALONG_M = 0, 1, 2  # where an epilogue multiplier's index runs


def _fep_gemm(
    a_ptr,  # A [M, K], any strides
    b_ptr,  # B [K, N], any strides
    out_ptr,  # out [SPLIT, M, N]: this split's product (the result itself when SPLIT == 1)
    a_shift_ptr,  # [K] fp32: A's column k becomes (a - a_shift[k]) * a_mul[k] (A_NORM == 2)
    a_mul_ptr,  # [K] fp32: A's column k is multiplied by a_mul[k] (A_NORM >= 1)
    b_shift_ptr,  # [N] fp32: B's column n becomes (b - b_shift[n]) * b_mul[n] (B_NORM)
    b_mul_ptr,  # [N] fp32
    bias_ptr,  # [N]: added to the product (SPLIT == 1 only)
    ep_mul_ptr,  # [N] or [M] fp32 (EP_MUL == 1 or 2): multiplies the result after the bias
    ep_add_ptr,  # [N] fp32: added last (SPLIT == 1 only)
    rowsum_ptr,  # out [SPLIT, M] fp32: sum over this split's K of raw A (times ep_mul along M)
    M, N, K,  # problem size
    k_per_split,  # K elements per split (a multiple of BLOCK_K)
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_os, stride_om, stride_on,
    A_NORM: tl.constexpr,  # 0: none, 1: multiply, 2: shift then multiply
    B_NORM: tl.constexpr,  # False / True: shift then multiply B's columns
    HAS_BIAS: tl.constexpr,
    EP_MUL: tl.constexpr,  # 0: none, 1: along N, 2: along M
    HAS_EP_ADD: tl.constexpr,
    ROWSUM: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: multiply in fp32
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # M-tiles per group, so programs that share B tiles run together
):  # fmt: skip
    # --- map the program to an (M-tile, N-tile) of one K-split, grouped for L2 reuse
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    if B_NORM:
        b_shift = tl.load(b_shift_ptr + offs_n, mask=mask_n, other=0.0)
        b_mul = tl.load(b_mul_ptr + offs_n, mask=mask_n, other=0.0)

    # --- main loop: normalize on load, accumulate in fp32. Out-of-range k load 0 in A *and* B
    #     (and 0 shift/mul), so a normalized padding column meets a zero and adds nothing.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_stop
        a = tl.load(a_rows + kk[None, :].to(tl.int64) * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None].to(tl.int64) * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if ROWSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        if A_NORM > 0:
            af = a.to(tl.float32)
            if A_NORM == 2:
                af -= tl.load(a_shift_ptr + kk, mask=mask_k, other=0.0)[None, :]
            af *= tl.load(a_mul_ptr + kk, mask=mask_k, other=0.0)[None, :]
            a = af.to(a_ptr.dtype.element_ty)  # rounded once, as the reference's normalized x
        if B_NORM:
            b = ((b.to(tl.float32) - b_shift[None, :]) * b_mul[None, :]).to(b_ptr.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # --- epilogue: bias, per-feature multiplier and shift, masked store
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EP_MUL == 1:
        acc *= tl.load(ep_mul_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if EP_MUL == 2:
        m_mul = tl.load(ep_mul_ptr + offs_m, mask=mask_m, other=0.0)
        acc *= m_mul[:, None]
        rsum *= m_mul
    if HAS_EP_ADD:
        acc += tl.load(ep_add_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_ptrs = (
        out_ptr + split.to(tl.int64) * stride_os
        + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    )  # fmt: skip
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + split * M + offs_m, rsum, mask=mask_m)


# One kernel, two compiled families. Token counts change with every batch; they are runtime ints
# (not specialised on "divisible by 16" / "== 1"), so that every batch of a run shares one
# variant. They are M (rows of x or dy) in the forward and d x products, K (the reduction) in the
# split-K weight-gradient product. Neither indexes a contiguous dimension there; the feature
# sizes, which do (vector loads), stay specialised.
_fep_gemm_kernel = triton.jit(do_not_specialize=["M", "stride_os"])(_fep_gemm)
_fep_gemm_split_k_kernel = triton.jit(do_not_specialize=["K", "k_per_split"])(_fep_gemm)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul precision setting (tf32 only when the user allows it)."""
    if is_interpreter() or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _blocks(dtype: torch.dtype) -> dict:
    return dict(_INTERP_BLOCKS if is_interpreter() else _GPU_BLOCKS[dtype.itemsize])


def _split_k(M: int, N: int, K: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(number of K-splits, K elements per split) for a GEMM with a long K (tokens)."""
    block_k = cfg["BLOCK_K"]
    if SPLIT_K is not None:
        want = SPLIT_K
    elif is_interpreter():
        want = 1
    else:
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        sms = multiprocessor_count(device)
        want = min(triton.cdiv(2 * sms, tiles), triton.cdiv(K, 8 * block_k))  # >= 8 K-steps each
    want = max(1, min(want, triton.cdiv(max(K, 1), block_k)))
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), want), block_k) * block_k
    return triton.cdiv(max(K, 1), k_per_split), k_per_split


def fep_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    a_shift: torch.Tensor | None = None,
    a_mul: torch.Tensor | None = None,
    b_shift: torch.Tensor | None = None,
    b_mul: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ep_mul: torch.Tensor | None = None,
    ep_mul_along: int = _NONE,
    ep_add: torch.Tensor | None = None,
    want_rowsum: bool = False,
    split_k: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(((a - a_shift) * a_mul) @ ((b - b_shift) * b_mul) + bias) * ep_mul + ep_add``, fp32 accumulation.

    Args:
        a: [M, K] and b: [K, N], same dtype, any strides (transposed views are free).
        out_dtype: dtype of the result.
        a_shift, a_mul: [K] fp32 applied to A's columns; b_shift, b_mul: [N] fp32 to B's.
        bias: [N]; ep_mul: [N] or [M] fp32 (``ep_mul_along``); ep_add: [N] fp32.
        want_rowsum: also return ``sum_k a[:, k]`` (times ep_mul when it runs along M), fp32.
        split_k: split K across programs (for K = tokens); partials are summed in fp32.

    Returns:
        (out [M, N], rowsum [M] or None).
    """
    M, K = a.shape
    K2, N = b.shape
    assert K == K2 and a.dtype == b.dtype, f"fep_gemm: A {tuple(a.shape)} {a.dtype} vs B {tuple(b.shape)} {b.dtype}"
    assert a_mul is not None or a_shift is None, "a_shift needs a_mul"
    assert (b_shift is None) == (b_mul is None), "b_shift and b_mul go together"
    device = a.device
    cfg = _blocks(a.dtype)
    n_split, k_per_split = _split_k(M, N, K, cfg, device) if split_k else (1, max(K, 1))
    assert n_split == 1 or (bias is None and ep_add is None), "split-K takes no bias/shift"
    # Split-K partial sums are float32 even when K makes one split: the compiled variant must not
    # depend on the token count.
    part_dtype = torch.float32 if split_k else out_dtype
    out = torch.empty((n_split, M, N), dtype=part_dtype, device=device)
    rowsum = torch.empty((n_split, M), dtype=torch.float32, device=device) if want_rowsum else None
    if M > 0 and N > 0:
        dummy = torch.empty(1, dtype=torch.float32, device=device)  # unused pointers: one type always
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), n_split)
        kernel = _fep_gemm_split_k_kernel if split_k else _fep_gemm_kernel
        kernel[grid](
            a, b, out,
            dummy if a_shift is None else a_shift, dummy if a_mul is None else a_mul,
            dummy if b_shift is None else b_shift, dummy if b_mul is None else b_mul,
            dummy if bias is None else bias, dummy if ep_mul is None else ep_mul,
            dummy if ep_add is None else ep_add, dummy if rowsum is None else rowsum,
            M, N, K, k_per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
            A_NORM=0 if a_mul is None else (1 if a_shift is None else 2),
            B_NORM=b_mul is not None, HAS_BIAS=bias is not None,
            EP_MUL=_NONE if ep_mul is None else ep_mul_along, HAS_EP_ADD=ep_add is not None,
            ROWSUM=want_rowsum, UPCAST=is_interpreter(), DOT_PRECISION=_dot_precision(a.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    elif M > 0 and want_rowsum:
        rowsum.zero_()
    result = (out[0] if n_split == 1 else out.sum(dim=0)).to(out_dtype)
    if rowsum is not None:
        rowsum = rowsum[0] if n_split == 1 else rowsum.sum(dim=0)
    return result, rowsum


@dataclass(frozen=True)
class FEPParams:
    """The non-tensor options of one call (one argument for the autograd Function)."""

    mode: str  # "in": normalize -> linear; "out": linear -> denormalize


def _norm_vectors(center: torch.Tensor, scale: torch.Tensor, mode: str):
    """(center, multiplier) as contiguous fp32: 1/scale for "in", scale for "out"."""
    c = center.detach().to(torch.float32).contiguous()
    s = scale.detach().to(torch.float32)
    return c, (1.0 / s if mode == "in" else s).contiguous()


class FusedEmbeddingProjectionFunction(torch.autograd.Function):
    """Inputs already validated; x is 2-D [N, I]; center/scale both given or both None."""

    @staticmethod
    def forward(ctx, x_NI, w_OI, b_O, center, scale, params: FEPParams):
        has_norm = center is not None
        kw = {}
        if has_norm:
            c, m = _norm_vectors(center, scale, params.mode)
            kw = dict(a_shift=c, a_mul=m) if params.mode == "in" else dict(ep_mul=m, ep_mul_along=_ALONG_N, ep_add=c)
        y_NO, _ = fep_gemm(x_NI, w_OI.t(), x_NI.dtype, bias=b_O, **kw)
        ctx.params = params
        ctx.save_for_backward(x_NI, w_OI, b_O, center, scale)
        return y_NO

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_NO):
        x_NI, w_OI, b_O, center, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_c, need_s = ctx.needs_input_grad[:5]
        has_norm = center is not None
        need_c, need_s = has_norm and need_c, has_norm and need_s
        c, m = _norm_vectors(center, scale, ctx.params.mode) if has_norm else (None, None)
        f32 = torch.float32
        dx = dw = db = dc = ds = None
        if ctx.params.mode == "in":
            if need_x or need_c or need_s:  # dc, ds are reductions of dx
                dx, _ = fep_gemm(g_NO, w_OI, x_NI.dtype, ep_mul=m, ep_mul_along=_ALONG_N)
            if need_w:
                dw, db = fep_gemm(g_NO.t(), x_NI, w_OI.dtype, b_shift=c, b_mul=m, want_rowsum=need_b, split_k=True)
            if need_b and db is None:
                db = g_NO.sum(dim=0, dtype=f32)
            if need_c:
                dc = -dx.sum(dim=0, dtype=f32)
            if need_s:
                ds = -(dx.to(f32) * ((x_NI.to(f32) - c) * m)).sum(dim=0)
            if not need_x:
                dx = None
        else:
            if need_x:
                dx, _ = fep_gemm(g_NO, w_OI, x_NI.dtype, a_mul=m)
            if need_w:
                dw, db = fep_gemm(g_NO.t(), x_NI, w_OI.dtype, ep_mul=m, ep_mul_along=_ALONG_M, want_rowsum=need_b, split_k=True)
            if need_b and db is None:
                db = g_NO.sum(dim=0, dtype=f32)
                db = db if m is None else db * m
            if need_c:
                dc = g_NO.sum(dim=0, dtype=f32)
            if need_s:
                ds = (g_NO.to(f32) * F.linear(x_NI, w_OI, b_O).to(f32)).sum(dim=0)
        cast = lambda t, like: None if t is None else t.to(like.dtype)
        return dx, dw, cast(db, b_O), cast(dc, center), cast(ds, scale), None


def fused_embedding_projection_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    center: torch.Tensor | None,
    scale: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Inputs already validated; x is [..., in_features]. Returns [..., out_features]."""
    bias = None if bias is None else bias.contiguous()  # the kernel reads the bias densely
    x_NI = x.reshape(-1, x.shape[-1])
    y_NO = FusedEmbeddingProjectionFunction.apply(x_NI, weight, bias, center, scale, FEPParams(mode=mode))
    return y_NO.reshape(*x.shape[:-1], weight.shape[0])
