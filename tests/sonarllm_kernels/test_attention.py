"""Parity of every attention path with the float64 ground truth, layouts, masks, dispatch and bad
input. On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by the root conftest) at
float32; the CUDA cases are marked ``gpu`` and skip without a GPU.

Rule (flash-attn's tests): max|fast - gold| <= 2 x max|ref - gold| + tol for the output and 3 x for
dq, dk, dv, where ``ref`` is sonarllm_kernels.attention.reference at the test dtype and ``gold`` the same
reference on float64 inputs.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sonarllm_kernels._dispatch import triton_available
from sonarllm_kernels.attention import attention, cu_seqlens_from_lengths
from sonarllm_kernels.attention.reference import attention_ref
from tests._cases import CUDA_DTYPES, HAS_CUDA, device_cases, needs_cuda, needs_triton
from tests._numerics import TOL, TOL_GRAD, max_err

attn_mod = importlib.import_module("sonarllm_kernels.attention")  # the module, not the function

REPO = Path(__file__).resolve().parents[2]


def _device_cases():
    """The shared matrix plus flash-attn on CUDA at bf16/fp16."""
    cases = device_cases()
    for dt, name in CUDA_DTYPES[1:]:
        marks = needs_cuda + [pytest.mark.skipif(attn_mod._flash_attn() is None, reason="flash-attn not installed")]
        cases.append(pytest.param("cuda", "flash", dt, id=f"cuda-flash-{name}", marks=marks))
    return cases


def _assert_fa(fast, ref, gold, dtype, what, grad):
    """flash-attn's rule: outputs within 2x, gradients within 3x the reference's error, + tol."""
    assert fast.shape == gold.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(gold.shape)}"
    scale = gold.detach().abs().nan_to_num(0.0).max().item() if gold.numel() else 0.0
    tol = (TOL_GRAD if grad else TOL)[dtype] * max(scale, 1e-30)
    factor = 3 if grad else 2
    err_fast, err_ref = max_err(fast, gold), max_err(ref, gold)
    assert err_fast <= factor * err_ref + tol, (
        f"{what} ({dtype}): max error {err_fast:.3e} > {factor} * reference error {err_ref:.3e} "
        f"+ tol {tol:.3e} (scale {scale:.3e})"
    )


def _qkv(q_shape, k_shape, *, seed=0, spread=1.0):
    """float64 q, k, v masters; ``spread`` > 1 makes the softmax peaky."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_shape, generator=g, dtype=torch.float64) * spread
    k = torch.randn(k_shape, generator=g, dtype=torch.float64)
    v = torch.randn(k_shape, generator=g, dtype=torch.float64)
    return q, k, v


def _run(path, q, k, v, *, seed=1, **kw):
    """Forward and backward of one path with a fixed random upstream gradient: (o, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, impl=path, **kw)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    (out * do).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _check(device, path, dtype, q64, k64, v64, **kw):
    cast = lambda t: t.to(device=device, dtype=dtype)
    kw = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    gold = _run("reference", q64.to(device), k64.to(device), v64.to(device), **kw)
    ref = _run("reference", cast(q64), cast(k64), cast(v64), **kw)
    fast = _run(path, cast(q64), cast(k64), cast(v64), **kw)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        _assert_fa(fast[i], ref[i], gold[i], dtype, f"{path} {name} {kw}", grad=i > 0)


# --- parity ----------------------------------------------------------------------------------

BATCHED_SHAPES = [  # (B, Sq, Sk, H, Dh)
    pytest.param((2, 37, 37, 2, 32), id="square-odd"),
    pytest.param((1, 150, 150, 1, 64), id="multi-block"),
    pytest.param((2, 1, 77, 2, 64), id="decode-q1"),
    pytest.param((1, 20, 77, 2, 64), id="prefill-chunk"),
    pytest.param((1, 77, 20, 2, 64), id="more-q-than-k"),
    pytest.param((1, 40, 40, 2, 128), id="hd128"),
    pytest.param((1, 33, 50, 2, 24), id="hd24"),
]


@pytest.mark.parametrize("device,path,dtype", _device_cases())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", BATCHED_SHAPES)
def test_parity_batched(device, path, dtype, causal, shape):
    b, sq, sk, h, d = shape
    if path == "flash" and d % 8:
        pytest.skip("flash-attn needs head dims divisible by 8")
    q, k, v = _qkv((b, sq, h, d), (b, sk, h, d))
    _check(device, path, dtype, q, k, v, causal=causal)


VARLEN_CASES = [  # (query lengths, key lengths or None for the same cu_seqlens)
    pytest.param(([1, 37, 5, 64, 0, 100], None), id="self-mixed-lengths"),
    pytest.param(([1, 1, 3, 40, 0], [10, 1, 40, 3, 5]), id="kv-cache"),
    pytest.param(([1] * 6, [5, 17, 1, 60, 33, 2]), id="decode-batch"),
]


@pytest.mark.parametrize("device,path,dtype", _device_cases())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_parity_varlen(device, path, dtype, causal, case):
    lens_q, lens_k = case
    cu_q = cu_seqlens_from_lengths(lens_q)
    cu_k = None if lens_k is None else cu_seqlens_from_lengths(lens_k)
    q, k, v = _qkv((sum(lens_q), 2, 32), (sum(lens_k or lens_q), 2, 32))
    _check(device, path, dtype, q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("device,path,dtype", _device_cases())
def test_parity_peaky_softmax_and_custom_scale(device, path, dtype):
    """Large scores (the online-softmax rescaling matters) and a non-default softmax_scale."""
    q, k, v = _qkv((2, 45, 2, 64), (2, 45, 2, 64), spread=4.0)
    _check(device, path, dtype, q, k, v, causal=True, softmax_scale=0.4)


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="interpreter block sizes")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_small_blocks_exercise_every_loop(causal, monkeypatch):
    """16 x 16 blocks: unmasked, diagonal-band and ragged-tail loops of all three kernels."""
    from sonarllm_kernels.attention import triton_backend as attn_triton

    monkeypatch.setitem(attn_triton._INTERP_BLOCKS, "BLOCK_M", 16)
    monkeypatch.setitem(attn_triton._INTERP_BLOCKS, "BLOCK_N", 16)
    for b, sq, sk, h, d in [(1, 70, 70, 1, 32), (1, 21, 70, 1, 16), (1, 70, 21, 1, 8), (1, 33, 50, 1, 24)]:
        q, k, v = _qkv((b, sq, h, d), (b, sk, h, d))
        _check("cpu", "triton", torch.float32, q, k, v, causal=causal)
    cu_q, cu_k = cu_seqlens_from_lengths([1, 1, 3, 40, 0]), cu_seqlens_from_lengths([10, 1, 40, 3, 5])
    q, k, v = _qkv((45, 2, 32), (59, 2, 32))
    _check("cpu", "triton", torch.float32, q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_non_contiguous_fused_qkv(path, varlen):
    """q, k, v as strided views of one fused projection [..., 3, H, Dh] (the model's layout)."""
    lens = [9, 1, 30]
    shape = (sum(lens), 3, 2, 32) if varlen else (2, 29, 3, 2, 32)
    qkv = torch.randn(shape, dtype=torch.float64)
    q, k, v = qkv.unbind(dim=-3)
    assert not q.is_contiguous()
    kw = {"cu_seqlens_q": cu_seqlens_from_lengths(lens)} if varlen else {}
    gold = _run("reference", q, k, v, **kw)
    ref = _run("reference", q.float(), k.float(), v.float(), **kw)
    fast = _run(path, q.float(), k.float(), v.float(), **kw)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        _assert_fa(fast[i], ref[i], gold[i], torch.float32, f"{path} {name}", grad=i > 0)


def test_self_attention_max_seqlen_k_defaults_to_max_seqlen_q(monkeypatch):
    """The SONAR decoder/encoder pass cu_seqlens_q and max_seqlen_q only: k shares q's lengths,
    so max_seqlen_k is known and attention needs no host sync (on CUDA) to compute it."""
    seen = []
    real = attn_mod._varlen_max_lengths
    monkeypatch.setattr(attn_mod, "_varlen_max_lengths", lambda *a: seen.append(a[-2:]) or real(*a))
    cu = cu_seqlens_from_lengths([4, 11, 2])
    q, k, v = (t.float() for t in _qkv((17, 2, 16), (17, 2, 16)))
    got = attention(q, k, v, cu_seqlens_q=cu, max_seqlen_q=11, impl="torch")
    torch.testing.assert_close(got, attention_ref(q, k, v, cu_seqlens_q=cu), rtol=1e-5, atol=1e-5)
    assert seen == [(11, 11)]
    attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=11, impl="torch")
    assert seen[-1] == (11, None), "separate k lengths: its maximum is still computed"


@pytest.mark.parametrize("path", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
def test_max_seqlen_larger_than_needed(path):
    lens = [4, 11, 2]
    cu = cu_seqlens_from_lengths(lens)
    q, k, v = _qkv((17, 2, 16), (17, 2, 16))
    q, k, v = q.float(), k.float(), v.float()
    want = attention_ref(q, k, v, cu_seqlens_q=cu)
    got = attention(q, k, v, cu_seqlens_q=cu, max_seqlen_q=40, max_seqlen_k=33, impl=path)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_no_grad_forward():
    q, k, v = (t.float() for t in _qkv((1, 19, 2, 32), (1, 19, 2, 32)))
    with torch.no_grad():
        got = attention(q.requires_grad_(True), k, v, impl="triton")
    assert not got.requires_grad
    torch.testing.assert_close(got, attention_ref(q.detach(), k, v), rtol=1e-5, atol=1e-5)


# --- semantics of the specification -------------------------------------------------------------


def test_reference_matches_independent_formula():
    """Loops over (batch, head, query) with bottom-right causal masks, against the reference."""
    q, k, v = _qkv((2, 5, 3, 8), (2, 7, 3, 8))
    scale = 0.3
    for causal in (True, False):
        want = torch.zeros_like(q)
        for b in range(2):
            for h in range(3):
                for i in range(5):
                    keys = [j for j in range(7) if not causal or j <= i + 7 - 5]
                    w = torch.softmax(torch.stack([scale * q[b, i, h] @ k[b, j, h] for j in keys]), 0)
                    want[b, i, h] = sum(w[n] * v[b, j, h] for n, j in enumerate(keys))
        got = attention_ref(q, k, v, causal=causal, softmax_scale=scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Varlen is the batched computation per sequence.
    cu = cu_seqlens_from_lengths([5, 5])
    flat = lambda t: t.reshape(-1, 3, 8)
    got = attention_ref(flat(q), flat(k[:, :5]), flat(v[:, :5]), cu_seqlens_q=cu)
    torch.testing.assert_close(got, flat(attention_ref(q, k[:, :5], v[:, :5])), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
def test_single_query_against_cache_sees_everything(path):
    """Bottom-right alignment: causal decoding of 1 query equals non-causal attention."""
    q, k, v = (t.float() for t in _qkv((3, 1, 2, 32), (3, 25, 2, 32)))
    causal = attention(q, k, v, causal=True, impl=path)
    full = attention(q, k, v, causal=False, impl=path)
    torch.testing.assert_close(causal, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
def test_queries_without_keys_give_zeros_and_zero_grads(path):
    """Sq > Sk under causal: the first Sq - Sk queries see no key (flash-attn: zero output)."""
    q, k, v = (t.float().requires_grad_(True) for t in _qkv((1, 9, 2, 16), (1, 4, 2, 16)))
    out = attention(q, k, v, causal=True, impl=path)
    assert torch.count_nonzero(out[:, :5]) == 0 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.count_nonzero(q.grad[:, :5]) == 0
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # A varlen sequence with no keys at all, next to a normal one.
    cu_q, cu_k = cu_seqlens_from_lengths([3, 2]), cu_seqlens_from_lengths([0, 4])
    q2, k2, v2 = (t.float() for t in _qkv((5, 2, 16), (4, 2, 16)))
    out2 = attention(q2, k2, v2, causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, impl=path)
    assert torch.count_nonzero(out2[:3]) == 0
    torch.testing.assert_close(out2[3:], attention_ref(q2[3:][None], k2[None], v2[None], causal=False)[0])


@pytest.mark.parametrize("path", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(path):
    q, k, v = (torch.randn(2, 0, 2, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, impl=path)
    assert out.shape == (2, 0, 2, 16)
    q, k = torch.randn(2, 3, 2, 16), torch.randn(2, 0, 2, 16)
    assert torch.count_nonzero(attention(q, k, k.clone(), impl=path)) == 0


@needs_triton
def test_triton_stores_logsumexp_per_row():
    """The forward's lse [H, N_rows] is logsumexp of the visible scaled scores (+inf: no key)."""
    from sonarllm_kernels.attention.triton_backend import AttnParams, attention_fwd

    q, k, v = _qkv((2, 9, 3, 16), (2, 6, 3, 16))
    _, lse = attention_fwd(q.float(), k.float(), v.float(), None, None, AttnParams(True, 0.25, 9, 6))
    s = torch.einsum("bqhd,bkhd->hbqk", q, k) * 0.25
    visible = torch.arange(6)[None, :] <= torch.arange(9)[:, None] + (6 - 9)
    want = torch.logsumexp(s.masked_fill(~visible, float("-inf")), dim=-1).reshape(3, 18)
    assert torch.isinf(lse[:, [0, 1, 2, 9, 10, 11]]).all() and (lse[:, [0, 1, 2]] > 0).all()
    finite = torch.isfinite(want)
    torch.testing.assert_close(lse[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


# --- dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["torch", "reference"])
def test_dropout_is_seeded_and_unbiased(path):
    q, k, v = _qkv((1, 8, 1, 8), (1, 8, 1, 8))
    plain = attention(q, k, v, impl=path)
    torch.manual_seed(3)
    a = attention(q, k, v, dropout_p=0.3, impl=path)
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.3, impl=path)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max_err(a, plain) > 1e-3
    mean = torch.stack([attention(q, k, v, dropout_p=0.3, impl=path) for _ in range(400)]).mean(0)
    assert max_err(mean, plain) < 0.2, "dropout must rescale the kept weights by 1 / (1 - p)"


@needs_triton
def test_triton_rejects_dropout():
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=0.1, impl="triton")


# --- dispatch --------------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("SONARLLM_KERNEL_IMPL", raising=False)
    return monkeypatch


def _fake_flash(calls):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("batched", dropout_p, softmax_scale, causal))
        return attention_ref(q, k, v, causal=causal, softmax_scale=softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("varlen", max_q, max_k, dropout_p, softmax_scale, causal))
        return attention_ref(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    return flash_attn_func, flash_attn_varlen_func


def test_auto_choice(clean_env):
    clean_env.setattr(attn_mod, "_flash_attn", lambda: None)
    choose = attn_mod._choose_path
    clean_env.setenv("TRITON_INTERPRET", "1")
    want = "triton" if triton_available() else "torch"
    assert choose("auto", CPU, torch.float32, 64, 0.0) == want
    assert choose("auto", CPU, torch.float32, 64, 0.1) == "torch"  # no dropout in Triton
    assert choose("auto", CPU, torch.float64, 64, 0.0) == "torch"
    assert choose("auto", CPU, torch.float32, 256, 0.0) == "torch"
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert choose("auto", CPU, torch.float32, 64, 0.0) == "torch"
    clean_env.setenv("SONARLLM_KERNEL_IMPL", "reference")
    assert choose("auto", CPU, torch.float32, 64, 0.0) == "reference"
    assert choose("torch", CPU, torch.float32, 64, 0.0) == "torch"


def test_auto_on_cuda_prefers_flash_attn_for_half_precision(clean_env):
    clean_env.setattr(attn_mod, "_flash_attn", lambda: _fake_flash([]))
    choose = attn_mod._choose_path
    assert choose("auto", CUDA, torch.bfloat16, 64, 0.0) == "flash"
    assert choose("auto", CUDA, torch.float16, 64, 0.1) == "flash"  # flash-attn has dropout
    if triton_available():
        assert choose("auto", CUDA, torch.float32, 64, 0.0) == "triton"
        assert choose("triton", CUDA, torch.bfloat16, 64, 0.0) == "triton"
    assert choose("auto", CUDA, torch.float32, 64, 0.1) == "torch"
    clean_env.setenv("SONARLLM_KERNEL_IMPL", "torch")
    assert choose("auto", CUDA, torch.bfloat16, 64, 0.0) == "torch"
    clean_env.setattr(attn_mod, "_flash_attn", lambda: None)
    clean_env.delenv("SONARLLM_KERNEL_IMPL")
    if triton_available():
        assert choose("auto", CUDA, torch.bfloat16, 64, 0.0) == "triton"


@needs_triton
def test_auto_on_cuda_follows_the_measured_rule_per_kind_of_call(clean_env):
    """AUTO_CUDA_PATHS (what the H200 measurements pick per kind of call) decides auto on CUDA;
    an explicit impl or SONARLLM_KERNEL_IMPL still wins, and CPU auto ignores the rule."""
    clean_env.setattr(attn_mod, "_flash_attn", lambda: None)
    clean_env.setitem(attn_mod.AUTO_CUDA_PATHS, "decode", "torch")
    choose = attn_mod._choose_path
    assert attn_mod.call_kind(False, 1) == "decode"
    assert attn_mod.call_kind(False, 33) == "dense" and attn_mod.call_kind(True, 1) == "varlen"
    assert choose("auto", CUDA, torch.bfloat16, 64, 0.0, "decode") == "torch"
    assert choose("auto", CUDA, torch.bfloat16, 64, 0.0, "dense") == "triton"
    assert choose("auto", CUDA, torch.bfloat16, 64, 0.0, "varlen") == "triton"
    assert choose("triton", CUDA, torch.bfloat16, 64, 0.0, "decode") == "triton"
    clean_env.setitem(attn_mod.AUTO_CUDA_PATHS, "varlen", "torch")
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert choose("auto", CPU, torch.float32, 64, 0.0, "varlen") == "triton"
    clean_env.setenv("SONARLLM_KERNEL_IMPL", "triton")
    assert choose("auto", CUDA, torch.bfloat16, 64, 0.0, "varlen") == "triton"


def test_explicit_flash_that_cannot_run_raises(clean_env):
    clean_env.setattr(attn_mod, "_flash_attn", lambda: None)
    with pytest.raises(RuntimeError, match="flash_attn cannot be imported"):
        attn_mod._choose_path("flash", CUDA, torch.bfloat16, 64, 0.0)
    clean_env.setattr(attn_mod, "_flash_attn", lambda: _fake_flash([]))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        attn_mod._choose_path("flash", CPU, torch.bfloat16, 64, 0.0)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        attn_mod._choose_path("flash", CUDA, torch.float32, 64, 0.0)


def test_flash_call_passes_layouts_and_options_unchanged():
    calls = []
    fns = _fake_flash(calls)
    q, k, v = _qkv((2, 6, 2, 16), (2, 9, 2, 16))
    got = attn_mod._flash(q, k, v, None, None, 6, 9, True, 0.5, 0.0, fns=fns)
    torch.testing.assert_close(got, attention_ref(q, k, v, softmax_scale=0.5))
    cu_q, cu_k = cu_seqlens_from_lengths([2, 4]), cu_seqlens_from_lengths([5, 4])
    q, k, v = _qkv((6, 2, 16), (9, 2, 16))
    got = attn_mod._flash(q, k, v, cu_q, cu_k, 4, 5, False, 0.25, 0.0, fns=fns)
    want = attention_ref(q, k, v, causal=False, softmax_scale=0.25, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    torch.testing.assert_close(got, want)
    assert calls == [("batched", 0.0, 0.5, True), ("varlen", 4, 5, 0.0, 0.25, False)]


@needs_triton
def test_launch_shrinks_config_when_out_of_resources(monkeypatch):
    """Pinned GPU configs that exceed shared memory (fp32, smaller GPUs) retry smaller, once."""
    from triton.runtime.errors import OutOfResources

    from sonarllm_kernels.attention import triton_backend as attn_triton

    monkeypatch.setattr(attn_triton, "_WORKING", {})
    attempts, launched = [], []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **kw):
                attempts.append(kw)
                if kw["num_stages"] > 1 or kw["BLOCK_N"] > 32:
                    raise OutOfResources(262_144, 232_448, "shared memory")
                launched.append((grid, args, kw))

            return run

    cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    grid = lambda c: (4, -(-1000 // c["BLOCK_M"]))
    attn_triton._launch(FakeKernel(), "fwd", cfg, torch.float32, 128, grid, "x", FLAG=1)
    assert launched == [((4, 32), ("x",), dict(FLAG=1, BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1))]
    n_attempts = len(attempts)
    attn_triton._launch(FakeKernel(), "fwd", cfg, torch.float32, 128, grid, "x", FLAG=1)
    assert len(attempts) == n_attempts + 1, "the working config is remembered"

    class NeverFits:
        def __getitem__(self, grid):
            def run(*args, **kw):
                raise OutOfResources(1, 0, "shared memory")

            return run

    with pytest.raises(OutOfResources):
        attn_triton._launch(NeverFits(), "dq", cfg, torch.float32, 128, grid)


_AOT_SCRIPT = """
import triton, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sonarllm_kernels.attention import triton_backend as at

assert not at.is_interpreter()
for kind, fn in (("fwd", at._attn_fwd_kernel), ("dkdv", at._attn_bwd_dkdv_kernel),
                 ("dq", at._attn_bwd_dq_kernel), ("pre", at._attn_bwd_preprocess_kernel)):
    cfg = at._blocks("dq" if kind == "pre" else kind, torch.bfloat16, 64, 4096, 4096)
    consts = dict(IS_VARLEN=True, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=cfg["BLOCK_M"])
    if kind != "pre":
        consts.update(CAUSAL=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_N=cfg["BLOCK_N"])
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name.startswith("cu_") else "*fp32" if name in ("lse_ptr", "delta_ptr") else "*bf16"
        else:
            sig[name] = "fp32" if name in ("qk_scale", "softmax_scale") else "i32"
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)
    assert compiled.metadata.shared <= 232_448, (kind, compiled.metadata.shared)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Compile (not run) the kernels for sm_90 with the pinned bf16 configs, so GPU-only
    compile errors (e.g. non-constexpr globals, which the interpreter accepts) fail on CPU too."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@needs_triton
def test_pinned_gpu_configs_are_valid():
    from sonarllm_kernels.attention import triton_backend as attn_triton

    for key, kernels_cfg in attn_triton._GPU_BLOCKS.items():
        for kind in ("fwd", "dkdv", "dq"):
            cfg = kernels_cfg[kind]
            for name in ("BLOCK_M", "BLOCK_N"):
                assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, (key, kind, cfg)


@needs_triton
def test_head_dim_limits_agree():
    from sonarllm_kernels.attention import triton_backend as attn_triton

    assert attn_mod.TRITON_MAX_HEAD_DIM == attn_triton.MAX_HEAD_DIM


# --- helpers ---------------------------------------------------------------------------------


def test_cu_seqlens_from_lengths():
    want = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    assert torch.equal(cu_seqlens_from_lengths([3, 0, 5]), want)
    assert torch.equal(cu_seqlens_from_lengths(torch.tensor([3, 0, 5])), want)
    assert torch.equal(cu_seqlens_from_lengths([]), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        cu_seqlens_from_lengths([2, -1])
    with pytest.raises(ValueError, match="lengths must be a 1-D integer tensor"):
        cu_seqlens_from_lengths(torch.tensor([1.0, 2.0]))


# --- bad input -------------------------------------------------------------------------------


def _good():
    return torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)


def _packed():
    return torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), cu_seqlens_from_lengths([2, 4])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have shape \[B, S, H, Dh\]"),
        (lambda q, k, v: (q, k[0], v), ValueError, r"k must have shape \[B, S, H, Dh\]"),
        (lambda q, k, v: (q, k, v[:, :6]), ValueError, "v must have k's shape"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k must have q's batch size"),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "number of heads"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), ValueError, "head dim"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "head dim Dh >= 1"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k dtype"),
        (lambda q, k, v: (q, k, v.half()), TypeError, "v dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q must be float"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors_raise(mutate, exc, match):
    with pytest.raises(exc, match=match):
        attention(*mutate(*_good()), impl="torch")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"causal": 1}, TypeError, "causal must be a bool"),
        ({"softmax_scale": float("nan")}, ValueError, "softmax_scale must be finite"),
        ({"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a float"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"max_seqlen_q": 5}, ValueError, "max_seqlen_q is only used with cu_seqlens_q"),
        ({"cu_seqlens_k": torch.tensor([0, 7, 14], dtype=torch.int32)}, ValueError, "cu_seqlens_k was given without"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention(*_good(), **({"impl": "torch"} | kwargs))


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"cu_seqlens_q": torch.tensor([0, 2, 6])}, TypeError, "cu_seqlens_q must be int32"),
        ({"cu_seqlens_q": [0, 2, 6]}, TypeError, "cu_seqlens_q must be an int32 torch.Tensor"),
        ({"cu_seqlens_q": _cu(0, 2, 6)[None]}, ValueError, r"cu_seqlens_q must have shape \[B \+ 1\]"),
        ({"cu_seqlens_q": _cu(6)}, ValueError, r"cu_seqlens_q must have shape \[B \+ 1\]"),
        ({"cu_seqlens_q": _cu(1, 2, 6)}, ValueError, "cu_seqlens_q must start at 0"),
        ({"cu_seqlens_q": _cu(0, 4, 2, 6)}, ValueError, "cu_seqlens_q must be non-decreasing"),
        ({"cu_seqlens_q": _cu(0, 2, 5)}, ValueError, r"cu_seqlens_q\[-1\] must equal .* q.shape\[0\] = 6"),
        ({"cu_seqlens_k": _cu(0, 2, 7)}, ValueError, r"cu_seqlens_k\[-1\] must equal .* k.shape\[0\] = 6"),
        ({"cu_seqlens_k": _cu(0, 6)}, ValueError, "cu_seqlens_k must have cu_seqlens_q's shape"),
        ({"cu_seqlens_k": torch.tensor([0, 3, 6])}, TypeError, "cu_seqlens_k must be int32"),
        ({"max_seqlen_q": 3}, ValueError, "max_seqlen_q = 3 is smaller than the longest q sequence"),
        ({"max_seqlen_k": 2, "max_seqlen_q": 4}, ValueError, "max_seqlen_k = 2 is smaller"),
        ({"max_seqlen_q": -1}, ValueError, "max_seqlen_q must be an int >= 0"),
        ({"max_seqlen_k": 4.0}, TypeError, "max_seqlen_k must be an int"),
    ],
)
def test_bad_varlen_raise(kwargs, exc, match):
    q, k, v, cu = _packed()
    with pytest.raises(exc, match=match):
        attention(q, k, v, **({"cu_seqlens_q": cu, "impl": "torch"} | kwargs))


def test_varlen_needs_3d_tensors():
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match=r"k must have shape \[T, H, Dh\] \(varlen layout\)"):
        attention(q, k[None], v[None], cu_seqlens_q=cu, impl="torch")


def test_cu_seqlens_q_reused_for_k_is_named():
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match=r"cu_seqlens_q \(used for k too\)\[-1\] must equal .* k.shape\[0\] = 5"):
        attention(q, k[:5], v[:5], cu_seqlens_q=cu, impl="torch")


@needs_triton
def test_triton_unsupported_input_raises():
    q = torch.randn(1, 4, 1, 256)
    with pytest.raises(ValueError, match="head dims <= 128, got q head dim 256"):
        attention(q, q, q, impl="triton")
    q = torch.randn(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        attention(q, q, q, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_mixed_devices_raise():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k is on"):
        attention(q.cuda(), k, v.cuda())
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match="cu_seqlens_q is on"):
        attention(q.cuda(), k.cuda(), v.cuda(), cu_seqlens_q=cu)


# --- CUDA: model-sized shapes ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_concept_transformer_shape_cuda(path, dtype, head_dim):
    """Documents of 1,000 sentences, 16 heads, causal: the concept transformer's attention."""
    q, k, v = _qkv((2, 1000, 16, head_dim), (2, 1000, 16, head_dim))
    _check("cuda", path, dtype, q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_packed_decoder_shape_cuda(path, dtype):
    """500 packed sentences of 1..60 tokens (mean ~15), 16 heads, head dim 64, causal."""
    g = torch.Generator().manual_seed(0)
    lens = (torch.randn(500, generator=g) * 8 + 15).round().clamp(1, 60).long()
    lens[0], lens[1] = 1, 60
    cu = cu_seqlens_from_lengths(lens)
    total = int(lens.sum())
    q, k, v = _qkv((total, 16, 64), (total, 16, 64))
    _check("cuda", path, dtype, q, k, v, causal=True, cu_seqlens_q=cu, max_seqlen_q=60, max_seqlen_k=60)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv((1, 6, 2, 16), (1, 6, 2, 16))
    want = attention_ref(q, k, v, softmax_scale=1 / math.sqrt(16))
    torch.testing.assert_close(attention(q, k, v, impl="reference"), want)
