"""The kernels under torch.compile: each custom op passes ``torch.library.opcheck``; the public
functions compile with ``fullgraph=True`` (no graph break), give eager mode's numbers (forward and
gradients, the parity rule with eager as the reference) and do not recompile for other shapes.

Most compiled cases use the "aot_eager" backend: it runs Dynamo and AOTAutograd, everything
that touches the ops' registrations (shape functions, saved tensors, the backward), in a second
or two on a CPU; inductor, which takes tens of seconds, compiles one case per path."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from sonarllm_kernels.fused_linear_cross_entropy import custom_op as flce_op
from sonarllm_kernels.fused_linear_cross_entropy import torch_backend as flce_torch
from sonarllm_kernels import attention, cu_seqlens_from_lengths, fused_embedding_projection, fused_linear_cross_entropy
from tests._cases import needs_triton
from tests._numerics import assert_parity, flce_inputs

PATHS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend="aot_eager", **kwargs):
    return torch.compile(fn, backend=backend, fullgraph=True, **kwargs)


def _forward_backward(fn, inputs: dict, trainable: set, g_seed=1):
    """Outputs and the gradients of every input in ``trainable`` (None where it gets none),
    after a backward of a random combination of all outputs."""
    inputs = {k: v.detach().clone().requires_grad_(k in trainable) if v.is_floating_point() else v
              for k, v in inputs.items()}  # fmt: skip
    out = fn(**inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(g_seed)
    total = sum((o.float() * torch.rand(o.shape, generator=g)).sum() for o in outs if o.requires_grad)
    total.backward()
    return [o.detach() for o in outs] + [inputs[k].grad for k in sorted(trainable)]


def _assert_same(compiled, eager, dtype=torch.float32, what=""):
    assert len(compiled) == len(eager)
    for i, (c, e) in enumerate(zip(compiled, eager, strict=True)):
        assert_parity(c, e, e, dtype, f"{what} output {i}", grad=True)


# --- fused linear cross-entropy ------------------------------------------------------------------

FLCE_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"reduction": "none"}, id="none"),
    pytest.param({"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}, id="sum-options"),
    pytest.param({"return_lse": True, "return_z_loss": True, "z_loss": 1e-2}, id="lse-zloss"),
    pytest.param({"class_weight": "cw", "num_items": 7.5}, id="classweight-float-items"),
    pytest.param({"num_items": 20}, id="int-items"),
    pytest.param({"num_items": "tensor"}, id="tensor-items"),
    pytest.param({"shift": 1, "reduction": "none", "ignore_index": 5}, id="shift"),
]


def _flce_case(opts: dict, *, n=36, d=16, v=97):
    h, w, y, b = flce_inputs(n, d, v, torch.float32, bias=True)
    opts = dict(opts)
    if opts.get("class_weight") == "cw":
        opts["class_weight"] = torch.rand(v, generator=torch.Generator().manual_seed(3))
    if opts.get("num_items") == "tensor":
        opts["num_items"] = torch.tensor(20)
    if opts.get("ignore_index") == 5:
        y = torch.where(y == -100, torch.full_like(y, 5), y)
    if opts.get("shift"):
        h, y = h.reshape(4, 9, d), y.reshape(4, 9)
    return {"h": h, "w": w, "y": y, "b": b}, opts


@pytest.mark.parametrize("opts", FLCE_OPTIONS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_flce_compiles_whole_and_matches_eager(opts, trainable):
    inputs, opts = _flce_case(opts)
    fn = lambda h, w, y, b: fused_linear_cross_entropy(h * 2.0, w, y, bias=b, impl="torch", **opts)
    grads = {"h", "w", "b"} if trainable else {"h"}
    _assert_same(_forward_backward(_compiled(fn), inputs, grads), _forward_backward(fn, inputs, grads), what=str(opts))


@pytest.mark.parametrize("path", PATHS)
def test_flce_inductor_matches_eager(path):
    """Hidden column-major: inductor checks the strides the ops' shape functions promise."""
    inputs, _ = _flce_case({})
    inputs["h"] = inputs["h"].t().contiguous().t()
    fn = lambda h, w, y, b: fused_linear_cross_entropy(h * 2.0, w, y, bias=b, label_smoothing=0.1, impl=path)
    grads = {"h", "w", "b"}
    compiled = _forward_backward(_compiled(fn, backend="inductor"), inputs, grads)
    _assert_same(compiled, _forward_backward(fn, inputs, grads), what=path)


def test_flce_explain_finds_no_graph_break():
    """The issue's example: 4 graph breaks (Tensor.tolist) before the kernels became custom ops."""
    h, w, y, _ = flce_inputs(16, 8, 30, torch.float32)
    fn = lambda h, w, y: fused_linear_cross_entropy(h * 2.0, w, y, impl="torch")
    explained = torch._dynamo.explain(fn)(h.requires_grad_(True), w, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_flce_bad_targets_raise_inside_a_compiled_graph():
    h, w, y, _ = flce_inputs(8, 8, 30, torch.float32, ignore_frac=0.0)
    fn = _compiled(lambda h, w, y: fused_linear_cross_entropy(h, w, y, impl="torch"))
    fn(h, w, y)
    with pytest.raises(ValueError, match=r"target values must be in \[0, V\) = \[0, 30\)"):
        fn(h, w, torch.where(torch.arange(8) == 3, 30, y))


def test_flce_compiled_with_frozen_weight_does_no_weight_gradient_work(monkeypatch):
    calls = []

    class Counting(flce_torch.TorchChunkBackend):
        def chunk(self, *args, **kwargs):
            calls.append({k: kwargs[k] is not None for k in ("loss_scale_C", "dw_acc_VD", "db_acc_V")})
            return super().chunk(*args, **kwargs)

    monkeypatch.setitem(flce_op.BACKENDS, "torch", Counting)
    h, w, y, b = flce_inputs(12, 8, 40, torch.float32, bias=True)
    h.requires_grad_(True)
    _compiled(lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, bias=b, impl="torch"))(h, w, y, b).backward()
    assert calls == [{"loss_scale_C": True, "dw_acc_VD": False, "db_acc_V": False}]
    assert w.grad is None and b.grad is None and h.grad is not None


def test_flce_compiled_all_ignored_gives_zero_loss_and_zero_grads():
    h, w, y, _ = flce_inputs(6, 8, 30, torch.float32)
    y = torch.full_like(y, -100)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = _compiled(lambda h, w, y: fused_linear_cross_entropy(h, w, y, impl="torch"))(h, w, y)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and w.grad is not None and torch.count_nonzero(w.grad) == 0


def test_flce_other_shapes_and_counts_do_not_recompile():
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(
        lambda h, w, y, n: fused_linear_cross_entropy(h, w, y, num_items=n, impl="torch"),
        backend=counter, fullgraph=True, dynamic=True,
    )  # fmt: skip
    compilations = []
    for n_rows, num_items in ((20, 31), (13, 40), (27, 27)):
        h, w, y, _ = flce_inputs(n_rows, 16, 50, torch.float32, seed=n_rows)
        h.requires_grad_(True)
        got = fn(h, w, y, num_items)
        got.backward()
        compilations.append(counter.frame_count)
        h2 = h.detach().clone().requires_grad_(True)
        want = fused_linear_cross_entropy(h2, w, y, num_items=num_items, impl="torch")
        want.backward()
        _assert_same([got.detach(), h.grad], [want.detach(), h2.grad], what=f"N = {n_rows}")
    assert compilations[0] >= 1 and compilations == [compilations[0]] * 3, compilations


def _flce_op_args(path, reduction="mean", trainable=False, extras=False):
    h, w, y, b = flce_inputs(12, 8, 40, torch.float32, bias=True)
    cw = torch.rand(40) if extras else None
    return (h.requires_grad_(True), w.requires_grad_(trainable), b.requires_grad_(trainable), cw, y,
            None if extras else 9, torch.tensor(9.5, dtype=torch.float64) if extras else None, path, -100,
            reduction, 0.1 if extras else 0.0, 1e-2 if extras else 0.0, 4.0 if extras else None, extras, extras,
            True, trainable, trainable)  # fmt: skip


FLCE_OP_CASES = [
    pytest.param({}, id="frozen"),
    pytest.param({"trainable": True}, id="trainable"),
    pytest.param({"trainable": True, "reduction": "none"}, id="none-trainable-recompute"),
    pytest.param({"trainable": True, "extras": True}, id="all-options"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", FLCE_OP_CASES)
def test_opcheck_flce_ops(path, case):
    args = _flce_op_args(path, **case)
    torch.library.opcheck(flce_op._forward_op, args)
    outputs = flce_op._forward_op(*args)
    h, w = args[0], args[1]
    grads_out = (torch.rand(outputs[0].shape), torch.rand(outputs[1].shape), torch.rand(outputs[2].shape))
    saved = list(outputs[3:7]) + ([h, w, args[2], args[3], args[4], outputs[1]] if case else [None] * 6)
    backward_args = (*grads_out, *saved, *args[7:], h.shape[0], w.shape[0], h.shape[1], h.dtype)
    torch.library.opcheck(flce_op._backward_op, tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                      for a in backward_args))  # fmt: skip


# --- attention and the fused embedding projection (Triton paths) ---------------------------------


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@needs_triton
@pytest.mark.parametrize("layout", ["batched", "varlen"])
def test_attention_triton_compiles_whole_and_matches_eager(layout):
    q, k, v = _qkv((2, 9, 2, 16) if layout == "batched" else (12, 2, 16))
    cu = cu_seqlens_from_lengths([5, 7]) if layout == "varlen" else None
    varlen = {"cu_seqlens_q": cu, "max_seqlen_q": 7, "max_seqlen_k": 7} if cu is not None else {}
    fn = lambda q, k, v: attention(q * 1.5, k, v, causal=True, impl="triton", **varlen)
    inputs, grads = {"q": q, "k": k, "v": v}, {"q", "k", "v"}
    _assert_same(_forward_backward(_compiled(fn), inputs, grads), _forward_backward(fn, inputs, grads), what=layout)


@needs_triton
@pytest.mark.parametrize("mode", ["in", "out"])
def test_projection_triton_compiles_whole_and_matches_eager(mode):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 24, generator=g), torch.randn(16, 24, generator=g) * 0.2, torch.randn(16, generator=g)
    n = 24 if mode == "in" else 16
    center, scale = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) + 0.5
    fn = lambda x, w, b: fused_embedding_projection(x * 1.5, w, b, center=center, scale=scale, mode=mode, impl="triton")
    inputs, grads = {"x": x, "w": w, "b": b}, {"x", "w", "b"}
    _assert_same(_forward_backward(_compiled(fn), inputs, grads), _forward_backward(fn, inputs, grads), what=mode)


@needs_triton
@pytest.mark.parametrize("layout", ["batched", "varlen"])
def test_opcheck_attention_ops(layout):
    from sonarllm_kernels.attention import custom_op as attn_op

    q, k, v = _qkv((2, 9, 2, 16) if layout == "batched" else (12, 2, 16))
    cu = cu_seqlens_from_lengths([5, 7]) if layout == "varlen" else None
    max_q = 9 if cu is None else 7
    args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), cu, cu, True, 0.25, max_q, max_q)
    torch.library.opcheck(attn_op._fwd_op, args)
    o, lse = attn_op._fwd_op(*args)
    torch.library.opcheck(attn_op._bwd_op, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse,
                                            cu, cu, True, 0.25, max_q, max_q))  # fmt: skip


@needs_triton
@pytest.mark.parametrize("mode", ["in", "out"])
@pytest.mark.parametrize("normalizer", [False, True], ids=["plain", "normalizer"])
def test_opcheck_projection_ops(mode, normalizer):
    from sonarllm_kernels.embedding_projection import custom_op as fep_op

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(10, 24, generator=g), torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    n = 24 if mode == "in" else 16
    c, s = (torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5) if normalizer else (None, None)
    args = (x.requires_grad_(True), w.requires_grad_(True), b, c, s, mode)
    torch.library.opcheck(fep_op._fwd_op, args)
    y = fep_op._fwd_op(*args)
    torch.library.opcheck(fep_op._bwd_op, (torch.randn_like(y), x.detach(), w.detach(), b, c, s, mode,
                                           True, True, True, normalizer, normalizer))  # fmt: skip


@needs_triton
def test_triton_double_backward_raises():
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 6, 1, 16)))
    upstream = torch.ones(1, 6, 1, 16, requires_grad=True)  # so that the first gradient has a graph
    out = attention(q, k, v, impl="triton")
    (dq,) = torch.autograd.grad(out, q, grad_outputs=upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8)
    y = fused_embedding_projection(x, w, impl="triton")
    (dx,) = torch.autograd.grad(y, x, grad_outputs=torch.ones(4, 6, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


# --- the CUDA path choice, traced on a CPU ------------------------------------------------------------------


def test_the_cuda_path_choice_traces_without_a_graph_break(monkeypatch):
    """On CUDA, ``impl="auto"`` asks whether flash-attn and Triton import before it picks a path;
    Dynamo must not follow those imports (a graph break, or an error under fullgraph=True) —
    CPU tests never take that branch, so it is traced here for a CUDA device."""
    import importlib

    from sonarllm_kernels._dispatch import resolve_impl

    # the modules, not the functions of the same name that sonarllm_kernels/__init__ exports
    attn_mod, fep_mod = (importlib.import_module(f"sonarllm_kernels.{m}") for m in ("attention", "embedding_projection"))

    monkeypatch.delenv("SONARLLM_KERNEL_IMPL", raising=False)  # the tests' conftest sets it; users' auto is plain
    cuda = torch.device("cuda", 0)
    choices = {
        "attention dense": lambda: attn_mod._choose_path("auto", cuda, torch.bfloat16, 64, 0.0, "dense"),
        "attention varlen": lambda: attn_mod._choose_path("auto", cuda, torch.bfloat16, 64, 0.0, "varlen"),
        "attention decode": lambda: attn_mod._choose_path("auto", cuda, torch.bfloat16, 64, 0.0, "decode"),
        "projection": lambda: fep_mod._choose_path("auto", cuda, torch.bfloat16, "in"),
        "cross-entropy": lambda: resolve_impl("auto", cuda, "fused_linear_cross_entropy"),
    }
    for what, choose in choices.items():
        torch._dynamo.reset()
        eager = choose()
        assert eager in ("triton", "torch", "flash"), what
        traced = _compiled(lambda x: x * float(choose() == eager))(torch.ones(1))
        assert traced.item() == 1.0, f"{what}: traced choice differs from {eager!r}"
