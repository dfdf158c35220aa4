"""Semantics of the fused linear cross-entropy's interop options — class weights, the z-loss
output, causal shift — checked against plain PyTorch formulas (not against our reference), plus
their bad input. Path parity for the same options is in test_fused_linear_cross_entropy.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sonarllm_kernels import (
    FusedLinearCrossEntropy,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from tests._cases import needs_triton
from tests._numerics import flce_inputs
from tests.sonarllm_kernels._flce_schedules import expand, with_schedule

fused_linear_cross_entropy = with_schedule(fused_linear_cross_entropy)  # noqa: F811 (paths "triton:<schedule>")
PATHS = expand(["reference", "torch", pytest.param("triton", marks=needs_triton)])


def _weights(v: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cw = torch.rand(v, generator=g, dtype=torch.float64) * 2
    cw[::7] = 0.0
    return cw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25, 1.0])
def test_reference_class_weights_are_torchs(reduction, smoothing):
    """class_weight = F.cross_entropy's weight=, smoothing term weighted per class included; the
    z-loss is scaled by the target's class weight and "mean" divides by the targets' weight sum."""
    h, w, y, b = flce_inputs(30, 12, 41, torch.float64, bias=True)
    cw = _weights(41)
    logits = h @ w.T + b
    want = F.cross_entropy(logits, y, weight=cw, label_smoothing=smoothing, reduction=reduction)
    got = fused_linear_cross_entropy_ref(h, w, y, bias=b, class_weight=cw, label_smoothing=smoothing,
                                         reduction=reduction)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    z = 0.01
    valid = y != -100
    r = torch.where(valid, cw[y.clamp_min(0)], 0.0)
    zl = z * r * torch.logsumexp(logits, -1) ** 2
    ce = F.cross_entropy(logits, y, weight=cw, label_smoothing=smoothing, reduction="none")
    manual = {"none": ce + zl, "sum": (ce + zl).sum(), "mean": (ce + zl).sum() / r.sum()}[reduction]
    got = fused_linear_cross_entropy_ref(h, w, y, bias=b, class_weight=cw, label_smoothing=smoothing, z_loss=z,
                                         reduction=reduction)  # fmt: skip
    torch.testing.assert_close(got, manual, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_shift_is_cut_cross_entropys(reduction):
    """shift = k scores hidden[..., :-k, :] against target[..., k:] (cut-cross-entropy's shift)."""
    h, w, y, _ = flce_inputs(30, 12, 41, torch.float64)
    h, y = h.reshape(3, 10, 12), y.reshape(3, 10)
    logits = h[:, :-2] @ w.T
    want = F.cross_entropy(logits.reshape(-1, 41), y[:, 2:].reshape(-1), reduction=reduction)
    got = fused_linear_cross_entropy_ref(h, w, y, shift=2, reduction=reduction)
    torch.testing.assert_close(got, want.reshape(3, 8) if reduction == "none" else want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "classweight"])
def test_z_loss_output_is_the_z_loss_part(path, reduction, weighted):
    """return_z_loss gives z * cw[y] * lse^2, reduced like the loss, and loss - z-loss is the
    loss without z_loss."""
    h, w, y, _ = flce_inputs(20, 16, 97, torch.float32)
    cw = _weights(97).float() if weighted else None
    z = 0.05
    loss, lse, zl = fused_linear_cross_entropy(h, w, y, class_weight=cw, z_loss=z, reduction=reduction,
                                               return_lse=True, return_z_loss=True, impl=path)  # fmt: skip
    plain = fused_linear_cross_entropy(h, w, y, class_weight=cw, reduction=reduction, impl=path)
    valid = y != -100
    r = torch.where(valid, cw[y.clamp_min(0)], 0.0) if weighted else valid.float()
    per_token = z * r * lse.square()
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / r.sum()}[reduction]
    torch.testing.assert_close(zl, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss - zl, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_equals_a_call_on_sliced_inputs(path, reduction):
    """Same loss, lse and gradients as slicing by hand; the last `shift` hidden positions get zero
    gradient."""
    h, w, y, _ = flce_inputs(36, 16, 97, torch.float32, bias=False)
    h, y = h.reshape(4, 9, 16), y.reshape(4, 9)
    h1 = h.clone().requires_grad_(True)
    loss1, lse1 = fused_linear_cross_entropy(h1, w, y, shift=3, reduction=reduction, return_lse=True, impl=path)
    h2 = h.clone().requires_grad_(True)
    loss2, lse2 = fused_linear_cross_entropy(h2[:, :-3], w, y[:, 3:], reduction=reduction, return_lse=True, impl=path)
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(lse1, lse2)
    assert lse1.shape == (4, 6) and (reduction != "none" or loss1.shape == (4, 6))
    (loss1.sum() + lse1.sum()).backward()
    (loss2.sum() + lse2.sum()).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    assert torch.count_nonzero(h1.grad[:, -3:]) == 0


def test_shift_true_is_one():
    h, w, y, _ = flce_inputs(12, 8, 30, torch.float32)
    h, y = h.reshape(2, 6, 8), y.reshape(2, 6)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, y, shift=True, impl="torch"),
                               fused_linear_cross_entropy(h, w, y, shift=1, impl="torch"))  # fmt: skip


@pytest.mark.parametrize("path", expand(["torch", pytest.param("triton", marks=needs_triton)]))
def test_num_items_with_class_weights_makes_micro_batches_add_up(path):
    """With class weights num_items is the global sum of the targets' weights (a float)."""
    h, w, y, _ = flce_inputs(40, 16, 97, torch.float32)
    cw = _weights(97).float()
    full_h = h.clone().requires_grad_(True)
    full = fused_linear_cross_entropy(full_h, w, y, class_weight=cw, z_loss=1e-2, label_smoothing=0.1, impl=path)
    full.backward()
    valid = y != -100
    weight_sum = float(cw[y[valid]].sum())
    parts_h = h.clone().requires_grad_(True)
    total = 0.0
    for sl, n_items in ((slice(0, 15), weight_sum), (slice(15, 40), torch.tensor(weight_sum))):
        loss = fused_linear_cross_entropy(parts_h[sl], w, y[sl], class_weight=cw, z_loss=1e-2, label_smoothing=0.1,
                                          num_items=n_items, impl=path)  # fmt: skip
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts_h.grad, full_h.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_zero_class_weight_sum_gives_zero_not_nan(path, smoothing):
    """Every target's class weight 0: nothing to average, "mean" is 0 with zero gradients, also
    when label smoothing puts loss on the other classes (their weights are not 0); torch: NaN."""
    h, w, _, _ = flce_inputs(6, 8, 20, torch.float32)
    y = torch.tensor([1, 2, 3, -100, 1, 2])
    cw = torch.ones(20)
    cw[[1, 2, 3]] = 0.0
    h.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, y, class_weight=cw, label_smoothing=smoothing, impl=path)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_module_holds_class_weights_and_new_options():
    h, w, y, b = flce_inputs(18, 8, 30, torch.float32, bias=True)
    h, y = h.reshape(2, 9, 8), y.reshape(2, 9)
    cw = _weights(30).float()
    mod = FusedLinearCrossEntropy(class_weight=cw, shift=1, z_loss=1e-3, return_z_loss=True, impl="torch")
    assert "class_weight" in mod.state_dict() and "shift=1" in repr(mod)
    got = mod(h, w, y, bias=b)
    want = fused_linear_cross_entropy(h, w, y, bias=b, class_weight=cw, shift=1, z_loss=1e-3, return_z_loss=True,
                                      impl="torch")  # fmt: skip
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_)
    assert mod.double().class_weight.dtype == torch.float64  # a buffer: follows .to()


# --- bad input -------------------------------------------------------------------------------


def _good():
    return torch.randn(2, 4, 8), torch.randn(10, 8), torch.tensor([[1, 2, 3, -100], [4, 5, 6, 7]])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"class_weight": torch.ones(9)}, ValueError, r"class_weight must have shape \[V\]"),
        ({"class_weight": torch.ones(10, 1)}, ValueError, r"class_weight must have shape \[V\]"),
        ({"class_weight": torch.ones(10, dtype=torch.long)}, TypeError, "class_weight must be a floating-point"),
        ({"class_weight": [1.0] * 10}, TypeError, "class_weight must be a torch.Tensor"),
        ({"class_weight": torch.ones(10, device="meta")}, ValueError, "class_weight is on meta"),
        ({"class_weight": torch.ones(10, requires_grad=True)}, ValueError, "class_weight gets no gradient"),
        ({"class_weight": torch.tensor([1.0] * 9 + [-0.5])}, ValueError, r"class weights .* finite and >= 0"),
        ({"class_weight": torch.tensor([1.0] * 9 + [float("inf")])}, ValueError, r"class weights .* >= 0.*inf"),
        ({"class_weight": torch.tensor([1.0] * 9 + [float("nan")])}, ValueError, r"class weights .* >= 0.*nan"),
        ({"shift": -1}, ValueError, "shift must be >= 0"),
        ({"shift": 1.0}, TypeError, "shift must be an int"),
        ({"shift": 4}, ValueError, r"shift must be < T = hidden.shape\[-2\] = 4"),
        ({"num_items": 2.5}, TypeError, "a float only with class_weight"),
        ({"num_items": 0.0, "class_weight": torch.ones(10)}, ValueError, "num_items is 0 but the targets' class weights"),
        ({"num_items": float("inf"), "class_weight": torch.ones(10)}, ValueError, "num_items must be finite"),
    ],
)
def test_bad_new_options_raise(kwargs, exc, match):
    h, w, y = _good()
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(h, w, y, **({"impl": "torch"} | kwargs))


def test_shift_on_1d_hidden_raises():
    with pytest.raises(ValueError, match=r"shift needs hidden with a time axis"):
        fused_linear_cross_entropy(torch.randn(8), torch.randn(10, 8), torch.tensor(3), shift=1, impl="torch")


def test_module_checks_new_options_at_construction():
    with pytest.raises(ValueError, match="shift must be >= 0"):
        FusedLinearCrossEntropy(shift=-2)
    with pytest.raises(TypeError, match="class_weight must be a floating-point"):
        FusedLinearCrossEntropy(class_weight=torch.ones(5, dtype=torch.int32))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("trainable", [False, True])
def test_ignored_rows_take_no_share_of_a_non_finite_incoming_gradient(path, trainable):
    """reduction="none": an ignored row's loss is a constant 0, so its hidden gradient is 0 even
    when the gradient arriving there is NaN (a per-sequence mean over a sequence with every
    target ignored divides 0 by 0); a valid row's NaN still propagates."""
    h, w, _, _ = flce_inputs(6, 8, 20, torch.float32)
    y = torch.tensor([1, -100, 3, -100, 5, 6])
    g = torch.tensor([1.0, float("nan"), 0.5, float("inf"), 2.0, float("nan")])
    h.requires_grad_(True)
    w.requires_grad_(trainable)
    (fused_linear_cross_entropy(h, w, y, reduction="none", impl=path) * g).sum().backward()
    assert torch.count_nonzero(h.grad[[1, 3]]) == 0 and not h.grad[[1, 3]].isnan().any()
    assert torch.isfinite(h.grad[[0, 2, 4]]).all() and h.grad[5].isnan().all()
