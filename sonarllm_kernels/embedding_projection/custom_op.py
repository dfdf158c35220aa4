"""The Triton path of the fused embedding projection as PyTorch custom operators, so that
``torch.compile`` traces through it.

``sonarllm::fep_triton_fwd`` and ``sonarllm::fep_triton_bwd`` run the forward and backward of
``FusedEmbeddingProjectionFunction`` (sonarllm_kernels/embedding_projection/triton_backend.py, imported on
first call: Triton stays optional) as plain functions, through a stand-in for autograd's ctx.
To the compiler each is one opaque call with a shape function. Which gradients the backward
computes comes from autograd (a frozen weight costs no weight-gradient GEMM); the backward op
has no autograd formula of its own (a double backward raises). Eager mode calls the autograd
Function itself, as before.
"""

from typing import Optional

import torch
from torch import Tensor


class _Ctx:
    """Stands in for autograd's ctx, so the Function's static methods run as plain functions."""

    def __init__(self, mode: str, saved: tuple = (), needs_input_grad: tuple = ()):
        from sonarllm_kernels.embedding_projection.triton_backend import FEPParams

        self.params, self.saved_tensors, self.needs_input_grad = FEPParams(mode=mode), saved, needs_input_grad

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


def _function():
    from sonarllm_kernels.embedding_projection.triton_backend import FusedEmbeddingProjectionFunction

    return FusedEmbeddingProjectionFunction


@torch.library.custom_op("sonarllm::fep_triton_fwd", mutates_args=())
def _fwd_op(
    x_NI: Tensor, w_OI: Tensor, b_O: Optional[Tensor], center: Optional[Tensor], scale: Optional[Tensor], mode: str
) -> Tensor:
    """y [N, O] in x's dtype."""
    ctx = _Ctx(mode)
    return _function().forward(ctx, x_NI, w_OI, b_O, center, scale, ctx.params)


@_fwd_op.register_fake
def _fwd_fake(x_NI, w_OI, b_O, center, scale, mode):
    return x_NI.new_empty((x_NI.shape[0], w_OI.shape[0]))


@torch.library.custom_op("sonarllm::fep_triton_bwd", mutates_args=())
def _bwd_op(
    g_NO: Tensor,
    x_NI: Tensor,
    w_OI: Tensor,
    b_O: Optional[Tensor],
    center: Optional[Tensor],
    scale: Optional[Tensor],
    mode: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    need_center: bool,
    need_scale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, db, dcenter, dscale), each like its input, or an empty [0] tensor where not wanted."""
    needs = (need_x, need_w, need_b, need_center, need_scale)
    ctx = _Ctx(mode, (x_NI, w_OI, b_O, center, scale), needs)
    with torch.no_grad():  # as autograd runs it (once_differentiable then adds nothing)
        grads = _function().backward(ctx, g_NO)[:5]
    return tuple(g if g is not None else g_NO.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _bwd_fake(g_NO, x_NI, w_OI, b_O, center, scale, mode, need_x, need_w, need_b, need_center, need_scale):
    like = lambda need, t: torch.empty_like(t, memory_format=torch.contiguous_format) if need else g_NO.new_empty(0)
    return like(need_x, x_NI), like(need_w, w_OI), like(need_b, b_O), like(need_center, center), like(need_scale, scale)


def _setup_context(ctx, inputs, output):
    ctx.mode = inputs[5]
    ctx.save_for_backward(*inputs[:5])


def _backward(ctx, g_NO):
    x_NI, w_OI, b_O, center, scale = ctx.saved_tensors
    needs = [n and t is not None for n, t in zip(ctx.needs_input_grad[:5], ctx.saved_tensors)]
    grads = _bwd_op(g_NO, x_NI, w_OI, b_O, center, scale, ctx.mode, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_embedding_projection_triton_op(x, weight, bias, center, scale, mode: str) -> Tensor:
    """Differentiable Triton projection; inputs validated; x is [..., in_features]. In a compiled
    graph the custom ops; in eager mode the autograd Function itself (the dispatcher's per-call
    cost would buy nothing there)."""
    if not torch.compiler.is_compiling():
        from sonarllm_kernels.embedding_projection.triton_backend import fused_embedding_projection_triton

        return fused_embedding_projection_triton(x, weight, bias, center, scale, mode)
    bias = None if bias is None else bias.contiguous()  # the kernel reads the bias densely
    y_NO = _fwd_op(x.reshape(-1, x.shape[-1]), weight, bias, center, scale, mode)
    return y_NO.reshape(*x.shape[:-1], weight.shape[0])
