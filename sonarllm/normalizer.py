"""The SONAR normalizer of the Large Concept Model: per-dimension centering and scaling.

SONAR embeddings are tiny and unevenly spread (per-dimension std ~ 0.006, L2 norm ~ 0.2; see
docs/sonar-llm.md §1, §9). The LCM baselines regress them in a normalized space::

    normalize(x)   = (x - center) / scale
    denormalize(y) = y * scale + center

with ``center`` and ``scale`` fitted once on a sample of training embeddings and then frozen
(buffers, saved in the state dict). ``fit(method="robust")`` is LCM's default
``gaussian_robust``, i.e. scikit-learn's ``RobustScaler(unit_variance=True)`` with quantile
range (25, 75): ``center`` = median, ``scale`` = IQR / (Phi^-1(0.75) - Phi^-1(0.25)) = IQR / 1.349,
the standard deviation a normal distribution with that IQR would have. ``method="standard"``
is ``StandardScaler``: mean and population (ddof 0) standard deviation. Quantiles interpolate
linearly between order statistics (numpy's default). Scales below ``min_scale`` (a constant
dimension) are raised to it, so normalization never divides by zero.

Inside ``sonarllm.SonarLLM`` the normalizer is fused into the input and output projections
(``sonarllm_kernels.fused_embedding_projection``); this module fits it, and applies it on its own (for
targets, or offline).

Shape legend: N = embeddings, E = SONAR dim.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import nn

METHODS = ("robust", "standard")
# Phi^-1(0.75) - Phi^-1(0.25): the IQR of a standard normal distribution (sklearn's unit_variance).
NORMAL_IQR = NormalDist().inv_cdf(0.75) - NormalDist().inv_cdf(0.25)  # 1.3489795003921634


def _quantiles_linear(x_NC: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """Column quantiles [len(qs), C] of x [N, C], numpy's "linear" interpolation (float64 math)."""
    n = x_NC.shape[0]
    sorted_NC = torch.sort(x_NC, dim=0).values
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        a, b = sorted_NC[lo], sorted_NC[hi]
        out.append(a + (b - a) * frac)
    return torch.stack(out)


class SonarNormalizer(nn.Module):
    """Per-dimension ``center`` / ``scale`` of SONAR embeddings (identity until fitted).

    Args:
        dim: E, the embedding width (1024 for SONAR).
        min_scale: lower bound applied to every fitted scale (and required of loaded ones).
        device: where the buffers live.

    Buffers (float32, persistent): ``center`` [E], ``scale`` [E].
    """

    def __init__(
        self, dim: int = 1024, *, min_scale: float = 1e-6, device: torch.device | str | None = None
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if (
            isinstance(min_scale, bool)
            or not isinstance(min_scale, (int, float))
            or not (0 < min_scale < math.inf)
        ):
            raise ValueError(f"min_scale must be a finite number > 0, got {min_scale!r}")
        self.dim = dim
        self.min_scale = float(min_scale)
        self.register_buffer("center", torch.zeros(dim, dtype=torch.float32, device=device))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float32, device=device))

    @classmethod
    def from_tensors(
        cls, center: torch.Tensor, scale: torch.Tensor, *, min_scale: float = 1e-6
    ) -> SonarNormalizer:
        """A normalizer with the given (validated) ``center`` and ``scale``, both [E]."""
        if not isinstance(center, torch.Tensor) or center.dim() != 1:
            raise ValueError(
                f"center must be a 1-d tensor [E], got {getattr(center, 'shape', type(center).__name__)}"
            )
        norm = cls(center.shape[0], min_scale=min_scale, device=center.device)
        norm.set_(center, scale)
        return norm

    # -- values ----------------------------------------------------------------------------

    def _check_values(self, center: torch.Tensor, scale: torch.Tensor, prefix: str = "") -> None:
        """Raise naming ``{prefix}center`` / ``{prefix}scale`` unless both are valid [E] tensors."""
        for name, t in ((prefix + "center", center), (prefix + "scale", scale)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != (self.dim,):
                raise ValueError(f"{name} must have shape ({self.dim},), got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if center.device.type == "meta":
            return
        if not bool(torch.isfinite(center).all()):
            raise ValueError(f"{prefix}center must be finite in every dimension")
        bad = ~(torch.isfinite(scale) & (scale >= self.min_scale))
        if bool(bad.any()):
            raise ValueError(
                f"{prefix}scale must be finite and >= min_scale ({self.min_scale:g}) in every dimension; "
                f"{int(bad.sum())} entries are not, e.g. {scale[bad][:5].tolist()}"
            )

    @torch.no_grad()
    def set_(self, center: torch.Tensor, scale: torch.Tensor) -> SonarNormalizer:
        """Install ``center`` and ``scale`` ([E] each; stored as float32 copies). Returns self."""
        self._check_values(center, scale)
        self.center.copy_(center.detach().to(self.center.device, torch.float32))
        self.scale.copy_(scale.detach().to(self.scale.device, torch.float32))
        return self

    @torch.no_grad()
    def fit(
        self, embeddings: torch.Tensor, method: str = "robust", *, chunk_size: int = 256
    ) -> SonarNormalizer:
        """Fit ``center`` and ``scale`` on ``embeddings`` [N, E] (N >= 2). Returns self.

        Args:
            embeddings: [N, E] float sample of training embeddings (any device); all finite.
            method: "robust" (median, IQR / 1.349; LCM's default) or "standard" (mean, std).
            chunk_size: dimensions processed at a time (bounds the float64 working copy).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings must have shape [N, {self.dim}], got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] < 2:
            raise ValueError(
                f"embeddings must hold at least 2 rows to fit a scale, got {embeddings.shape[0]}"
            )
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be a float tensor, got {embeddings.dtype}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings must be finite (found NaN or inf)")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        centers, scales = [], []
        for start in range(0, self.dim, chunk_size):
            x_NC = embeddings[:, start : start + chunk_size].to(torch.float64)
            if method == "robust":
                q25, q50, q75 = _quantiles_linear(x_NC, (0.25, 0.5, 0.75))
                centers.append(q50)
                scales.append((q75 - q25) / NORMAL_IQR)
            else:
                centers.append(x_NC.mean(dim=0))
                scales.append(x_NC.std(dim=0, correction=0))
        center = torch.cat(centers)
        scale = torch.cat(scales).clamp_min(self.min_scale)
        return self.set_(center, scale)

    # -- application -----------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [..., {self.dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - center) / scale over the last dimension [..., E]; computed in float32 (or
        float64), returned in x's dtype."""
        self._check_input(x, "x")
        acc = torch.promote_types(x.dtype, torch.float32)
        return ((x.to(acc) - self.center.to(acc)) / self.scale.to(acc)).to(x.dtype)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """y * scale + center over the last dimension [..., E], returned in y's dtype."""
        self._check_input(y, "y")
        acc = torch.promote_types(y.dtype, torch.float32)
        return (y.to(acc) * self.scale.to(acc) + self.center.to(acc)).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``normalize``."""
        return self.normalize(x)

    # -- state -----------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        c, s = state_dict.get(prefix + "center"), state_dict.get(prefix + "scale")
        if c is not None and s is not None:
            try:
                self._check_values(c, s, prefix)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, min_scale={self.min_scale:g}"
