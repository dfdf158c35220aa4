"""Choosing the implementation path of a kernel call.

Every public kernel takes ``impl``: ``"triton"`` (fused Triton kernels), ``"torch"`` (a
memory-frugal pure-PyTorch path, used on CPU and wherever Triton is missing) or
``"reference"`` (the plain, obviously-correct specification). Precedence:

1. an explicit ``impl`` other than ``"auto"`` wins;
2. then the environment variable ``SONARLLM_KERNEL_IMPL``;
3. then auto-detection: Triton for CUDA tensors; Triton for CPU tensors when the Triton
   interpreter is on (``TRITON_INTERPRET=1``, which must be set before ``sonarllm_kernels`` is
   imported) or while ``sonarllm_kernels.warmup`` records the kernel launches of a run for a GPU
   target (:func:`compile_only`: CPU tensors stand in for CUDA ones, nothing is launched);
   ``"torch"`` otherwise.

An explicit request that cannot run raises; auto-detection never silently downgrades a CUDA
tensor (it warns once if Triton cannot be imported there).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Literal

import torch

KernelImpl = Literal["auto", "triton", "torch", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
OP_SPECIFIC_IMPLS: tuple[str, ...] = ("flash",)  # attention only; other ops read it as "auto"
ENV_VAR = "SONARLLM_KERNEL_IMPL"
NO_FLOAT64 = "supports float32, bfloat16 and float16; use impl='torch' for float64"


# CUDA multiprocessors assumed for CPU tensors standing in for CUDA ones (compile_only): the H200's.
OFFLINE_MULTIPROCESSORS = 132
_compile_only = False


def is_interpreter() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compile_only() -> bool:
    """True while sonarllm_kernels.warmup records launches on CPU tensors for a GPU target: the Triton
    paths then accept CPU tensors and pick their GPU launch settings (nothing runs)."""
    return _compile_only


def set_compile_only(on: bool) -> None:
    """Switch :func:`compile_only` (sonarllm_kernels.warmup does, around a recorded run)."""
    global _compile_only
    _compile_only = bool(on)


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; OFFLINE_MULTIPROCESSORS for CPU tensors that
    stand in for CUDA ones (compile_only), so launch settings match the target GPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return OFFLINE_MULTIPROCESSORS


@functools.cache
def triton_import_error() -> str | None:
    """Why ``import triton`` fails here, or None when it works (cached)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


@torch.compiler.assume_constant_result  # torch.compile: not traced (it imports triton)
def triton_available() -> bool:
    """True when Triton can be imported."""
    return triton_import_error() is None


@functools.cache
def _warn_no_triton_on_cuda(op: str) -> None:
    warnings.warn(
        f"{op}: CUDA tensors but Triton cannot be imported ({triton_import_error()}); "
        "using the chunked PyTorch path. Install triton, or pass impl='torch' to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


def is_auto(impl: str) -> bool:
    """True when the call leaves the path to auto-detection (``impl="auto"`` and no
    SONARLLM_KERNEL_IMPL): only then may an op's measured auto rule (AUTO_CUDA_PATHS) apply."""
    return impl == "auto" and not os.environ.get(ENV_VAR, "").strip()


def check_impl_name(impl: str, source: str = "impl", extra: tuple[str, ...] = ()) -> None:
    """Raise ValueError unless ``impl`` is one of IMPLS (or of an op's ``extra`` paths)."""
    if impl not in IMPLS + extra:
        raise ValueError(f"{source} must be one of {IMPLS + extra}, got {impl!r}")


def resolve_impl(impl: str, device: torch.device, op: str, extra_impls: tuple[str, ...] = (),
                 triton_unsupported: str | None = None) -> str:  # fmt: skip
    """Return the concrete path ("triton", "torch", "reference", or one of ``extra_impls``).

    Args:
        impl: the caller's request, one of IMPLS or ``extra_impls``.
        device: the device of the call's tensors.
        op: the public operation name, used in messages.
        extra_impls: paths only this op has (attention's "flash"); returned as they are, the op
            checks that they can run.
        triton_unsupported: why Triton cannot serve this call (e.g. float64), or None. Auto then
            picks "torch"; an explicit "triton" raises TypeError with this reason.
    """
    check_impl_name(impl, extra=extra_impls)
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            check_impl_name(env, source=f"environment variable {ENV_VAR}", extra=extra_impls + OP_SPECIFIC_IMPLS)
            impl = env if env not in OP_SPECIFIC_IMPLS or env in extra_impls else "auto"
    if impl in extra_impls:
        return impl
    if impl == "triton" and triton_unsupported:
        raise TypeError(f"{op}: impl='triton' {triton_unsupported}")
    if impl == "auto" and triton_unsupported:
        return "torch"
    if impl == "auto":
        if device.type == "cuda":
            if triton_available():
                return "triton"
            _warn_no_triton_on_cuda(op)
            return "torch"
        if device.type == "cpu" and (is_interpreter() or compile_only()) and triton_available():
            return "triton"
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' but Triton cannot be imported ({triton_import_error()})")
        if device.type == "cpu" and not (is_interpreter() or compile_only()):
            raise RuntimeError(
                f"{op}: impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                "in the environment before `sonarllm_kernels` is imported"
            )
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"{op}: impl='triton' does not support device {device}")
    return impl
