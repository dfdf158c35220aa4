"""Parity of every fused embedding projection path with the float64 ground truth (both modes,
with and without the SONAR normalizer and bias, trainable and frozen weight), gradients, the
module, and bad input. On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by the root
conftest) at float32; the CUDA cases are marked ``gpu`` and skip without a GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sonarllm_kernels.embedding_projection import FusedEmbeddingProjection, fused_embedding_projection
from sonarllm_kernels.embedding_projection.reference import fused_embedding_projection_ref
from tests._cases import HAS_CUDA, device_cases, needs_triton
from tests._numerics import assert_parity

gpu = pytest.mark.gpu
api = importlib.import_module("sonarllm_kernels.embedding_projection")  # the module, not the function

SONAR_STD = 0.006  # per-dimension spread of raw SONAR embeddings (docs/sonar-llm.md §1)
E, D = 96, 40  # odd stand-ins for E = 1024 and the model width


def fep_inputs(mode, lead, *, bias=True, norm=True, center_ratio=0.3, in_f=None, out_f=None, seed=0):
    """Float64 masters: x, weight, bias, center, scale and the upstream gradient dy.

    Mode "in": x are raw SONAR-like embeddings (x = center + scale * N(0, 1), spread ~0.006,
    |center| ~ center_ratio * spread). Mode "out": x is a unit-scale transformer output and the
    normalizer maps the projection back to SONAR scale. Weight and bias follow nn.Linear's init.
    """
    in_f = in_f or (E if mode == "in" else D)
    out_f = out_f or (D if mode == "in" else E)
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    n = in_f if mode == "in" else out_f
    scale = SONAR_STD * (0.5 + torch.rand(n, **f64))
    center = center_ratio * SONAR_STD * torch.randn(n, **f64)
    if mode == "in":
        x = center + scale * torch.randn(*lead, in_f, **f64)
    else:
        x = torch.randn(*lead, in_f, **f64)
    bound = 1 / in_f**0.5
    w = (torch.rand(out_f, in_f, **f64) * 2 - 1) * bound
    b = (torch.rand(out_f, **f64) * 2 - 1) * bound if bias else None
    dy = torch.randn(*lead, out_f, **f64)
    return x, w, b, center if norm else None, scale if norm else None, dy


def _run(impl, x, w, b, c, s, dy, mode, *, trainable, x_grad=True, norm_grad=False):
    """Forward + backward of sum(y * dy) through one path; returns (y, dx, dw, db, dc, ds)."""
    leaf = lambda t, req: None if t is None else t.detach().clone().requires_grad_(req)
    x, w, b = leaf(x, x_grad), leaf(w, trainable), leaf(b, trainable)
    c, s = leaf(c, norm_grad), leaf(s, norm_grad)
    y = fused_embedding_projection(x, w, b, center=c, scale=s, mode=mode, impl=impl)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    if y.requires_grad:
        (y * dy).sum().backward()
    return (y.detach(),) + tuple(None if t is None else t.grad for t in (x, w, b, c, s))


NAMES = ("y", "d x", "d weight", "d bias", "d center", "d scale")


def _check_all(device, path, dtype, masters, mode, *, norm_dtype=torch.float32, **run_opts):
    x, w, b, c, s, dy = masters
    cast = lambda t, dt=dtype: None if t is None else t.to(device=device, dtype=dt)
    to_dev = lambda t: None if t is None else t.to(device)
    gold = _run("reference", *map(to_dev, (x, w, b, c, s, dy)), mode, **run_opts)
    low = (cast(x), cast(w), cast(b), cast(c, norm_dtype), cast(s, norm_dtype), cast(dy))
    ref = _run("reference", *low, mode, **run_opts)
    fast = _run(path, *low, mode, **run_opts)
    for i, name in enumerate(NAMES):
        assert_parity(fast[i], ref[i], gold[i], dtype, f"{path} mode={mode} {name}", grad=i > 0)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normalizer"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_parity(device, path, dtype, mode, norm, bias, trainable):
    """Leading batch dims [3, 5, in], odd widths (E = 96, D = 40)."""
    masters = fep_inputs(mode, (3, 5), bias=bias, norm=norm)
    _check_all(device, path, dtype, masters, mode, trainable=trainable)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
def test_parity_normalizer_gradients(device, path, dtype, mode):
    """center and scale requiring grad get gradients too (e.g. a learnable affine map)."""
    masters = fep_inputs(mode, (2, 9))
    _check_all(device, path, dtype, masters, mode, trainable=True, norm_grad=True)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
def test_parity_large_center(device, path, dtype, mode):
    """|center| = 10 spreads: a fully folded center (x @ W'.T - W' @ center) fails this in bf16."""
    masters = fep_inputs(mode, (17,), center_ratio=10.0)
    _check_all(device, path, dtype, masters, mode, trainable=True)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
def test_parity_normalizer_in_low_precision(device, path, dtype, mode):
    """center/scale stored in x's dtype (e.g. after module.to(bfloat16))."""
    masters = fep_inputs(mode, (11,))
    _check_all(device, path, dtype, masters, mode, norm_dtype=dtype, trainable=True)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
def test_parity_input_without_grad(device, path, dtype, mode):
    """x is data (the SONAR embeddings of mode "in"): only weight and bias get gradients."""
    masters = fep_inputs(mode, (4, 3))
    _check_all(device, path, dtype, masters, mode, trainable=True, x_grad=False)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
def test_parity_many_tiles_and_splits(device, path, dtype, mode, monkeypatch):
    """Small tiles and a 3-way split of the weight-gradient GEMM exercise tile edges, the K loop
    and the split-K reduction (the interpreter's tiles otherwise cover these shapes at once)."""
    from sonarllm_kernels.embedding_projection import triton_backend as fep_triton

    monkeypatch.setattr(fep_triton, "_INTERP_BLOCKS", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1))
    monkeypatch.setattr(fep_triton, "SPLIT_K", 3)
    masters = fep_inputs(mode, (37,))
    _check_all(device, path, dtype, masters, mode, trainable=True)


@pytest.mark.parametrize("device,path,dtype", device_cases())
@pytest.mark.parametrize("mode", ["in", "out"])
def test_non_contiguous_inputs_and_expanded_gradient(device, path, dtype, mode):
    """x as a transposed view of [13, 2, in], weight and bias as strided views, and the stride-0
    upstream gradient of y.sum()."""
    x64, w64, b64, c64, s64, _ = fep_inputs(mode, (26,))
    x_src = x64.reshape(13, 2, -1).to(device=device, dtype=dtype)
    x = x_src.transpose(0, 1)  # [2, 13, in], not contiguous
    w_big = torch.zeros(2 * w64.shape[0], w64.shape[1], dtype=dtype, device=device)
    w_big[::2] = w64.to(device=device, dtype=dtype)
    w = w_big[::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    c, s = c64.to(device).float(), s64.to(device).float()
    b = b64.to(device=device, dtype=dtype).repeat_interleave(2)[::2]  # a strided view
    assert not b.is_contiguous()
    outs = []
    for impl, xx, ww, bb, cc, ss in (
        (path, x, w, b, c, s),
        ("reference", x.contiguous(), w.contiguous(), b.contiguous(), c, s),
        ("reference", x.double(), w.double(), b.double(), c.double(), s.double()),
    ):
        xx = xx.detach().requires_grad_(True)
        ww = ww.detach().requires_grad_(True)
        y = fused_embedding_projection(xx, ww, bb, center=cc, scale=ss, mode=mode, impl=impl)
        y.sum().backward()
        outs.append((y.detach(), xx.grad, ww.grad))
    for i, name in enumerate(("y", "d x", "d weight")):
        assert_parity(outs[0][i], outs[1][i], outs[2][i], dtype, f"non-contiguous {name}", grad=i > 0)


@needs_triton
def test_auto_on_cuda_follows_the_measured_rule_per_mode(monkeypatch):
    """AUTO_CUDA_PATHS (Triton only where measured >= 1.1x nn.Linear + elementwise) decides auto
    on CUDA per mode; explicit impls, the environment and CPU auto are unaffected."""
    fep = importlib.import_module("sonarllm_kernels.embedding_projection")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("SONARLLM_KERNEL_IMPL", raising=False)
    monkeypatch.setitem(fep.AUTO_CUDA_PATHS, "out", "torch")
    assert fep._choose_path("auto", cuda, torch.bfloat16, "out") == "torch"
    assert fep._choose_path("auto", cuda, torch.bfloat16, "in") == "triton"
    assert fep._choose_path("triton", cuda, torch.bfloat16, "out") == "triton"
    assert fep._choose_path("auto", cuda, torch.float64, "in") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fep._choose_path("auto", cpu, torch.float32, "out") == "triton"
    monkeypatch.setenv("SONARLLM_KERNEL_IMPL", "triton")
    assert fep._choose_path("auto", cuda, torch.bfloat16, "out") == "triton"


@pytest.mark.parametrize("path", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mode", ["in", "out"])
def test_shapes_1d_and_empty(path, mode):
    x, w, b, c, s, _ = (t if t is None else t.float() for t in fep_inputs(mode, (1,)))
    y = fused_embedding_projection(x[0], w, b, center=c, scale=s, mode=mode, impl=path)
    assert y.shape == (w.shape[0],)
    torch.testing.assert_close(y, fused_embedding_projection_ref(x, w, b, center=c, scale=s, mode=mode)[0])
    x0 = torch.zeros(0, 3, w.shape[1], requires_grad=True)
    w0 = w.clone().requires_grad_(True)
    y0 = fused_embedding_projection(x0, w0, b, center=c, scale=s, mode=mode, impl=path)
    assert y0.shape == (0, 3, w.shape[0])
    y0.sum().backward()
    assert x0.grad.shape == x0.shape and torch.count_nonzero(w0.grad) == 0


def test_reference_matches_plain_pytorch():
    """The reference is nn.Linear plus the normalizer's elementwise maps (independent formula)."""
    x, w, b, c, s, _ = fep_inputs("in", (4, 6))
    lin = nn.Linear(E, D, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    want = lin((x - c) / s)
    torch.testing.assert_close(fused_embedding_projection_ref(x, w, b, center=c, scale=s, mode="in"), want)
    x, w, b, c, s, _ = fep_inputs("out", (4, 6))
    want = (x @ w.T + b) * s + c
    torch.testing.assert_close(fused_embedding_projection_ref(x, w, b, center=c, scale=s, mode="out"), want)
    torch.testing.assert_close(fused_embedding_projection_ref(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("mode", ["in", "out"])
def test_torch_path_float64_is_exact(mode):
    """The folded normalizer is algebraically exact: float64 agrees to rounding."""
    x, w, b, c, s, _ = fep_inputs(mode, (8,), center_ratio=2.0)
    got = fused_embedding_projection(x, w, b, center=c, scale=s, mode=mode, impl="torch")
    want = fused_embedding_projection_ref(x, w, b, center=c, scale=s, mode=mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


class _GemmCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append("dW" if kwargs.get("split_k") else "gemm")
        return self.fn(*args, **kwargs)


@needs_triton
@pytest.mark.parametrize("mode", ["in", "out"])
def test_frozen_weight_does_no_weight_gradient_work(mode, monkeypatch):
    from sonarllm_kernels.embedding_projection import triton_backend as fep_triton

    counter = _GemmCounter(fep_triton.fep_gemm)
    monkeypatch.setattr(fep_triton, "fep_gemm", counter)
    x, w, b, c, s, _ = (t if t is None else t.float() for t in fep_inputs(mode, (5,)))
    b.requires_grad_(True)  # trainable bias beside a frozen weight: db by a reduction, no GEMM
    x.requires_grad_(True)
    fused_embedding_projection(x, w, b, center=c, scale=s, mode=mode, impl="triton").sum().backward()
    assert counter.calls == ["gemm", "gemm"], counter.calls  # forward, d x
    assert w.grad is None and b.grad is not None and x.grad is not None
    counter.calls.clear()
    x.grad = b.grad = None
    x.requires_grad_(False)
    fused_embedding_projection(x, w, b, center=c, scale=s, mode=mode, impl="triton").sum().backward()
    assert counter.calls == ["gemm"], counter.calls  # forward only
    counter.calls.clear()
    with torch.no_grad():
        fused_embedding_projection(x.requires_grad_(True), w, b, center=c, scale=s, mode=mode, impl="triton")
    assert counter.calls == ["gemm"], counter.calls


def test_normalizer_values_are_checked_once_per_tensor(monkeypatch):
    calls = []
    real = api.check_normalizer_values
    monkeypatch.setattr(api, "check_normalizer_values", lambda c, s: (calls.append(1), real(c, s)))
    x, w, b, c, s, _ = fep_inputs("in", (3,))
    for _ in range(3):
        fused_embedding_projection(x, w, b, center=c, scale=s, impl="torch")
    assert len(calls) == 1
    s.mul_(2.0)  # in place: the version counter moves, the values are checked again
    fused_embedding_projection(x, w, b, center=c, scale=s, impl="torch")
    assert len(calls) == 2
    s[3] = -1.0
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        fused_embedding_projection(x, w, b, center=c, scale=s, impl="torch")


# --- the module ------------------------------------------------------------------------------

def test_module_initialises_like_nn_linear():
    torch.manual_seed(3)
    lin = nn.Linear(E, D)
    torch.manual_seed(3)
    mod = FusedEmbeddingProjection(E, D)
    torch.testing.assert_close(mod.weight, lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(mod.bias, lin.bias, rtol=0, atol=0)
    x = torch.randn(4, 7, E)
    torch.testing.assert_close(mod(x), lin(x))
    assert FusedEmbeddingProjection(E, D, bias=False).bias is None


@pytest.mark.parametrize("mode", ["in", "out"])
def test_module_with_normalizer_matches_function(mode):
    x, _, _, c, s, _ = (t.float() for t in fep_inputs(mode, (2, 5)))
    in_f, out_f = x.shape[-1], (D if mode == "in" else E)
    mod = FusedEmbeddingProjection(in_f, out_f, mode=mode, impl="torch")
    mod.set_normalizer(c.double(), s.double())
    assert mod.center.dtype == torch.float64 and mod.normalizer_features == c.shape[0]
    mod.set_normalizer(c.half(), s)
    assert mod.center.dtype == torch.float32  # kept at least float32
    mod.set_normalizer(c, s)
    want = fused_embedding_projection(x, mod.weight, mod.bias, center=c, scale=s, mode=mode, impl="reference")
    torch.testing.assert_close(mod(x), want)
    assert "normalizer=True" in repr(mod) and f"mode={mode!r}" in repr(mod)
    assert mod.center is not c  # a copy: later changes to the caller's tensor do not leak in
    mod(x).sum().backward()
    assert mod.weight.grad is not None and mod.center.grad is None
    mod.set_normalizer(None, None)
    torch.testing.assert_close(mod(x), F.linear(x, mod.weight, mod.bias))


def test_module_state_dict_round_trip_restores_normalizer():
    x, _, _, c, s, _ = (t.float() for t in fep_inputs("out", (4,)))
    src = FusedEmbeddingProjection(D, E, mode="out", impl="torch")
    src.set_normalizer(c, s)
    state = src.state_dict()
    assert set(state) == {"weight", "bias", "center", "scale"}
    dst = FusedEmbeddingProjection(D, E, mode="out", impl="torch")
    dst.load_state_dict(state)
    torch.testing.assert_close(dst(x), src(x))
    plain = FusedEmbeddingProjection(D, E, mode="out")
    with pytest.raises(RuntimeError, match="Missing key"):
        src.load_state_dict(plain.state_dict())


def test_module_to_bfloat16_runs():
    x, _, _, c, s, _ = (t.float() for t in fep_inputs("in", (6,)))
    mod = FusedEmbeddingProjection(E, D, impl="torch")
    mod.set_normalizer(c, s)
    want = mod(x)
    mod = mod.to(torch.bfloat16)
    got = mod(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: FusedEmbeddingProjection(E, D, mode="sideways"), ValueError, "mode must be one of"),
        (lambda: FusedEmbeddingProjection(E, D, impl="cuda"), ValueError, "impl must be one of"),
        (lambda: FusedEmbeddingProjection(E, D).set_normalizer(torch.zeros(D), torch.ones(D)), ValueError, r"center must have shape \(96,\)"),
        (lambda: FusedEmbeddingProjection(E, D, mode="out").set_normalizer(torch.zeros(E), torch.ones(E)), ValueError, r"center must have shape \(40,\)"),
        (lambda: FusedEmbeddingProjection(E, D).set_normalizer(torch.zeros(E), torch.zeros(E)), ValueError, "scale must be finite and > 0"),
        (lambda: FusedEmbeddingProjection(E, D).set_normalizer(torch.zeros(E), None), TypeError, "scale must be a torch.Tensor"),
        (lambda: FusedEmbeddingProjection(E, D).set_normalizer(torch.zeros(E, dtype=torch.long), torch.ones(E)), TypeError, "center must be a float"),
    ],
)
def test_module_bad_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- bad input -------------------------------------------------------------------------------

def _good():
    x, w, b, c, s, _ = fep_inputs("in", (4,))
    return dict(x=x.float(), weight=w.float(), bias=b.float(), center=c.float(), scale=s.float(), impl="torch")


def _nan_at_2(t):
    t = t.clone()
    t[2] = float("nan")
    return t


@pytest.mark.parametrize(
    "change,exc,match",
    [
        ({"weight": torch.randn(D, E + 1)}, ValueError, r"weight must have shape \[out_features, in_features\] with in_features"),
        ({"weight": torch.randn(D * E)}, ValueError, "weight must have shape"),
        ({"bias": torch.randn(D + 1)}, ValueError, r"bias must have shape \[out_features\]"),
        ({"center": torch.zeros(D)}, ValueError, r"center must have shape \[in_features\]"),
        ({"scale": torch.ones(E + 2)}, ValueError, r"scale must have shape \[in_features\]"),
        ({"mode": "out"}, ValueError, r"center must have shape \[out_features\]"),
        ({"scale": None}, ValueError, "center and scale must be given together"),
        ({"center": None}, ValueError, "center and scale must be given together"),
        ({"scale": torch.zeros(E)}, ValueError, "scale must be finite and > 0"),
        ({"scale": -torch.ones(E)}, ValueError, "scale must be finite and > 0"),
        ({"scale": torch.full((E,), float("inf"))}, ValueError, "scale must be finite and > 0"),
        ({"scale": _nan_at_2(torch.ones(E))}, ValueError, "scale must be finite and > 0"),
        ({"center": _nan_at_2(torch.zeros(E))}, ValueError, "center must be finite"),
        ({"center": torch.zeros(E, dtype=torch.int32)}, TypeError, "center must be a float tensor"),
        ({"weight": torch.randn(D, E, dtype=torch.float64)}, TypeError, "weight dtype"),
        ({"bias": torch.randn(D, dtype=torch.bfloat16)}, TypeError, "bias dtype"),
        ({"x": torch.ones(4, E, dtype=torch.int64)}, TypeError, "x must be float"),
        ({"x": [[1.0] * E]}, TypeError, "x must be a torch.Tensor"),
        ({"bias": 0.5}, TypeError, "bias must be a torch.Tensor or None"),
        ({"x": torch.tensor(1.0)}, ValueError, "x must have shape"),
        ({"weight": torch.empty(D, E, device="meta")}, ValueError, "weight is on meta but x is on cpu"),
        ({"scale": torch.ones(E, device="meta")}, ValueError, "scale is on meta but x is on cpu"),
        ({"mode": "both"}, ValueError, "mode must be one of"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
    ],
)
def test_bad_input_raises(change, exc, match):
    args = _good() | change
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=match):
        fused_embedding_projection(x, w, b, **args)


def test_bad_environment_impl_raises(monkeypatch):
    monkeypatch.setenv("SONARLLM_KERNEL_IMPL", "fast")
    args = _good() | {"impl": "auto"}
    with pytest.raises(ValueError, match="SONARLLM_KERNEL_IMPL"):
        fused_embedding_projection(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


@needs_triton
def test_triton_on_float64_raises_clearly():
    x, w, b, c, s, _ = fep_inputs("in", (3,))
    with pytest.raises(TypeError, match="float64"):
        fused_embedding_projection(x, w, b, center=c, scale=s, impl="triton")


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_mixed_devices_raise():
    args = _good()
    with pytest.raises(ValueError, match="weight is on"):
        fused_embedding_projection(args["x"].cuda(), args["weight"], args["bias"].cuda())
    with pytest.raises(ValueError, match="scale is on"):
        fused_embedding_projection(
            args["x"].cuda(), args["weight"].cuda(), None, center=args["center"].cuda(), scale=args["scale"]
        )


@gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("mode,d", [("in", 2048), ("out", 2048), ("in", 512), ("out", 1024)])
def test_concept_transformer_scale_bf16_cuda(path, mode, d):
    """E = 1024 <-> D, 64 x 33 tokens (the "ci" bench shape), bf16, trainable weight."""
    in_f, out_f = (1024, d) if mode == "in" else (d, 1024)
    masters = fep_inputs(mode, (64, 33), in_f=in_f, out_f=out_f)
    _check_all("cuda", path, torch.bfloat16, masters, mode, trainable=True, x_grad=mode == "out")
