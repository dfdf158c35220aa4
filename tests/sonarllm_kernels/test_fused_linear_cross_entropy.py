"""Parity of every fused linear cross-entropy path with the float64 ground truth, options,
gradients, and bad input. On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by the
root conftest); the CUDA cases are marked ``gpu`` and skip without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sonarllm_kernels.fused_linear_cross_entropy import custom_op as flce_op
from sonarllm_kernels.fused_linear_cross_entropy import torch_backend as flce_torch
from sonarllm_kernels import (
    FusedLinearCrossEntropy,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from tests._cases import HAS_CUDA, TRITON_OK, device_cases, needs_triton
from tests._numerics import assert_parity, flce_inputs
from tests.sonarllm_kernels._flce_schedules import expand, with_schedule

fused_linear_cross_entropy = with_schedule(fused_linear_cross_entropy)  # noqa: F811 (paths "triton:<schedule>")

gpu = pytest.mark.gpu


def _run(impl, h, w, y, b, *, trainable, upstream_seed=1, **opts):
    """Forward + backward through one path; returns (loss, lse, z-loss, dh, dw, db)."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(trainable)
    b = None if b is None else b.detach().clone().requires_grad_(trainable)
    out = fused_linear_cross_entropy(h, w, y, bias=b, impl=impl, **opts)
    out = list(out) if isinstance(out, tuple) else [out]
    loss = out.pop(0)
    lse = out.pop(0) if opts.get("return_lse") else None
    zl = out.pop(0) if opts.get("return_z_loss") else None
    g = torch.Generator().manual_seed(upstream_seed)
    # An upstream gradient other than 1 (0.37), so the backward's scaling is exercised too.
    total = loss * 0.37 if loss.dim() == 0 else (loss * torch.rand(loss.shape, generator=g).to(loss)).sum()
    for extra in (lse, zl):
        if extra is not None:
            total = total + (extra * torch.rand(extra.shape, generator=g).to(extra)).sum()
    total.backward()
    detach = lambda t: None if t is None else t.detach()
    return (loss.detach(), detach(lse), detach(zl), h.grad, w.grad, None if b is None else b.grad)


def _check_all(device, path, dtype, h64, w64, y, b64, *, trainable, **opts):
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    y = y.to(device)
    opts = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}  # class_weight
    gold = _run("reference", h64.to(device), w64.to(device), y, None if b64 is None else b64.to(device), trainable=trainable, **opts)
    ref = _run("reference", cast(h64), cast(w64), y, cast(b64), trainable=trainable, **opts)
    fast = _run(path, cast(h64), cast(w64), y, cast(b64), trainable=trainable, **opts)
    for i, name in enumerate(("loss", "lse", "z-loss", "d hidden", "d weight", "d bias")):
        assert_parity(fast[i], ref[i], gold[i], dtype, f"{path} {name} {opts}", grad=i >= 3)
    if not trainable:
        assert fast[4] is None, "a frozen weight must not get a gradient"


def _class_weights(v: int) -> torch.Tensor:
    """Per-class weights in [0, 2], some exactly 0 (float64, as torch's weight= would be)."""
    g = torch.Generator().manual_seed(7)
    cw = torch.rand(v, generator=g, dtype=torch.float64) * 2
    cw[::11] = 0.0
    return cw


OPTION_SETS = [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"z_loss": 1e-3}, id="zloss"),
    pytest.param({"softcap": 4.0}, id="softcap"),
    pytest.param({"return_lse": True}, id="lse"),
    pytest.param({"class_weight": _class_weights(1009)}, id="classweight"),
    pytest.param({"class_weight": _class_weights(1009), "label_smoothing": 0.3}, id="classweight-smoothing"),
    pytest.param({"shift": 2, "z_loss": 1e-2, "return_z_loss": True}, id="shift-zlossout"),
    pytest.param({"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 7.0, "return_lse": True, "ignore_index": 5,
                  "class_weight": _class_weights(1009), "shift": 1, "return_z_loss": True}, id="all"),
]


@pytest.mark.parametrize("device,path,dtype", expand(device_cases()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_parity_options(device, path, dtype, reduction, opts, trainable):
    """Odd sizes (V = 1009, D = 96), ~20% ignored targets, peaky logits, bias when trainable;
    with ``shift`` a batch of 4 sequences of 9."""
    h, w, y, b = flce_inputs(37, 96, 1009, torch.float64, bias=trainable)
    if opts.get("ignore_index") == 5:
        y = torch.where(y == -100, torch.full_like(y, 5), y)
    if opts.get("shift"):
        h, y = h[:36].reshape(4, 9, 96), y[:36].reshape(4, 9)
    _check_all(device, path, dtype, h, w, y, b, trainable=trainable, reduction=reduction, **opts)


@pytest.mark.parametrize("device,path,dtype", expand(device_cases()))
def test_parity_vocab_above_64k(device, path, dtype):
    """V > 65,536: grid and index arithmetic must not wrap."""
    h, w, y, b = flce_inputs(24, 32, 65_601, torch.float64)
    y[0] = 65_600  # the last class
    _check_all(device, path, dtype, h, w, y, b, trainable=False, reduction="mean")


@pytest.mark.parametrize("device,path,dtype", expand(device_cases()))
def test_parity_many_chunks(device, path, dtype, monkeypatch):
    """Chunks of a few rows and a split hidden-gradient GEMM exercise the chunk loop."""
    from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as flce_triton

    monkeypatch.setattr(flce_torch, "CHUNK_BYTES", {"cpu": 7 * 1009 * 4, "cuda": 7 * 1009 * 4})
    monkeypatch.setattr(flce_triton, "CHUNK_BYTES", 1)  # one block of rows per chunk
    monkeypatch.setattr(flce_triton, "SPLIT", 2)
    h, w, y, b = flce_inputs(150, 40, 1009, torch.float64, bias=True)
    _check_all(device, path, dtype, h, w, y, b, trainable=True, reduction="mean", label_smoothing=0.1)


PATHS = expand(["reference", "torch", pytest.param("triton", marks=needs_triton)])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("params", ["frozen", "trainable", "bias"])
@pytest.mark.parametrize("shape", [(0,), (2, 0), (9,), (3, 4)], ids=["N0", "N0-batched", "ignored", "ignored-batched"])
@pytest.mark.parametrize("backprop", ["loss", "loss+lse", "lse"])
def test_no_target_gives_zero_loss_and_zero_grads(path, reduction, params, shape, backprop):
    """N = 0 or every target ignored: loss 0 (also "mean"), lse 0, and every input that requires a
    gradient gets a zero tensor, never None (optimizers and accumulation code rely on it) — also
    when the gradient flows only through the returned lse."""
    h = torch.randn(*shape, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=params != "frozen")
    b = torch.randn(50, requires_grad=True) if params == "bias" else None
    y = torch.full(shape, -100)
    with_lse = "lse" in backprop
    out = fused_linear_cross_entropy(h, w, y, bias=b, reduction=reduction, return_lse=with_lse, impl=path)
    loss, lse = out if with_lse else (out, None)
    assert loss.shape == (shape if reduction == "none" else ()) and torch.count_nonzero(loss) == 0
    total = loss.sum() * 0.37 if "loss" in backprop else 0.0
    if with_lse:
        assert lse.shape == shape and torch.count_nonzero(lse) == 0
        total = total + lse.sum()
    total.backward()
    for name, t in (("hidden", h), ("weight", w), ("bias", b)):
        if t is not None and t.requires_grad:
            assert t.grad is not None, f"{name}.grad is None"
            assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0, f"{name}.grad is not zero"
    if params == "frozen":
        assert w.grad is None


@pytest.mark.parametrize("device,path,dtype", expand(device_cases()))
def test_non_finite_hidden_gives_nan_loss(device, path, dtype):
    h, w, y, _ = flce_inputs(8, 16, 60, dtype, ignore_frac=0.0, device=device)
    h[2, 3] = float("nan")
    h[5, 0] = float("inf")
    for softcap in (None, 3.0):
        per_token = fused_linear_cross_entropy(h, w, y, reduction="none", softcap=softcap, impl=path)
        assert torch.isnan(per_token[2]) and torch.isnan(per_token[5]), per_token
        assert torch.isfinite(per_token[[0, 1, 3, 4, 6, 7]]).all()
        assert torch.isnan(fused_linear_cross_entropy(h, w, y, softcap=softcap, impl=path))


@pytest.mark.parametrize("device,path,dtype", expand(device_cases()))
def test_non_contiguous_inputs(device, path, dtype):
    """hidden as a transposed view of [2, 13, D]; weight, bias as every other row of bigger tensors."""
    h64, w64, y, b64 = flce_inputs(26, 24, 301, torch.float64)
    h_src = h64.reshape(13, 2, 24).to(device=device, dtype=dtype)
    h = h_src.transpose(0, 1)  # [2, 13, 24], not contiguous
    w_big = torch.zeros(602, 24, dtype=dtype, device=device)
    w_big[::2] = w64.to(device=device, dtype=dtype)
    w = w_big[::2]
    b = torch.randn(602, dtype=torch.float64).to(device=device, dtype=dtype)[::2]
    y2 = y.reshape(13, 2).t().to(device)
    assert not h.is_contiguous() and not w.is_contiguous() and not y2.is_contiguous() and not b.is_contiguous()
    got = fused_linear_cross_entropy(h, w, y2, bias=b, reduction="none", impl=path)
    want = fused_linear_cross_entropy_ref(h.contiguous(), w.contiguous(), y2.contiguous(), bias=b.contiguous(), reduction="none")
    gold = fused_linear_cross_entropy_ref(h.double(), w.double(), y2, bias=b.double(), reduction="none")
    assert_parity(got, want, gold, dtype, "non-contiguous loss")


def test_reference_matches_plain_pytorch():
    """The reference is F.cross_entropy on the materialised logits (independent formula)."""
    h, w, y, b = flce_inputs(20, 12, 33, torch.float64, bias=True)
    logits = h @ w.T + b
    want = F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=0.1)
    got = fused_linear_cross_entropy_ref(h, w, y, bias=b, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    z = 0.01
    lse = torch.logsumexp(logits, -1)
    valid = y != -100
    manual = ((lse - logits.gather(1, y.clamp_min(0)[:, None])[:, 0] + z * lse**2) * valid).sum() / valid.sum()
    torch.testing.assert_close(fused_linear_cross_entropy_ref(h, w, y, bias=b, z_loss=z), manual)


@pytest.mark.parametrize("path", expand(["torch", pytest.param("triton", marks=needs_triton)]))
def test_num_items_makes_micro_batches_add_up(path):
    """Two micro-batches with num_items = the global count sum to the full-batch mean."""
    h, w, y, _ = flce_inputs(40, 16, 97, torch.float32)
    full_h = h.clone().requires_grad_(True)
    fused_linear_cross_entropy(full_h, w, y, impl=path).backward()
    count = int((y != -100).sum())
    parts_h = h.clone().requires_grad_(True)
    total = 0.0
    for sl, n_items in ((slice(0, 15), count), (slice(15, 40), torch.tensor(count))):
        loss = fused_linear_cross_entropy(parts_h[sl], w, y[sl], num_items=n_items, impl=path)
        loss.backward()
        total = total + loss.detach()
    want = fused_linear_cross_entropy(h, w, y, impl="reference")
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts_h.grad, full_h.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", expand(["torch", pytest.param("triton", marks=needs_triton)]))
def test_return_lse_is_differentiable(path):
    """z-loss built from the returned lse equals the built-in z_loss option, grads included."""
    h, w, y, _ = flce_inputs(30, 16, 80, torch.float64 if path == "torch" else torch.float32)
    z = 0.05
    valid = y != -100
    h1 = h.clone().requires_grad_(True)
    loss, lse = fused_linear_cross_entropy(h1, w, y, return_lse=True, impl=path)
    (loss + z * (lse.square() * valid).sum() / valid.sum()).backward()
    h2 = h.clone().requires_grad_(True)
    loss2 = fused_linear_cross_entropy(h2, w, y, z_loss=z, impl=path)
    loss2.backward()
    torch.testing.assert_close(loss + z * (lse.square() * valid).sum() / valid.sum(), loss2)
    torch.testing.assert_close(h1.grad, h2.grad)
    assert torch.count_nonzero(lse[~valid]) == 0


class _CountingBackend(flce_torch.TorchChunkBackend):
    def __init__(self):
        super().__init__()
        self.calls = []

    def chunk(self, *args, **kwargs):
        self.calls.append({k: kwargs[k] is not None for k in ("loss_scale_C", "dw_acc_VD", "db_acc_V")})
        return super().chunk(*args, **kwargs)


def test_frozen_weight_does_no_weight_gradient_work(monkeypatch):
    """One pass over the chunks, gradient computed in it, no weight/bias accumulator."""
    backend = _CountingBackend()
    monkeypatch.setitem(flce_op.BACKENDS, "torch", lambda: backend)
    h, w, y, b = flce_inputs(12, 8, 40, torch.float32, bias=True)
    h.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, y, bias=b, impl="torch")
    loss.backward()
    assert backend.calls == [{"loss_scale_C": True, "dw_acc_VD": False, "db_acc_V": False}]
    assert w.grad is None and b.grad is None and h.grad is not None


def test_no_grad_forward_computes_no_gradient(monkeypatch):
    backend = _CountingBackend()
    monkeypatch.setitem(flce_op.BACKENDS, "torch", lambda: backend)
    h, w, y, _ = flce_inputs(12, 8, 40, torch.float32)
    with torch.no_grad():
        fused_linear_cross_entropy(h.requires_grad_(True), w, y, impl="torch")
    assert backend.calls == [{"loss_scale_C": False, "dw_acc_VD": False, "db_acc_V": False}]


def test_module_matches_function():
    h, w, y, b = flce_inputs(10, 8, 30, torch.float32, bias=True)
    mod = FusedLinearCrossEntropy(reduction="sum", label_smoothing=0.1, impl="torch")
    torch.testing.assert_close(
        mod(h, w, y, bias=b),
        fused_linear_cross_entropy(h, w, y, bias=b, reduction="sum", label_smoothing=0.1, impl="torch"),
    )
    assert "reduction='sum'" in repr(mod)


def test_empty_batch():
    w = torch.randn(7, 4)
    h = torch.randn(0, 4, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    loss = fused_linear_cross_entropy(h, w, y, impl="torch")
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.shape == (0, 4)


# --- bad input -------------------------------------------------------------------------------

def _good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda h, w, y: (h, torch.randn(10, 7), y), ValueError, "weight must have shape"),
        (lambda h, w, y: (h, torch.randn(10), y), ValueError, "weight must have shape"),
        (lambda h, w, y: (h, w, y[:3]), ValueError, "target must have hidden's leading shape"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "target must be an integer"),
        (lambda h, w, y: (h, w, y > 0), TypeError, "target must be an integer"),
        (lambda h, w, y: (h, w, torch.tensor([1, 2, 10, 0])), ValueError, r"target values must be in \[0, V\)"),
        (lambda h, w, y: (h, w, torch.tensor([1, -1, 3, 0])), ValueError, r"target values must be in \[0, V\)"),
        (lambda h, w, y: (h, w.double(), y), TypeError, "weight dtype"),
        (lambda h, w, y: (h.int(), w, y), TypeError, "hidden must be float"),
        (lambda h, w, y: (h.numpy(), w, y), TypeError, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_tensors_raise(mutate, exc, match):
    h, w, y = mutate(*_good())
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(h, w, y, impl="torch")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"num_items": 1.5}, TypeError, "num_items"),
        ({"num_items": -2}, ValueError, "num_items"),
        ({"num_items": 0}, ValueError, "num_items is 0"),
        ({"num_items": torch.tensor([3])}, ValueError, "num_items"),
        ({"num_items": 3, "reduction": "sum"}, ValueError, "no effect with reduction='sum'"),
        ({"bias": torch.randn(9)}, ValueError, "bias must have shape"),
        ({"bias": torch.randn(10).double()}, TypeError, "bias dtype"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    h, w, y = _good()
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(h, w, y, **({"impl": "torch"} | kwargs))


def test_module_validates_its_options_at_construction():
    with pytest.raises(ValueError, match="impl must be one of"):
        FusedLinearCrossEntropy(impl="fast")
    with pytest.raises(ValueError, match="label_smoothing"):
        FusedLinearCrossEntropy(label_smoothing=2.0)


def test_bad_environment_impl_raises(monkeypatch):
    monkeypatch.setenv("SONARLLM_KERNEL_IMPL", "fast")
    with pytest.raises(ValueError, match="SONARLLM_KERNEL_IMPL"):
        fused_linear_cross_entropy(*_good())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
@gpu
def test_mixed_devices_raise():
    h, w, y = _good()
    with pytest.raises(ValueError, match="weight is on"):
        fused_linear_cross_entropy(h.cuda(), w, y.cuda())


def test_triton_on_float64_raises_clearly():
    if not TRITON_OK:
        pytest.skip("Triton cannot run here")
    h, w, y = _good()
    with pytest.raises(TypeError, match="float64"):
        fused_linear_cross_entropy(h.double(), w.double(), y, impl="triton")


@gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", expand(["torch", "triton"]))
def test_sonar_scale_bf16_cuda(path):
    """V = 256,206, D = 1024, 4,096 tokens, bf16, frozen weight: parity with the reference."""
    h, w, y, _ = flce_inputs(4096, 1024, 256_206, torch.float64, peaky=False, ignore_frac=0.05)
    _check_all("cuda", path, torch.bfloat16, h * 0.5, w, y, None, trainable=False, reduction="mean")


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_without_spills():
    """Every Triton kernel of every schedule the tile table keeps for sm_90, at bf16 and fp32,
    with no option and with every option on (bias, class weights, smoothing, z-loss, softcap),
    compiled for sm_90a as a launch at SONAR-like shapes would be (bench/flce_compile_report.py):
    no register spill, shared memory within the limit, every Triton GEMM's K loop pipelined."""
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.flce_compile_report", "--check"],
                         cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    kernels = {"_flce_row_stats_kernel", "_flce_row_dz_kernel", "_flce_lse_kernel", "_flce_logits_kernel",
               "_flce_grad_hidden_kernel", "_flce_grad_weight_kernel"}  # fmt: skip
    assert all(f"`{k}`" in out.stdout for k in kernels), out.stdout


@pytest.mark.parametrize("device,path,dtype", expand(device_cases()))
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_minus_inf_logits_are_masked_classes(device, path, dtype, softcap):
    """A -inf bias masks classes (probability 0), also across a whole kernel tile; a target in a
    masked class costs +inf; NaN/+inf stay NaN. All paths agree with the reference."""
    h, w, y, _ = flce_inputs(12, 16, 1200, torch.float64, ignore_frac=0.0)
    b = torch.zeros(1200, dtype=torch.float64)
    b[100:700] = float("-inf")  # more than one 512-wide interpreter tile
    y[y.ge(100) & y.lt(700)] = 5
    y[3] = 150  # a masked target
    cast = lambda t: t.to(device=device, dtype=dtype)
    got = fused_linear_cross_entropy(cast(h), cast(w), y.to(device), bias=cast(b), reduction="none", softcap=softcap, impl=path)
    want = fused_linear_cross_entropy_ref(cast(h), cast(w), y.to(device), bias=cast(b), reduction="none", softcap=softcap)
    gold = fused_linear_cross_entropy_ref(h.to(device), w.to(device), y.to(device), bias=b.to(device), reduction="none", softcap=softcap)
    if softcap is None:
        assert torch.isinf(got[3]) and torch.isinf(gold[3])
    keep = torch.arange(12, device=got.device) != 3
    assert_parity(got[keep], want[keep], gold[keep], dtype, "masked classes")


def test_fp16_gradient_survives_loss_scaling():
    """fp16 training: a large num_items with a 2^16 loss scale must not flush the hidden gradient
    to zero (it is scaled in float32 in the backward, as plain PyTorch effectively does)."""
    h, w, y, _ = flce_inputs(64, 64, 4000, torch.float64, ignore_frac=0.0, peaky=False)
    grads = {}
    for name, dtype, impl in (("gold", torch.float64, "reference"), ("ref", torch.float16, "reference"),
                              ("fast", torch.float16, "torch")):  # fmt: skip
        hh = h.to(dtype).clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(hh, w.to(dtype), y, num_items=65_536, impl=impl)
        (loss * 2.0**16).backward()
        grads[name] = hh.grad
    assert torch.count_nonzero(grads["fast"]) == grads["fast"].numel()
    assert_parity(grads["fast"], grads["ref"], grads["gold"], torch.float16, "fp16 d hidden", grad=True)


@needs_triton
def test_float32_accumulation_of_16bit_weight_gradients(monkeypatch):
    """The hybrid schedule's dW += dz.T @ h with bf16 operands lands in the float32 accumulator
    with float32 accumulation: torch.addmm(out_dtype=float32) where torch has it (CUDA), else
    float32 blocks (this CPU)."""
    from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as flce_triton

    monkeypatch.setattr(flce_triton, "_ADDMM_OUT_DTYPE", True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 4000, generator=g).bfloat16(), torch.randn(4000, 24, generator=g).bfloat16()
    acc = torch.randn(300, 24, generator=g)
    want = acc.double() + a.double() @ b.double()
    flce_triton._addmm_float32(acc, a, b)
    assert acc.dtype == torch.float32
    assert (acc.double() - want).abs().max().item() < 5e-3  # a bf16 result would be off by ~0.25


@needs_triton
def test_tile_table_is_validated():
    from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as flce_triton

    good = {"schedule": "hybrid", **flce_triton._TILES["sm_90"]["2"]["hybrid"]}
    assert flce_triton.check_config(good) is good
    with pytest.raises(ValueError, match="must have keys"):
        flce_triton.check_config({k: v for k, v in good.items() if k != "BLOCK_V"})
    with pytest.raises(ValueError, match="schedule must be one of"):
        flce_triton.check_config(dict(good, schedule="cublas"))
    fused = {"schedule": "fused", **flce_triton._TILES["sm_90"]["2"]["fused"]}
    bad = dict(fused, grad=dict(fused["grad"], BLOCK_K=96))
    with pytest.raises(ValueError, match="must divide logits.BLOCK_V"):
        flce_triton.check_config(bad)
    with pytest.raises(ValueError, match="schedule must be one of"):
        flce_triton.TritonChunkBackend(schedule="cublas")
