"""Fused linear cross-entropy as PyTorch custom operators, so that ``torch.compile`` traces through it.

``sonarllm::flce_forward`` and ``sonarllm::flce_backward`` wrap the chunked forward and backward
of sonarllm_kernels/fused_linear_cross_entropy/function.py ("torch" or "triton" chunk backend). To the
compiler each op is one opaque call with a shape function (``register_fake``), so everything
data-dependent stays inside it, where it runs on real values also in a compiled graph: the
check of the target values and class weights (ValueError, as in eager mode), the count of the
non-ignored rows, their compaction, and the chunk loop. That costs one host sync per forward
(and one more in a backward that recomputes), as in eager mode, but no graph break.

A custom op must be functional, so the gradient that the forward computes while each chunk's
logits exist (the two-GEMM schedule) leaves it as outputs (``dh``, ``dw``, ``db``; empty [0]
tensors where not computed) that autograd saves for the backward, which only scales them (and
recomputes where the schedule needs it). Which inputs get a gradient is decided by the caller
(``want_dh``, ``want_dw``, ``want_db``: grad mode and ``requires_grad``), so a frozen weight
costs no weight-gradient work in a compiled graph either.

No double backward: the gradient is precomputed (a constant to autograd), so a gradient of it
would be silently wrong. The backward therefore raises a RuntimeError as soon as a graph of the
gradient is requested — autograd runs a backward with grad mode on exactly then
(``create_graph=True``, e.g. a gradient penalty) — on the eager and the custom-op path alike;
impl="reference" differentiates twice.

Outside a compiled graph the same forward, saved context and backward run through a plain
autograd Function instead (``_EagerFunction``): the dispatcher's per-call cost would buy nothing
there.
"""

from typing import Optional

import torch
from torch import Tensor

from sonarllm_kernels.fused_linear_cross_entropy.function import (
    FLCEParams,
    flce_backward,
    flce_forward,
    grad_in_forward,
    saves_inputs,
)
from sonarllm_kernels.fused_linear_cross_entropy.torch_backend import TorchChunkBackend


def _triton_backend():
    from sonarllm_kernels.fused_linear_cross_entropy.triton_backend import TritonChunkBackend

    return TritonChunkBackend()


BACKENDS = {"torch": lambda: TorchChunkBackend(), "triton": _triton_backend}

# The ops read counts on the host, which a CUDA graph cannot capture: tagged so that inductor's
# "reduce-overhead" mode leaves them out of its CUDA graphs (where this torch has the tag).
_HOST_SYNC = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def _params(ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse, return_z_loss) -> FLCEParams:
    # shift is applied to the targets before the op; 0 here.
    return FLCEParams(ignore_index, reduction, label_smoothing, z_loss, softcap, 0, return_lse, return_z_loss)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _or_empty(t: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Custom ops return tensors: an absent gradient is an empty [0] tensor."""
    return t if t is not None else like.new_empty(0, dtype=dtype)


# --- forward ------------------------------------------------------------------------------------


def _forward(
    h_ND: Tensor,
    w_VD: Tensor,
    b_V: Optional[Tensor],
    cw_V: Optional[Tensor],
    y_N: Tensor,
    num_items_count: Optional[int],
    num_items_tensor: Optional[Tensor],
    backend: str,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    return_lse: bool,
    return_z_loss: bool,
    want_dh: bool,
    want_dw: bool,
    want_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse_N, zl, dh_ND, dw_VD, db_V, denom); see ``flce_forward``."""
    params = _params(ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse, return_z_loss)
    num_items = num_items_tensor if num_items_tensor is not None else num_items_count
    loss, lse_N, zl, dh_ND, dw_VD, db_V, denom = flce_forward(
        BACKENDS[backend](), h_ND, w_VD, b_V, cw_V, y_N, num_items, params, want_dh, want_dw, want_db
    )
    acc = _acc_dtype(h_ND.dtype)
    return loss, lse_N, zl, _or_empty(dh_ND, h_ND, h_ND.dtype), _or_empty(dw_VD, h_ND, acc), _or_empty(db_V, h_ND, acc), denom


_forward_op = torch.library.custom_op("sonarllm::flce_forward", _forward, mutates_args=(), tags=_HOST_SYNC)


@_forward_op.register_fake
def _forward_fake(h_ND, w_VD, b_V, cw_V, y_N, num_items_count, num_items_tensor, backend, ignore_index, reduction,
                  label_smoothing, z_loss, softcap, return_lse, return_z_loss, want_dh, want_dw, want_db):  # fmt: skip
    acc = _acc_dtype(h_ND.dtype)
    n_rows = h_ND.shape[0]
    in_forward = grad_in_forward(reduction, want_dh, want_dw, want_db)
    per_token = (n_rows,) if reduction == "none" else ()
    grad = lambda want, shape, dtype: h_ND.new_empty(shape if in_forward and want else (0,), dtype=dtype)
    return (
        h_ND.new_empty(per_token, dtype=acc),
        h_ND.new_empty((n_rows,), dtype=acc),
        h_ND.new_empty(per_token, dtype=acc),
        torch.empty_like(h_ND) if in_forward and want_dh else h_ND.new_empty(0),  # zeros_like(h_ND)'s strides
        grad(want_dw, w_VD.shape, acc),
        grad(want_db, (w_VD.shape[0],), acc),
        h_ND.new_empty((), dtype=torch.float64),
    )


# --- backward -----------------------------------------------------------------------------------


def _backward_grads(
    g_loss: Optional[Tensor],
    g_lse: Optional[Tensor],
    g_zl: Optional[Tensor],
    dh_ND: Tensor,
    dw_VD: Tensor,
    db_V: Tensor,
    denom: Tensor,
    h_ND: Optional[Tensor],
    w_VD: Optional[Tensor],
    b_V: Optional[Tensor],
    cw_V: Optional[Tensor],
    y_N: Optional[Tensor],
    lse_N: Optional[Tensor],
    backend: str,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    return_lse: bool,
    return_z_loss: bool,
    want_dh: bool,
    want_dw: bool,
    want_db: bool,
    n_rows: int,
    vocab: int,
    dim: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh_ND, dw_VD, db_V), contiguous, in the inputs' dtype, empty [0] where not wanted; see
    ``flce_backward``."""
    params = _params(ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse, return_z_loss)
    wants = (want_dh, want_dw, want_db)
    in_forward = grad_in_forward(reduction, *wants)
    forward_grads = tuple(t if in_forward and want else None for t, want in zip((dh_ND, dw_VD, db_V), wants))
    inputs = (h_ND, w_VD, b_V, cw_V, y_N) if h_ND is not None else None
    device = denom.device
    grad_like = [((n_rows, dim), dtype, device), ((vocab, dim), dtype, device), ((vocab,), dtype, device)]
    grads = flce_backward(
        BACKENDS[backend](), params, (g_loss, g_lse, g_zl), forward_grads, denom, inputs, lse_N, wants, grad_like,
        y_N=y_N,
    )
    return tuple(_or_empty(g, denom, dtype).contiguous() for g in grads)  # hidden's gradient follows its strides


_backward_op = torch.library.custom_op("sonarllm::flce_backward", _backward_grads, mutates_args=(), tags=_HOST_SYNC)


@_backward_op.register_fake
def _backward_fake(g_loss, g_lse, g_zl, dh_ND, dw_VD, db_V, denom, h_ND, w_VD, b_V, cw_V, y_N, lse_N, backend,
                   ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse, return_z_loss, want_dh,
                   want_dw, want_db, n_rows, vocab, dim, dtype):  # fmt: skip
    grad = lambda want, shape: denom.new_empty(shape if want else (0,), dtype=dtype)
    return grad(want_dh, (n_rows, dim)), grad(want_dw, (vocab, dim)), grad(want_db, (vocab,))


# --- autograd -----------------------------------------------------------------------------------

# Positions of the forward op's arguments (see _forward_op).
_OPTIONS = slice(7, 15)  # backend .. return_z_loss
_WANTS = slice(15, 18)


def _setup_context(ctx, inputs, output):
    h_ND, w_VD, b_V, cw_V, y_N = inputs[:5]
    options, wants = inputs[_OPTIONS], inputs[_WANTS]
    return_lse, return_z_loss = options[-2:]
    loss, lse_N, zl, dh_ND, dw_VD, db_V, denom = output
    ctx.mark_non_differentiable(dh_ND, dw_VD, db_V, denom)
    if not return_lse:
        ctx.mark_non_differentiable(lse_N)
    if not return_z_loss:
        ctx.mark_non_differentiable(zl)
    ctx.set_materialize_grads(False)
    ctx.options, ctx.wants = options, wants
    ctx.sizes = (h_ND.shape[0], w_VD.shape[0], h_ND.shape[1], h_ND.dtype)
    saved = [dh_ND, dw_VD, db_V, denom]
    if saves_inputs(_params(*options[1:]), *wants):
        saved += [h_ND, w_VD, b_V, cw_V, y_N, lse_N if return_z_loss else None]
    else:  # per-token losses: the targets, so that ignored rows get no share of the incoming gradient
        saved += [None, None, None, None, y_N if options[2] == "none" else None, None]
    ctx.save_for_backward(*saved)


def _refuse_double_backward(backend: str) -> None:
    """Raise when autograd asks for a graph of the gradient (grad mode is on in a backward
    exactly when ``create_graph=True``): ours would be a constant, so second derivatives (and
    a gradient penalty's weight gradient) would be wrong without a word."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f'fused_linear_cross_entropy (impl="{backend}") cannot differentiate twice: its gradient is '
            "computed in the forward, so a graph of it (create_graph=True, e.g. for a gradient penalty) "
            'would be wrong. Use impl="reference" for higher-order gradients.'
        )


def _backward(ctx, g_loss, g_lse, g_zl, *_unused, backward_grads=_backward_op):
    _refuse_double_backward(ctx.options[0])
    want_dh, want_dw, want_db = ctx.wants
    return_lse, return_z_loss = ctx.options[-2:]
    dh, dw, db = backward_grads(
        g_loss, g_lse if return_lse else None, g_zl if return_z_loss else None, *ctx.saved_tensors,
        *ctx.options, *ctx.wants, *ctx.sizes,
    )  # fmt: skip
    grads = (dh if want_dh else None, dw if want_dw else None, db if want_db else None)
    return grads + (None,) * 15


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    """Eager mode: the same forward, context and backward as the ops, without the dispatcher,
    whose per-call cost (~0.2 ms on a CPU, half of it re-binding the 18 arguments for
    ``setup_context``) only pays for itself in a compiled graph."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):  # a double backward raises (_refuse_double_backward)
        return _backward(ctx, *grads, backward_grads=_backward_grads)


def flce_apply(
    h_ND: Tensor,
    w_VD: Tensor,
    b_V: Tensor | None,
    cw_V: Tensor | None,
    y_N: Tensor,
    num_items: int | float | Tensor | None,
    params: FLCEParams,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``(loss, lse_N, zl)`` through the custom ops; inputs validated and flattened,
    targets already shifted; ``backend``: "torch" or "triton"."""
    grad = torch.is_grad_enabled()
    wants = (grad and h_ND.requires_grad, grad and w_VD.requires_grad, grad and b_V is not None and b_V.requires_grad)
    count = num_items if isinstance(num_items, int) else None
    if isinstance(num_items, float):  # a sum of class weights
        num_items = torch.tensor(num_items, dtype=torch.float64)
    items_tensor = num_items if isinstance(num_items, Tensor) else None
    forward = _forward_op if torch.compiler.is_compiling() else _EagerFunction.apply
    loss, lse_N, zl, *_ = forward(
        h_ND, w_VD, b_V, cw_V, y_N, count, items_tensor, backend, params.ignore_index, params.reduction,
        params.label_smoothing, params.z_loss, params.softcap, params.return_lse, params.return_z_loss, *wants,
    )  # fmt: skip
    return loss, lse_N, zl
