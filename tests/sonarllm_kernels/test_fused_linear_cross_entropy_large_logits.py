"""Fused linear cross-entropy at large logits (issue 20), and the double backward.

Precision: at logits of 1e2 to 1e4 the loss (a few units, or 0) is much smaller than the logits.
A path that rounds the log-sum-exp at the size of the top logit before subtracting the target
logit makes an error of that size (5e-4 at 1e4 in float32). The rule is the usual one
(tests/_numerics.py), with plain PyTorch at the same dtype, ``F.cross_entropy(F.linear(h, w, b))``,
as the yardstick and a float64 ground truth computed from the same (cast) inputs. The inputs are
dyadic numbers with few bits, so that the GEMM is exact in float32 and float64 and the yardstick
makes no error of its own there: what is left is the loss's own rounding.

Double backward: the "torch" and "triton" paths compute the gradient in the forward, so a
graph of it would be a constant; they must raise as soon as one is requested, never return a
silently wrong gradient penalty; "reference" differentiates twice.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sonarllm_kernels.fused_linear_cross_entropy import custom_op as flce_op
from sonarllm_kernels import fused_linear_cross_entropy, linear_cross_entropy
from tests._cases import needs_triton
from tests._numerics import assert_parity
from tests.sonarllm_kernels._flce_schedules import expand, with_schedule

fused_linear_cross_entropy = with_schedule(fused_linear_cross_entropy)  # noqa: F811 (paths "triton:<schedule>")

TRITON = pytest.param("triton", marks=needs_triton)
# Every path at every dtype the CPU runs (the interpreter runs Triton at float32 only).
PATH_DTYPES = expand(
    [pytest.param(p, dt, id=f"{p}-{name}") for p in ("reference", "torch")
     for dt, name in ((torch.float32, "fp32"), (torch.float64, "fp64"), (torch.bfloat16, "bf16"),
                      (torch.float16, "fp16"))]
    + [pytest.param("triton", torch.float32, marks=needs_triton, id="triton-fp32")]
)  # fmt: skip


def _dyadic(shape, lo: int, hi: int, denom: int, g: torch.Generator) -> torch.Tensor:
    """Random multiples of 1/denom in [lo, hi] (float64): sums of their products stay exact."""
    return torch.randint(lo * denom, hi * denom + 1, shape, generator=g).double() / denom


def _large_logit_case(scale: float, layout: str, *, n=12, d=8, v=37, seed=0):
    """hidden [n, d], weight [v, d], bias [v], target [n] (two ignored), float64, dyadic; the
    top logit is about ``scale``:
    - "close": the bias is ``scale`` plus a little — the logits all lie within a few units of the
      top one (the loss is about log V, the logits ``scale``). The offset is in the bias, not in a
      column of the weight: a column of constant 1e4 would make the hidden gradient's GEMM cancel
      (sum_j dz_j = 0) at an error of 2^-24 * 1e4 * sum_j |dz_j| in every float32 implementation,
      plain PyTorch's too, and the rule would compare rounding luck;
    - "spread": column 0 of hidden is 1 and column 0 of weight holds per-class offsets uniform in
      [-scale, scale] — half the targets are the row's top class (a loss near 0 under logits of
      ``scale``), half are random.
    Everything else is a small multiple of 1/16, so each logit is exact in float32.
    """
    g = torch.Generator().manual_seed(seed)
    h = _dyadic((n, d), -1, 1, 2, g)
    w = _dyadic((v, d), -2, 2, 16, g)
    b = _dyadic((v,), -1, 1, 16, g)
    if layout == "close":
        b += float(scale)
    else:
        h[:, 0] = 1.0
        w[:, 0] = torch.randint(-int(scale), int(scale) + 1, (v,), generator=g).double()
    y = torch.randint(0, v, (n,), generator=g)
    if layout == "spread":
        y[: n // 2] = (h @ w.T + b).argmax(dim=1)[: n // 2]
    y[[3, 7]] = -100
    return h, w, b, y


def _class_weights(v: int, seed: int = 3) -> torch.Tensor:
    """Per-class weights, multiples of 1/8 in [0, 2] (exact in every dtype), some exactly 0."""
    cw = _dyadic((v,), 0, 2, 8, torch.Generator().manual_seed(seed))
    cw[::5] = 0.0
    return cw


def _grads(loss_fn, h, w, b, dtype, upstream_seed=1):
    """Run ``loss_fn(h, w, b)`` on copies cast to ``dtype`` with all three requiring grad, then
    backward with an upstream gradient other than 1; returns (loss, dh, dw, db)."""
    h, w, b = (t.detach().to(dtype).clone().requires_grad_(True) for t in (h, w, b))
    loss = loss_fn(h, w, b)
    g = torch.Generator().manual_seed(upstream_seed)
    up = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5 if loss.dim() else torch.tensor(0.37)
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _check(path, dtype, h64, w64, b64, y, *, reduction, cw=None, **opts):
    """Loss and every gradient of ``path`` against plain PyTorch at ``dtype`` (the yardstick)
    and the float64 ground truth of the same cast inputs (options: against the reference)."""
    h64, w64, b64 = (t.to(dtype).double() for t in (h64, w64, b64))  # what every run sees
    cw64 = None if cw is None else cw.double()

    def plain(h, w, b):
        if opts:  # z-loss, softcap, lse: the specification at the same dtype
            return fused_linear_cross_entropy(h, w, y, bias=b, class_weight=None if cw64 is None else cw64.to(h.dtype),
                                              reduction=reduction, impl="reference", **opts)  # fmt: skip
        weight = None if cw64 is None else cw64.to(h.dtype)
        return F.cross_entropy(F.linear(h, w, b), y, weight=weight, reduction=reduction)

    def fast(h, w, b):
        return fused_linear_cross_entropy(h, w, y, bias=b, class_weight=None if cw64 is None else cw64.to(h.dtype),
                                          reduction=reduction, impl=path, **opts)  # fmt: skip

    gold = _grads(plain, h64, w64, b64, torch.float64)
    yard = _grads(plain, h64, w64, b64, dtype)
    got = _grads(fast, h64, w64, b64, dtype)
    for i, name in enumerate(("loss", "d hidden", "d weight", "d bias")):
        assert_parity(got[i], yard[i], gold[i], dtype, f"{path} {name} {reduction} {opts}", grad=i > 0)


@pytest.mark.parametrize("path", expand(["reference", "torch", TRITON]))
def test_issue_repro_loss_and_gradients(path):
    """Issue 20's repro: logits [1e4, 9999, 9998.5, 0], target 1. The loss is
    log(e + 1 + e^-0.5) = 1.4643688 (float64); the paths gave 1.4648438 before the fix."""
    h = torch.ones(1, 1, requires_grad=True)
    w = torch.tensor([[1e4], [9999.0], [9998.5], [0.0]], requires_grad=True)
    y = torch.tensor([1])
    loss = fused_linear_cross_entropy(h, w, y, impl=path)
    loss.backward()
    want = math.log(math.e + 1.0 + math.exp(-0.5))
    assert abs(want - 1.4643688) < 1e-7
    assert abs(loss.item() - want) <= 2e-7, f"{path}: loss {loss.item():.8f}, want {want:.8f}"
    # Gradients: the parity rule against plain float32 and float64.
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    F.cross_entropy(F.linear(h64, w64), y).backward()
    h32, w32 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.cross_entropy(F.linear(h32, w32), y).backward()
    assert_parity(h.grad, h32.grad, h64.grad, torch.float32, f"{path} d hidden", grad=True)
    assert_parity(w.grad, w32.grad, w64.grad, torch.float32, f"{path} d weight", grad=True)


@pytest.mark.parametrize("path,dtype", PATH_DTYPES)
@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("layout", ["close", "spread"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "classweight"])
def test_parity_at_large_logits(path, dtype, scale, layout, reduction, weighted):
    h, w, b, y = _large_logit_case(scale, layout)
    _check(path, dtype, h, w, b, y, reduction=reduction, cw=_class_weights(w.shape[0]) if weighted else None)


LARGE_OPTIONS = [
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"label_smoothing": 0.2, "class_weight": True}, id="smoothing-classweight"),
    pytest.param({"z_loss": 1e-6}, id="zloss"),
    pytest.param({"softcap": 3e4}, id="softcap"),
    pytest.param({"return_lse": True}, id="lse"),
]


@pytest.mark.parametrize("path", expand(["torch", TRITON]))
@pytest.mark.parametrize("layout", ["close", "spread"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", LARGE_OPTIONS)
def test_parity_at_large_logits_with_options(path, layout, reduction, opts):
    """Smoothing (its sum over the vocabulary), z-loss, softcap and the returned lse at logits
    of 1e4, float32, against the reference at float32 (plain PyTorch with those options)."""
    opts = dict(opts)
    cw = _class_weights(37) if opts.pop("class_weight", False) else None
    h, w, b, y = _large_logit_case(1e4, layout)
    if opts.pop("return_lse", False):  # the lse itself is of the size of the logits: check the loss
        loss, lse = fused_linear_cross_entropy(h.float(), w.float(), y, bias=b.float(), return_lse=True,
                                               reduction=reduction, impl=path)  # fmt: skip
        gold_loss, gold_lse = fused_linear_cross_entropy(h, w, y, bias=b, return_lse=True, reduction=reduction,
                                                         impl="reference")  # fmt: skip
        ref_loss, ref_lse = fused_linear_cross_entropy(h.float(), w.float(), y, bias=b.float(), return_lse=True,
                                                       reduction=reduction, impl="reference")  # fmt: skip
        assert_parity(loss, ref_loss, gold_loss, torch.float32, f"{path} loss with return_lse")
        assert_parity(lse, ref_lse, gold_lse, torch.float32, f"{path} lse")
    _check(path, torch.float32, h, w, b, y, reduction=reduction, cw=cw, **opts)


# --- double backward ----------------------------------------------------------------------------


def _penalty_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 10, 24, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = torch.randn(150, 24, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = torch.randint(0, 150, (1, 10), generator=g)
    return h, w, y


DOUBLE_BACKWARD = r'fused_linear_cross_entropy \(impl="(torch|triton)"\) cannot differentiate twice.*impl="reference"'


@pytest.mark.parametrize("path,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                        pytest.param("triton", torch.float32, marks=needs_triton)])  # fmt: skip
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen-weight"])
def test_gradient_penalty_raises_instead_of_a_wrong_gradient(path, dtype, frozen):
    """Issue 20's repro: ``autograd.grad(loss, h, create_graph=True)`` then a penalty on the
    gradient. It gave a weight gradient 0.77 off (relative); now the first call raises."""
    h, w, y = _penalty_inputs(dtype)
    w.requires_grad_(not frozen)
    loss = fused_linear_cross_entropy(h, w, y, impl=path)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("how", ["backward", "lse", "linear_cross_entropy", "op"])
def test_every_way_to_ask_for_a_graph_of_the_gradient_raises(path, how):
    """``loss.backward(create_graph=True)``, a gradient through the returned lse, the torch-signature
    adapter, and the custom op called directly (its registered autograd formula)."""
    h, w, y = _penalty_inputs(torch.float32)
    if how == "backward":
        out = fused_linear_cross_entropy(h, w, y, impl=path)
    elif how == "lse":
        out = fused_linear_cross_entropy(h, w, y, return_lse=True, impl=path)[1].sum()
    elif how == "linear_cross_entropy":
        out = linear_cross_entropy(h, w, y, impl=path)
    else:
        out = flce_op._forward_op(h.reshape(-1, 24), w, None, None, y.reshape(-1), None, None, path, -100, "mean",
                                  0.0, 0.0, None, False, False, True, True, False)[0]  # fmt: skip
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        out.backward(create_graph=True)


def test_compiled_gradient_penalty_raises():
    """Under torch.compile the compiled graph's backward refuses first (torch's RuntimeError)."""
    h, w, y = _penalty_inputs(torch.float32)
    fn = torch.compile(lambda h, w: fused_linear_cross_entropy(h, w, y, impl="torch"), backend="aot_eager",
                       fullgraph=True)  # fmt: skip
    loss = fn(h, w)
    with pytest.raises(RuntimeError, match="double backward|cannot differentiate twice"):
        (gh,) = torch.autograd.grad(loss, h, create_graph=True)
        (loss + 10 * gh.square().sum()).backward()


def test_first_order_backward_still_works_without_create_graph():
    """Grad mode on around the backward call is not a request for a graph: autograd runs the
    backward with grad mode off unless create_graph=True."""
    h, w, y = _penalty_inputs(torch.float64)
    loss = fused_linear_cross_entropy(h, w, y, impl="torch")
    with torch.enable_grad():
        gh, gw = torch.autograd.grad(loss, (h, w))
    h2, w2 = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    want_h, want_w = torch.autograd.grad(F.cross_entropy(F.linear(h2, w2).reshape(-1, 150), y.reshape(-1)), (h2, w2))
    torch.testing.assert_close(gh, want_h)
    torch.testing.assert_close(gw, want_w)


def test_reference_gives_the_correct_double_backward():
    """The reference differentiates twice: the penalty's weight gradient equals that of plain
    PyTorch on the materialised logits (independent of our code)."""
    h, w, y = _penalty_inputs(torch.float64)
    loss = fused_linear_cross_entropy(h, w, y, impl="reference")
    (gh,) = torch.autograd.grad(loss, h, create_graph=True)
    (loss + 10 * gh.square().sum()).backward()
    h2, w2 = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    loss2 = F.cross_entropy(F.linear(h2, w2).reshape(-1, 150), y.reshape(-1))
    (gh2,) = torch.autograd.grad(loss2, h2, create_graph=True)
    (loss2 + 10 * gh2.square().sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", expand(["torch", TRITON]))
def test_classes_masked_with_finfo_min_have_no_mass(path):
    """A bias of finfo(float32).min masks a class (a common idiom): exp of logit - max is 0 there,
    not NaN (e.g. from an exp whose correction term overflows), in the loss and the gradients."""
    h, w, b, y = _large_logit_case(1e4, "close")
    b[::3] = torch.finfo(torch.float32).min
    y = torch.where((y >= 0) & (torch.arange(len(y)) % 2 == 0), torch.ones_like(y), y)  # class 1: not masked
    y = torch.where(y % 3 == 0, y + 1, y)  # no target on a masked class (its loss would be inf)
    _check(path, torch.float32, h, w, b, y, reduction="mean", label_smoothing=0.0)
