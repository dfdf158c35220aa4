"""Session-wide test set-up, loaded before any test or benchmark module imports `sonarllm_kernels`.

On a machine without CUDA, Triton kernels can only run through the interpreter, which reads
TRITON_INTERPRET when a kernel is decorated: it is set here, before anything imports the
kernel modules. The CPU suite's default kernel path is then the chunked PyTorch one
(SONARLLM_KERNEL_IMPL=torch), so model and training tests do not crawl through the
interpreter; kernel parity tests ask for impl="triton" explicitly. DeepSpeed is told to use
its CPU accelerator. Nothing is changed on a CUDA machine.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SONARLLM_KERNEL_IMPL", "torch")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
