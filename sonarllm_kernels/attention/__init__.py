"""Scaled dot-product attention for the concept transformer and the packed SONAR decoder/encoder.

One functional, :func:`attention`, with flash-attn's layouts and conventions, so callers can pass
either padded batches or packed sequences (``cu_seqlens``) and switch implementation freely:

* batched: q [B, Sq, H, Dh], k/v [B, Sk, H, Dh] -> [B, Sq, H, Dh] (documents of sentences);
* varlen: q [Tq, H, Dh], k/v [Tk, H, Dh], int32 ``cu_seqlens_q/k`` [B + 1] -> [Tq, H, Dh]
  (thousands of ~15-token sentences packed without padding).

Causal masks are bottom-right aligned (query i sees key j <= i + Sk - Sq of its own sequence),
so one query against a KV cache sees the whole cache; a query that sees no key outputs zeros.

Paths (``impl``, see sonarllm_kernels/_dispatch.py): "triton" (our FlashAttention-2 kernels,
sonarllm_kernels/attention/triton_backend.py), "torch" (PyTorch SDPA, sonarllm_kernels/attention/torch_backend.py), "reference"
(the specification, sonarllm_kernels/attention/reference.py) and, outside the shared dispatch names for now,
"flash" (flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func``). Auto-detection on CUDA
prefers flash-attn when it imports and q is fp16/bf16, else the path AUTO_CUDA_PATHS names for
the kind of call (the measured faster of Triton and SDPA); it uses "torch" whenever the Triton
kernels cannot serve the call (dropout, float64, head dim > 128).
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from sonarllm_kernels._dispatch import KernelImpl, is_auto, resolve_impl
from sonarllm_kernels.attention.custom_op import attention_triton_op
from sonarllm_kernels.attention.reference import attention_ref
from sonarllm_kernels.attention.torch_backend import attention_torch_batched, attention_torch_varlen

TRITON_MAX_HEAD_DIM = 128  # = sonarllm_kernels.attention.triton_backend.MAX_HEAD_DIM (not imported: Triton is optional)
FLASH_MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# The path impl="auto" takes on CUDA where our Triton kernels can serve the call, per kind of
# call (call_kind): "triton" or "torch" (PyTorch SDPA), whichever bench/bench_attention.py
# measures faster on the H200 (bash bench/gpu_suite.sh prints what its measurements imply;
# bench/RESULTS.md holds them). Not measured yet: Triton everywhere.
AUTO_CUDA_PATHS = {"dense": "triton", "varlen": "triton", "decode": "triton"}


@functools.cache
def _flash_attn():
    """(flash_attn_func, flash_attn_varlen_func), or None when flash-attn cannot be imported."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build raising anything else
        return None
    return flash_attn_func, flash_attn_varlen_func


@torch.compiler.assume_constant_result  # torch.compile: not traced (an import Dynamo cannot follow)
def flash_attn_available() -> bool:
    """True when flash-attn's functions import (auto-detection then uses them for fp16/bf16 CUDA)."""
    return _flash_attn() is not None


def cu_seqlens_from_lengths(lengths, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Cumulative sequence lengths ``[0, l0, l0 + l1, ...]`` as int32 [B + 1], for ``attention``.

    Args:
        lengths: B non-negative lengths (a sequence of ints or a 1-D integer tensor).
        device: where to put the result (default: the tensor's device, else CPU).
    """
    if isinstance(lengths, torch.Tensor):
        integer = not (lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool)
        if lengths.dim() != 1 or not integer:
            raise ValueError(
                f"lengths must be a 1-D integer tensor, got {lengths.dtype} of shape {tuple(lengths.shape)}"
            )
        len_B = lengths.to(device=device if device is not None else lengths.device, dtype=torch.int64)
        if len_B.device.type == "cpu" and len_B.numel() and int(len_B.min()) < 0:
            raise ValueError(f"lengths must be >= 0, got {len_B.tolist()}")
    else:
        values = [operator.index(n) for n in lengths]
        if any(n < 0 for n in values):
            raise ValueError(f"lengths must be >= 0, got {values}")
        len_B = torch.tensor(values, dtype=torch.int64, device=device)
    cu = torch.zeros(len_B.numel() + 1, dtype=torch.int32, device=len_B.device)
    cu[1:] = torch.cumsum(len_B, 0)
    return cu


def _index(value) -> int:
    """``operator.index``, but an int passes unchanged: under torch.compile a symbolic int, which
    ``operator.index`` would specialise (one recompilation per sequence length)."""
    return value if isinstance(value, int) else operator.index(value)


def _check_args(q, k, v, causal, softmax_scale, cu_q, cu_k, max_q, max_k, dropout_p) -> bool:
    """Raise TypeError/ValueError naming the offending argument; return True for varlen."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor or None, got {type(t).__name__}")
    varlen = cu_q is not None
    if cu_k is not None and not varlen:
        raise ValueError("cu_seqlens_k was given without cu_seqlens_q (the varlen layout needs cu_seqlens_q)")
    if not varlen:
        for name, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if value is not None:
                raise ValueError(f"{name} is only used with cu_seqlens_q (the varlen layout); got {value}")

    rank, layout = (3, "[T, H, Dh] (varlen layout)") if varlen else (4, "[B, S, H, Dh] (batched layout)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            hint = "" if varlen else "; packed sequences need cu_seqlens_q"
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}{hint}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size B = {q.shape[0]}, got {tuple(k.shape)}")
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(f"k and v must have q's number of heads H = {q.shape[-2]}, got {k.shape[-2]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must have q's head dim Dh = {q.shape[-1]}, got {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("q must have a head dim Dh >= 1, got 0")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    if varlen:
        n_seq = None
        for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if t is None:
                continue
            if t.dtype != torch.int32:
                raise TypeError(f"{name} must be int32 (flash-attn's convention), got {t.dtype}")
            if t.dim() != 1 or t.numel() < 2:
                raise ValueError(f"{name} must have shape [B + 1] with B >= 1, got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
            if n_seq is not None and t.numel() != n_seq:
                raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape ({n_seq},), got {tuple(t.shape)}")
            n_seq = t.numel()
        for name, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if value is None:
                continue
            try:
                if isinstance(value, bool):
                    raise TypeError
                value = _index(value)
            except TypeError:
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}") from None
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value}")
    return varlen


def _varlen_max_lengths(q, k, cu_q, cu_k, max_q, max_k) -> tuple[int, int]:
    """Check cu_seqlens values and return (max_seqlen_q, max_seqlen_k).

    Costs one host sync when a maximum must be computed; then, and always on CPU (where it is
    free), the values are checked too. On CUDA, and under torch.compile (where a host read
    breaks the graph), with both maxima given nothing is checked: the caller vouches for
    cu_seqlens (as with flash-attn).
    """
    given = max_q is not None and max_k is not None
    if given and (q.device.type != "cpu" or torch.compiler.is_compiling()):
        return _index(max_q), _index(max_k)
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    stats = torch.stack(
        [cu_q[0], cu_q[-1], len_q.min(), len_q.max(), cu_k[0], cu_k[-1], len_k.min(), len_k.max()]
    ).tolist()
    for name, (first, last, shortest, longest), total, given_max in (
        ("q", stats[:4], q.shape[0], max_q),
        ("k", stats[4:], k.shape[0], max_k),
    ):
        arg = f"cu_seqlens_{name}" if name == "q" or cu_k is not cu_q else "cu_seqlens_q (used for k too)"
        if first != 0:
            raise ValueError(f"{arg} must start at 0, got {first}")
        if shortest < 0:
            raise ValueError(f"{arg} must be non-decreasing (cumulative lengths), found a length of {shortest}")
        if last != total:
            raise ValueError(f"{arg}[-1] must equal the number of {name} tokens {name}.shape[0] = {total}, got {last}")
        if given_max is not None and _index(given_max) < longest:
            raise ValueError(f"max_seqlen_{name} = {given_max} is smaller than the longest {name} sequence ({longest})")
    pick = lambda given_max, longest: longest if given_max is None else _index(given_max)
    return pick(max_q, stats[3]), pick(max_k, stats[7])


def _flash_usable(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in _HALF_DTYPES and head_dim <= FLASH_MAX_HEAD_DIM and head_dim % 8 == 0


def _triton_usable(dtype: torch.dtype, head_dim: int, dropout_p: float) -> bool:
    return dtype != torch.float64 and head_dim <= TRITON_MAX_HEAD_DIM and dropout_p == 0


def call_kind(varlen: bool, seqlen_q: int) -> str:
    """The kind of call AUTO_CUDA_PATHS is keyed by: "varlen" (packed sequences), "decode" (one
    query per sequence against a KV cache, batched) or "dense" (batched)."""
    if varlen:
        return "varlen"
    return "decode" if seqlen_q == 1 else "dense"


def _choose_path(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int, dropout_p: float,
                 kind: str = "dense") -> str:  # fmt: skip
    """The concrete path: "flash", "triton", "torch" or "reference" (raises if impossible)."""
    auto = is_auto(impl)
    impl = resolve_impl(impl, device, "attention", extra_impls=("flash",))
    if impl == "flash":
        if not flash_attn_available():
            raise RuntimeError("attention: impl='flash' but flash_attn cannot be imported (pip install flash-attn)")
        if device.type != "cuda":
            raise RuntimeError(f"attention: impl='flash' needs CUDA tensors, got {device}")
        if not _flash_usable(dtype, head_dim):
            raise ValueError(
                f"attention: impl='flash' needs float16/bfloat16 and a head dim <= {FLASH_MAX_HEAD_DIM} "
                f"divisible by 8, got {dtype} and {head_dim}"
            )
        return "flash"
    if auto and device.type == "cuda" and flash_attn_available() and _flash_usable(dtype, head_dim):
        return "flash"
    path = impl
    if auto and path == "triton" and device.type == "cuda":
        path = AUTO_CUDA_PATHS[kind]
    if path == "triton" and not _triton_usable(dtype, head_dim, dropout_p):
        if auto:
            return "torch"
        if dropout_p > 0:
            raise ValueError(f"attention: impl='triton' has no dropout, got dropout_p={dropout_p}; use impl='torch'")
        if dtype == torch.float64:
            raise TypeError(
                "attention: impl='triton' supports float32, bfloat16 and float16; use impl='torch' for float64"
            )
        raise ValueError(
            f"attention: impl='triton' supports head dims <= {TRITON_MAX_HEAD_DIM}, got q head dim {head_dim}; "
            "use impl='torch'"
        )
    return path


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    impl: KernelImpl = "auto",
) -> torch.Tensor:
    """``softmax(softmax_scale * q k^T + mask) v`` per sequence and head, flash-attn style.

    Equivalent to sonarllm_kernels.attention.reference.attention_ref (the specification); only "reference"
    materialises the [Sq, Sk] scores.

    Args:
        q: [B, Sq, H, Dh] (batched), or [Tq, H, Dh] with ``cu_seqlens_q`` (varlen). float32,
            bfloat16, float16 or float64 (float64: "torch"/"reference" only).
        k, v: [B, Sk, H, Dh], or [Tk, H, Dh] with varlen; same dtype, device, H and Dh as q.
        causal: query i attends keys j <= i + (Sk - Sq) of its own sequence (bottom-right
            alignment); False attends every key of the sequence.
        softmax_scale: scale of q k^T; default 1 / sqrt(Dh).
        cu_seqlens_q: int32 [B + 1], cumulative query lengths starting at 0 and ending at Tq
            (see :func:`cu_seqlens_from_lengths`); selects the varlen layout. Empty sequences
            are allowed.
        cu_seqlens_k: int32 [B + 1] for k/v; default ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: longest query / key sequence (varlen only); max_seqlen_k
            defaults to max_seqlen_q when k shares q's cu_seqlens. Computed when None, which
            costs a host sync; when both are given on CUDA, cu_seqlens and the
            maxima are trusted, not checked: a too-small maximum leaves rows out (zeros on
            "triton"; wrong rows or a device-side assert on "torch"), so pass exact values.
        dropout_p: dropout on the attention weights, applied whenever > 0 (a training-mode
            functional like ``flash_attn_func``: pass 0 in evaluation). Not supported by "triton".
        impl: "auto", "triton", "torch", "reference" or "flash" (see the module docstring).

    Returns:
        [B, Sq, H, Dh] or [Tq, H, Dh], q's dtype.

    Raises:
        TypeError, ValueError: on bad input, naming the argument.
        RuntimeError: when the requested ``impl`` cannot run here.
    """
    varlen = _check_args(
        q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p
    )
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    dropout_p = float(dropout_p)
    path = _choose_path(impl, q.device, q.dtype, head_dim, dropout_p, call_kind(varlen, q.shape[1]))

    cu_q = cu_k = None
    max_q, max_k = (q.shape[1], k.shape[1]) if not varlen else (None, None)
    if varlen:
        cu_q = cu_seqlens_q.contiguous()
        cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.contiguous()
        if cu_seqlens_k is None and max_seqlen_k is None:
            max_seqlen_k = max_seqlen_q  # k has q's lengths: no host sync to find its maximum
        max_q, max_k = _varlen_max_lengths(q, k, cu_q, cu_k, max_seqlen_q, max_seqlen_k)

    if path == "reference":
        return attention_ref(
            q, k, v, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dropout_p=dropout_p
        )
    if path == "flash":
        return _flash(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p)
    if path == "triton":
        return attention_triton_op(q, k, v, cu_q, cu_k, causal, scale, max_q, max_k)
    if varlen:
        return attention_torch_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale, dropout_p=dropout_p
        )
    return attention_torch_batched(q, k, v, causal=causal, softmax_scale=scale, dropout_p=dropout_p)


def _flash(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, fns=None):
    """flash-attn's functions take our layouts and conventions unchanged (``fns``: for tests)."""
    flash_attn_func, flash_attn_varlen_func = fns if fns is not None else _flash_attn()
    if cu_q is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    return flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, softmax_scale=scale, causal=causal
    )
