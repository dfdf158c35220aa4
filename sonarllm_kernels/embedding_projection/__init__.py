"""Fused embedding projection: the concept transformer's Linear(E -> D) and Linear(D -> E),
fused with the SONAR normalizer (per-feature ``center``/``scale``, LCM's ``SonarNormalizer``)::

    mode "in":   y = ((x - center) / scale) @ weight.T + bias     (normalize -> project)
    mode "out":  y = (x @ weight.T + bias) * scale + center       (project -> denormalize)

Paths (``impl``, see sonarllm_kernels/_dispatch.py): "reference" (sonarllm_kernels/embedding_projection/reference.py,
the specification), "torch" (the normalizer folded into the weight and bias of one addmm;
mode "in" keeps one subtraction of the center, sonarllm_kernels/embedding_projection/torch_backend.py) and
"triton" (the normalizer applied inside the GEMM, on load or in the epilogue, with float32
accumulation, sonarllm_kernels/embedding_projection/triton_backend.py).
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
from torch import nn

from sonarllm_kernels._dispatch import NO_FLOAT64, KernelImpl, check_impl_name, is_auto, resolve_impl
from sonarllm_kernels.embedding_projection.custom_op import fused_embedding_projection_triton_op
from sonarllm_kernels.embedding_projection.reference import fused_embedding_projection_ref
from sonarllm_kernels.embedding_projection.torch_backend import fused_embedding_projection_torch

MODES = ("in", "out")
# The path impl="auto" takes on CUDA, per mode: "triton" (normalizer inside the GEMM) only where
# bench/bench_fused_embedding_projection.py measures it >= 1.1x faster than nn.Linear +
# elementwise on the H200, else "torch" (cuBLAS addmm with the normalizer folded in).
# bash bench/gpu_suite.sh prints what its measurements imply. Not measured yet: Triton.
AUTO_CUDA_PATHS = {"in": "triton", "out": "triton"}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_args(x, weight, bias, center, scale, mode) -> None:
    """Raise TypeError/ValueError naming the offending argument (checks that need no sync)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("center", center), ("scale", scale)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., in_features], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out_features, in_features], got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [out_features, in_features] with in_features = x.shape[-1] = "
            f"{x.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape [out_features] = ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    if (center is None) != (scale is None):
        raise ValueError("center and scale must be given together (both None: no normalizer)")
    if center is not None:
        size = in_features if mode == "in" else out_features
        side = "in_features" if mode == "in" else "out_features"
        for name, t in (("center", center), ("scale", scale)):
            if t.shape != (size,):
                raise ValueError(f"{name} must have shape [{side}] = ({size},) for mode {mode!r}, got {tuple(t.shape)}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    others = [("weight", weight), ("bias", bias), ("center", center), ("scale", scale)]
    for name, t in others:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _choose_path(impl: str, device: torch.device, dtype: torch.dtype, mode: str) -> str:
    """The concrete path: "triton", "torch" or "reference" (AUTO_CUDA_PATHS for auto on CUDA)."""
    unsupported = NO_FLOAT64 if dtype == torch.float64 else None
    path = resolve_impl(impl, device, "fused_embedding_projection", triton_unsupported=unsupported)
    if path == "triton" and device.type == "cuda" and is_auto(impl):
        path = AUTO_CUDA_PATHS[mode]
    return path


def check_normalizer_values(center: torch.Tensor, scale: torch.Tensor) -> None:
    """Raise ValueError unless every scale is finite and > 0 and every center is finite.

    One host sync (two on failure, for the message).
    """
    center, scale = center.detach(), scale.detach()
    bad_s = ~(torch.isfinite(scale) & (scale > 0))
    bad_c = ~torch.isfinite(center)
    n_bad_s, n_bad_c = torch.stack([bad_s.sum(), bad_c.sum()]).tolist()
    if n_bad_s:
        raise ValueError(
            f"scale must be finite and > 0 in every feature; {n_bad_s} entries are not, "
            f"e.g. {scale[bad_s][:5].tolist()}"
        )
    if n_bad_c:
        raise ValueError(f"center must be finite; {n_bad_c} entries are not, e.g. {center[bad_c][:5].tolist()}")


# Normalizers whose values were checked: (id(center), id(scale)) -> (weakrefs, version counters).
# A frozen buffer is checked (one host sync) on first use only; an in-place change bumps its
# version counter and triggers a new check. Inference-mode tensors have no version counter and
# are checked on every call. Under torch.compile nothing is checked here (a host read would
# break the graph); set_normalizer checked the values it installed.
_CHECKED: dict[tuple[int, int], tuple] = {}


def _check_normalizer_once(center: torch.Tensor, scale: torch.Tensor) -> None:
    if torch.compiler.is_compiling():  # a host read would break the graph; set_normalizer checked them
        return
    key = (id(center), id(scale))
    try:
        versions = (center._version, scale._version)
    except RuntimeError:
        versions = None
    hit = _CHECKED.get(key)
    if versions is not None and hit is not None:
        c_ref, s_ref, seen = hit
        if c_ref() is center and s_ref() is scale and seen == versions:
            return
    check_normalizer_values(center, scale)
    if versions is not None:
        if len(_CHECKED) >= 256:
            _CHECKED.clear()
        _CHECKED[key] = (weakref.ref(center), weakref.ref(scale), versions)


def fused_embedding_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    mode: Literal["in", "out"] = "in",
    impl: KernelImpl = "auto",
) -> torch.Tensor:
    """Linear projection fused with the SONAR normalizer (see the module docstring).

    Args:
        x: [..., in_features] (float32, bfloat16, float16; float64 on "torch"/"reference").
        weight: [out_features, in_features], x's dtype. bias: [out_features] or None.
        center, scale: the normalizer, both [in_features] (mode "in") or both
            [out_features] (mode "out"), any float dtype (float32 recommended), or both None.
            ``scale`` must be finite and > 0, ``center`` finite: checked once per tensor (one
            host sync on first use, again only after an in-place change).
        mode: "in" (normalize, then project) or "out" (project, then denormalize).
        impl: "auto", "triton", "torch" or "reference" (see sonarllm_kernels/_dispatch.py).

    Returns:
        [..., out_features], x's dtype. Gradients flow to every input that requires one
        (x, weight, bias, and center/scale too); a frozen weight costs no weight-gradient work.

    Raises:
        TypeError, ValueError: on bad input, naming the argument.
        RuntimeError: when the requested ``impl`` cannot run here.
    """
    _check_args(x, weight, bias, center, scale, mode)
    path = _choose_path(impl, x.device, x.dtype, mode)
    if center is not None:
        _check_normalizer_once(center, scale)
    if path == "reference":
        return fused_embedding_projection_ref(x, weight, bias, center=center, scale=scale, mode=mode)
    if path == "torch":
        return fused_embedding_projection_torch(x, weight, bias, center, scale, mode)
    return fused_embedding_projection_triton_op(x, weight, bias, center, scale, mode)


class FusedEmbeddingProjection(nn.Module):
    """Drop-in ``nn.Linear(in_features, out_features, bias)`` with an optional SONAR normalizer.

    Parameters ``weight`` [out, in] and ``bias`` [out] are initialised exactly as nn.Linear's
    (same RNG draws). ``set_normalizer(center, scale)`` adds frozen buffers ``center``/``scale``
    of size in_features (mode "in") or out_features (mode "out"), kept in (at least) float32; they are
    saved in the state dict and restored by ``load_state_dict``. Like every module buffer they
    follow ``module.to(dtype)``; call ``set_normalizer`` again after it to keep float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        mode: Literal["in", "out"] = "in",
        impl: KernelImpl = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_impl_name(impl)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("center", None)
        self.register_buffer("scale", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: kaiming-uniform (a = sqrt(5)) weight, uniform bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def normalizer_features(self) -> int:
        """Size of center/scale: in_features for mode "in", out_features for mode "out"."""
        return self.in_features if self.mode == "in" else self.out_features

    def set_normalizer(self, center: torch.Tensor | None, scale: torch.Tensor | None) -> None:
        """Install (or, with None and None, remove) the normalizer; checks its values once."""
        if center is None and scale is None:
            self.center = self.scale = None
            return
        n = self.normalizer_features
        for name, t in (("center", center), ("scale", scale)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) for mode {self.mode!r}, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        like = {"device": self.weight.device}
        center = center.detach().to(dtype=torch.promote_types(center.dtype, torch.float32), copy=True, **like)
        scale = scale.detach().to(dtype=torch.promote_types(scale.dtype, torch.float32), copy=True, **like)
        _check_normalizer_once(center, scale)
        self.center, self.scale = center, scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint with a normalizer loads into a module created without one.
        c, s = state_dict.get(prefix + "center"), state_dict.get(prefix + "scale")
        if self.center is None and c is not None and s is not None:
            self.set_normalizer(c, s)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_embedding_projection(
            x, self.weight, self.bias, center=self.center, scale=self.scale, mode=self.mode, impl=self.impl
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}, "
            f"normalizer={self.center is not None}, impl={self.impl!r}"
        )
