"""The Triton attention path as PyTorch custom operators, so that ``torch.compile`` traces through it.

``sonarllm::attention_triton_fwd`` and ``sonarllm::attention_triton_bwd`` wrap ``attention_fwd``
and ``attention_bwd`` of sonarllm_kernels/attention/triton_backend.py (imported on first call: Triton stays
optional). To the compiler each is one opaque call with a shape function; the kernel launches
(and their retry with smaller tiles) run inside. Sequence maxima are ints, symbolic under
``dynamic=True``, so batches of other lengths reuse the compiled graph. The backward
recomputes from the saved output and log-sum-exp (FlashAttention-2); it has no autograd formula
of its own (a double backward raises). Eager mode calls the autograd Function of
triton_backend.py, as before.
"""

from typing import Optional

import torch
from torch import Tensor


def _params(causal: bool, softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int):
    from sonarllm_kernels.attention.triton_backend import AttnParams

    return AttnParams(causal, softmax_scale, max_seqlen_q, max_seqlen_k)


@torch.library.custom_op("sonarllm::attention_triton_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[Tensor, Tensor]:
    """(output in q's layout, lse [H, rows] float32)."""
    from sonarllm_kernels.attention.triton_backend import attention_fwd

    params = _params(causal, softmax_scale, max_seqlen_q, max_seqlen_k)
    return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, params)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, max_seqlen_q, max_seqlen_k):
    rows = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((q.shape[-2], rows), dtype=torch.float32)


@torch.library.custom_op("sonarllm::attention_triton_bwd", mutates_args=())
def _bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the layouts and dtypes of q, k, v."""
    from sonarllm_kernels.attention.triton_backend import attention_bwd

    params = _params(causal, softmax_scale, max_seqlen_q, max_seqlen_k)
    return attention_bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, params)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, max_seqlen_q, max_seqlen_k):
    empty = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return empty(q), empty(k), empty(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros for lse's gradient (o is the only output that gets one)
    ctx.options = inputs[5:]
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)


def _backward(ctx, do, _lse_grad):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, cu_q, cu_k, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention_triton_op(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, max_seqlen_q, max_seqlen_k):
    """Differentiable Triton attention; inputs validated by ``sonarllm_kernels.attention.attention``. In a
    compiled graph the custom ops; in eager mode the same kernels through their autograd Function
    (the dispatcher's per-call cost would buy nothing there)."""
    if torch.compiler.is_compiling():
        return _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, max_seqlen_q, max_seqlen_k)[0]
    from sonarllm_kernels.attention.triton_backend import attention_triton

    params = _params(causal, softmax_scale, max_seqlen_q, max_seqlen_k)
    return attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, params)
