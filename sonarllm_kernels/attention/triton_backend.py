"""The "triton" path of ``sonarllm_kernels.attention``: FlashAttention-2 style kernels, forward and backward
(the kernels themselves are in triton_kernels.py; their launch settings, launchers and autograd Function here).

Computes ``softmax(scale * q k^T + causal_mask) v`` per (sequence, head) without materialising
the [Sq, Sk] scores (see sonarllm_kernels/attention/reference.py for the exact specification). Float32
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

from sonarllm_kernels._dispatch import is_interpreter
from sonarllm_kernels.attention.triton_kernels import (  # noqa: F401 (the kernels, also for tests and warm-up)
    _RUNTIME_SIZES,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_fwd_kernel,
)

MAX_HEAD_DIM = 128  # q, k, v, dk and dv tiles live in registers; 256 would need smaller blocks
LOG2E = 1.4426950408889634

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



@dataclass(frozen=True)
class AttnParams:
    """The non-tensor options of one call (one argument for the autograd Function)."""

    causal: bool
    softmax_scale: float
    max_seqlen_q: int
    max_seqlen_k: int


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

