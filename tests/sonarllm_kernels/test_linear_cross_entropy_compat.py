"""``sonarllm_kernels.linear_cross_entropy`` against torch's own ``F.linear_cross_entropy`` on random cases:
shapes (N = 0, unbatched, batch dims), every reduction, ignored targets (all of them too), label
smoothing (up to 1), class weights, bias, frozen and trainable weight, gradients. The parity rule
uses torch as the reference: float64 torch is the ground truth, torch at the same dtype the
reference error. Where we differ on purpose ("mean" over no target: 0, torch NaN) it is asserted."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from sonarllm_kernels import linear_cross_entropy
from tests._cases import needs_triton
from tests._numerics import assert_parity
from tests.sonarllm_kernels._flce_schedules import SCHEDULES, expand, with_schedule

linear_cross_entropy = with_schedule(linear_cross_entropy)  # noqa: F811 (paths "triton:<schedule>")

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs torch >= 2.13")


def _torch_lce(h, w, y, **kw):
    """torch's op; inputs with batch dims (which torch rejects) go through flattened."""
    if h.dim() <= 2:
        return F.linear_cross_entropy(h, w, y, **kw)
    out = F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), **kw)
    return out.reshape(y.shape) if kw.get("reduction") == "none" else out


def _random_cases(n: int, seed: int = 2026) -> list:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        path = ("torch", "triton", "reference")[i % 3]
        dtypes = {"torch": (torch.float32, torch.float64, torch.bfloat16), "triton": (torch.float32,),
                  "reference": (torch.float32, torch.float64)}[path]  # fmt: skip
        case = dict(
            path=path,
            dtype=rng.choice(dtypes),
            lead=rng.choice([(0,), (), (1,), (7,), (33,), (33,), (2, 5), (4, 9), (3, 0)]),
            v=rng.choice([1, 5, 300, 1031, 1031]),
            d=rng.choice([1, 8, 48]),
            reduction=rng.choice(["mean", "sum", "none"]),
            ignore_index=rng.choice([None, -100, 3]),
            ignored=rng.choice([0.0, 0.3, 0.3, 1.0]),
            smoothing=rng.choice([0.0, 0.1, 1.0]),
            class_weight=rng.random() < 0.5,
            bias=rng.random() < 0.5,
            trainable=rng.random() < 0.5,
            options=rng.random() < 0.3,
            seed=i,
        )
        for p in [f"triton:{s}" for s in SCHEDULES] if path == "triton" else [path]:
            marks = [needs_triton] if path == "triton" else []
            case_id = f"{i}-{p.replace(':', '-')}-{str(case['dtype'])[6:]}-{case['reduction']}"
            cases.append(pytest.param(case | {"path": p}, id=case_id, marks=marks))
    return cases


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    h = torch.randn(*c["lead"], c["d"], generator=g, dtype=torch.float64)
    w = torch.randn(c["v"], c["d"], generator=g, dtype=torch.float64) / c["d"] ** 0.5
    y = torch.randint(0, c["v"], c["lead"], generator=g)
    ignore = -100 if c["ignore_index"] is None else c["ignore_index"]
    y = torch.where(torch.rand(c["lead"], generator=g) < c["ignored"], torch.full_like(y, ignore), y)
    b = torch.randn(c["v"], generator=g, dtype=torch.float64) if c["bias"] else None
    cw = torch.rand(c["v"], generator=g, dtype=torch.float64) + 0.1 if c["class_weight"] else None
    return h, w, y, b, cw


def _run(fn, c, dtype, h, w, y, b, cw, **extra):
    """Loss and gradients (input, linear_weight, linear_bias) at ``dtype``."""
    cast = lambda t: None if t is None else t.detach().to(dtype).clone()
    h, w, b, cw = cast(h), cast(w), cast(b), cast(cw)
    h.requires_grad_(True)
    w.requires_grad_(c["trainable"])
    if b is not None:
        b.requires_grad_(c["trainable"])
    loss = fn(h, w, y, linear_bias=b, weight=cw, reduction=c["reduction"], ignore_index=c["ignore_index"],
              label_smoothing=c["smoothing"], **extra)  # fmt: skip
    g = torch.Generator().manual_seed(99)
    upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) if loss.dim() else 0.37
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("case", _random_cases(60))
def test_matches_torch_linear_cross_entropy(case):
    c = case
    h, w, y, b, cw = _inputs(c)
    extra = {"impl": c["path"]}
    if c["options"]:
        extra["options"] = torch.nn.LinearCrossEntropyOptions()
    ours = _run(linear_cross_entropy, c, c["dtype"], h, w, y, b, cw, **extra)
    gold = _run(_torch_lce, c, torch.float64, h, w, y, b, cw)
    ref = _run(_torch_lce, c, c["dtype"], h, w, y, b, cw)
    assert ours[0].dtype == ref[0].dtype == c["dtype"], "the loss comes back in input's dtype, as torch's"
    ignore = -100 if c["ignore_index"] is None else c["ignore_index"]
    if c["reduction"] == "mean" and not (y != ignore).any():
        # On purpose: "mean" over no target is 0 with zero gradients; torch gives NaN.
        assert torch.isnan(gold[0]), "torch's mean over no target should be NaN"
        assert ours[0].item() == 0.0
        for ours_g, gold_g in zip(ours[1:], gold[1:], strict=True):
            assert (ours_g is None) == (gold_g is None)
            assert ours_g is None or torch.count_nonzero(ours_g) == 0
        return
    for i, name in enumerate(("loss", "d input", "d linear_weight", "d linear_bias")):
        assert_parity(ours[i], ref[i], gold[i], c["dtype"], f"{name} {c}", grad=i > 0)


def test_ignore_index_none_means_minus_100_and_options_are_accepted():
    h, w = torch.randn(6, 8), torch.randn(12, 8)
    y = torch.tensor([1, -100, 3, 4, -100, 11])
    want = F.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(linear_cross_entropy(h, w, y, ignore_index=None, impl="torch"), want)
    got = linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions(), impl="torch")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda h, w, y: linear_cross_entropy(h, w.reshape(12, 2, 4), y), ValueError, "K-dimensional loss"),
        (lambda h, w, y: linear_cross_entropy(h, w, torch.rand(6, 12)), TypeError, "class-probability targets"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, options="chunked"), TypeError, "options must be None"),
        (lambda h, w, y: linear_cross_entropy(h, w[:, :5], y), ValueError, r"linear_weight must have shape \[V, D\] with D = input"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, linear_bias=torch.randn(3)), ValueError, "linear_bias must have shape"),
        (lambda h, w, y: linear_cross_entropy(h.int(), w, y), TypeError, "input must be float"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, weight=torch.ones(5)), ValueError, r"weight must have shape \[V\]"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, weight=-torch.ones(12)), ValueError, r"weight in linear_cross_entropy\) must be finite and >= 0"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, reduction="batchmean"), ValueError, "reduction"),
        (lambda h, w, y: linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3, 4, 12])), ValueError, r"target values must be in \[0, V\)"),
    ],
)  # fmt: skip
def test_bad_input_names_torchs_arguments(call, exc, match):
    h, w, y = torch.randn(6, 8), torch.randn(12, 8), torch.tensor([1, 2, 3, 4, 5, 6])
    with pytest.raises(exc, match=match):
        call(h, w, y)


@pytest.mark.parametrize("path", expand(["torch", pytest.param("triton", marks=needs_triton)]))
def test_double_backward_raises_instead_of_a_wrong_second_derivative(path):
    """The gradient is precomputed in the forward, so a gradient of the gradient would be wrong:
    asking for its graph raises RuntimeError (torch's chunked path does not support it either),
    also when the incoming gradient needs none (a plain gradient penalty)."""
    for upstream in (torch.tensor(1.0, requires_grad=True), None):
        h = torch.randn(4, 8, requires_grad=True)
        loss = linear_cross_entropy(h, torch.randn(10, 8), torch.tensor([1, 2, 3, 4]), impl=path)
        with pytest.raises(RuntimeError, match=r"fused_linear_cross_entropy .* cannot differentiate twice"):
            torch.autograd.grad(loss, h, grad_outputs=upstream, create_graph=True)
