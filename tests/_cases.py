"""The (device, path, dtype) matrix every kernel parity test runs: CPU torch at fp32/bf16, CPU
Triton under the interpreter at fp32 (it has no bf16 arithmetic), and on CUDA both paths at
fp32/bf16/fp16 (marked ``gpu``, skipped without CUDA)."""

import pytest
import torch

from sonarllm_kernels._dispatch import is_interpreter, triton_available

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = triton_available() and (HAS_CUDA or is_interpreter())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton cannot run here (no CUDA and no TRITON_INTERPRET=1)")
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
CUDA_DTYPES = ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))


def device_cases() -> list:
    cases = [
        pytest.param("cpu", "torch", torch.float32, id="cpu-torch-fp32"),
        pytest.param("cpu", "torch", torch.bfloat16, id="cpu-torch-bf16"),
        pytest.param("cpu", "triton", torch.float32, id="cpu-triton-fp32", marks=needs_triton),
    ]
    for dt, name in CUDA_DTYPES:
        for path in ("torch", "triton"):
            cases.append(pytest.param("cuda", path, dt, id=f"cuda-{path}-{name}", marks=needs_cuda))
    return cases
