"""The wide linear layers of an incremental decoding step, in output-feature chunks on CPU.

A decoding step multiplies a few rows (B hypotheses: 1 to a few hundred) by a wide weight: the
vocabulary projection ([V, D], 256,206 x 1,024 for the released decoder) and the FFN's inner
projection ([8,192, 1,024]). On CPU, one ``x @ W.T`` over the whole weight is slow at these row
counts: measured with torch's MKL sgemm on a 2-core AMD EPYC, one thread, float32, splitting the
output features into 1,024-wide slices, each written into its slice of the output, made the
released vocabulary projection 1.6-1.7x faster at B = 5-64, the 32,000 x 512 one 1.1-1.25x faster
at B = 5-128 (1.04x at 256), and the released FFN's inner projection 1.26-1.45x faster at
B = 5-64; it was neutral at B = 1, gained nothing for weights of fewer than 4,096 rows, and
stopped paying at B = 256-320 for the 32,000 x 512 weight (7% slower at 320 rows with two
threads) but not for the released 1 GiB one (1.31x at 320 rows, 1.09x at 1,280). Hence the
row limit: 256, or 1,280 for a weight of at least 256 MiB (bench/RESULTS.md, issue 28;
``pytest bench/bench_sonar_inference.py --benchmark --bench-size full -k step_linear``).

Each output element is the same dot product over the same row of W, so the result is the full
product's up to the BLAS's choice of kernel per shape (bitwise equal on the machine measured);
tests/sonarllm/test_step_linear.py checks it against the plain product at float32 rounding.
Other devices and dtypes take the plain product: nothing else was measured.

Shape legend: B = rows (hypotheses), D = input features, O = output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

CHUNK = 1024  # output features per slice
MIN_FEATURES = 4096  # narrower weights gain nothing from slicing
ROWS = (2, 256)  # row counts where slicing was faster (inclusive)
LARGE_WEIGHT_BYTES = 256 * 2**20  # a weight this large (the released vocabulary projection) ...
LARGE_WEIGHT_MAX_ROWS = 1280  # ... was faster sliced up to this many rows


def sliced(x_BD: torch.Tensor, weight_OD: torch.Tensor, bias_O: torch.Tensor | None = None) -> bool:
    """Whether ``step_linear`` slices this product: a [B, D] input, a [O, D] weight and a [O]
    bias (or none), all float32 on CPU, rows and width as measured, and nothing that an in-place
    write into the output would break: no gradient to record, no forward-mode tangent, no CPU
    autocast (which would have cast ``F.linear``'s result)."""
    if x_BD.dim() != 2 or weight_OD.dim() != 2 or (bias_O is not None and bias_O.shape != weight_OD.shape[:1]):
        return False
    tensors = [t for t in (x_BD, weight_OD, bias_O) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu") or any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return False
    rows, features = x_BD.shape[0], weight_OD.shape[0]
    large = weight_OD.numel() * weight_OD.element_size() >= LARGE_WEIGHT_BYTES
    return ROWS[0] <= rows <= (LARGE_WEIGHT_MAX_ROWS if large else ROWS[1]) and features >= MIN_FEATURES


def step_linear(x_BD: torch.Tensor, weight_OD: torch.Tensor,
                bias_O: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``F.linear(x_BD, weight_OD, bias_O)`` [B, O], computed in 1,024-feature slices where
    that was measured to be faster (see the module docstring), plainly elsewhere."""
    if not sliced(x_BD, weight_OD, bias_O):
        return F.linear(x_BD, weight_OD, bias_O)
    out_BO = x_BD.new_empty(x_BD.shape[0], weight_OD.shape[0])
    for start in range(0, weight_OD.shape[0], CHUNK):
        stop = start + CHUNK
        if bias_O is None:
            torch.mm(x_BD, weight_OD[start:stop].t(), out=out_BO[:, start:stop])
        else:
            torch.addmm(bias_O[start:stop], x_BD, weight_OD[start:stop].t(), out=out_BO[:, start:stop])
    return out_BO
