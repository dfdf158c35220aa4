"""The impl dispatch rules, and that `sonarllm_kernels` stands on its own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sonarllm_kernels
from sonarllm_kernels import _dispatch
from sonarllm_kernels._dispatch import resolve_impl

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("SONARLLM_KERNEL_IMPL", raising=False)
    return monkeypatch


def test_explicit_impl_wins_over_environment(clean_env):
    clean_env.setenv("SONARLLM_KERNEL_IMPL", "reference")
    assert resolve_impl("torch", CPU, "op") == "torch"
    assert resolve_impl("auto", CPU, "op") == "reference"


def test_auto_on_cpu(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", CPU, "op") == "torch"
    clean_env.setenv("TRITON_INTERPRET", "1")
    want = "triton" if _dispatch.triton_available() else "torch"
    assert resolve_impl("auto", CPU, "op") == want


def test_auto_on_cuda_without_triton_warns_and_uses_torch(clean_env):
    clean_env.setattr(_dispatch, "triton_import_error", lambda: "ImportError: no triton")
    _dispatch._warn_no_triton_on_cuda.cache_clear()
    with pytest.warns(RuntimeWarning, match="Triton cannot be imported"):
        assert resolve_impl("auto", torch.device("cuda"), "op") == "torch"


def test_explicit_triton_that_cannot_run_raises(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", CPU, "op")
    clean_env.setattr(_dispatch, "triton_import_error", lambda: "ImportError: no triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        resolve_impl("triton", torch.device("cuda"), "op")


def test_unknown_impl_raises(clean_env):
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", CPU, "op")


def test_sonarllm_kernels_is_this_repository():
    """`sonarllm_kernels` resolves to this checkout (not an installed copy)."""
    assert Path(sonarllm_kernels.__file__).resolve().is_relative_to(REPO)


def test_every_kernel_imports_and_runs_without_triton_and_without_sonarllm():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['sonarllm'] = None\n"
        "import torch, sonarllm_kernels\n"
        "h, w = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4)\n"
        "loss = sonarllm_kernels.fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4, 0]))\n"
        "loss.backward(); assert h.grad is not None\n"
        "q = torch.randn(1, 5, 2, 8, requires_grad=True)\n"
        "sonarllm_kernels.attention(q, q, q).sum().backward(); assert q.grad is not None\n"
        "assert sonarllm_kernels.fused_embedding_projection(h, torch.randn(3, 4)).shape == (5, 3)\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SONARLLM_KERNEL_IMPL"} | {"TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_triton_unsupported_calls_fall_back_or_raise(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", CPU, "op", triton_unsupported="has no float64") == "torch"
    with pytest.raises(TypeError, match="op: impl='triton' has no float64"):
        resolve_impl("triton", CPU, "op", triton_unsupported="has no float64")


def test_attention_only_environment_value_leaves_other_ops_on_auto(clean_env):
    clean_env.setenv("SONARLLM_KERNEL_IMPL", "flash")
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", CPU, "op") == "torch"
    assert resolve_impl("auto", CPU, "attention", extra_impls=("flash",)) == "flash"
