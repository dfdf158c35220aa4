"""Fused kernels for SONAR-LLM, usable on their own: ``from sonarllm_kernels import fused_linear_cross_entropy``
(or ``linear_cross_entropy``, a drop-in for ``torch.nn.functional.linear_cross_entropy``).

Every kernel has a Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``), a PyTorch path and
a plain reference path, chosen by ``impl=`` (see ``sonarllm_kernels._dispatch``). This package never
imports ``sonarllm`` or ``training`` (the ``python -m training.warmup`` command builds a training run's
workload and hands it to ``sonarllm_kernels.warmup``).

``SONARLLM_COMPILE_LOG=FILE`` logs every Triton compilation of the process to FILE (sonarllm_kernels.warmup).
"""

import os as _os

from sonarllm_kernels._dispatch import KernelImpl
from sonarllm_kernels.attention import attention, cu_seqlens_from_lengths
from sonarllm_kernels.attention.reference import attention_ref
from sonarllm_kernels.embedding_projection import FusedEmbeddingProjection, fused_embedding_projection
from sonarllm_kernels.embedding_projection.reference import fused_embedding_projection_ref
from sonarllm_kernels.fused_linear_cross_entropy import FusedLinearCrossEntropy, fused_linear_cross_entropy
from sonarllm_kernels.fused_linear_cross_entropy.torch_compat import linear_cross_entropy
from sonarllm_kernels.fused_linear_cross_entropy.reference import fused_linear_cross_entropy_ref

if _os.environ.get("SONARLLM_COMPILE_LOG"):
    from sonarllm_kernels.warmup import log_compilations

    log_compilations(_os.environ["SONARLLM_COMPILE_LOG"])

__all__ = [
    "KernelImpl",
    "attention",
    "attention_ref",
    "cu_seqlens_from_lengths",
    "FusedEmbeddingProjection",
    "FusedLinearCrossEntropy",
    "fused_embedding_projection",
    "fused_embedding_projection_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "linear_cross_entropy",
]
