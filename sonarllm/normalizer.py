"""The SONAR normalizer of the Large Concept Model: per-dimension centering and scaling.

SONAR embeddings are tiny and unevenly spread (per-dimension std ~ 0.006, L2 norm ~ 0.2; see
docs/sonar-llm.md §1, §9). The LCM baselines regress them in a normalized space::

    normalize(x)   = (x - center) / scale
    denormalize(y) = y * scale + center

with ``center`` and ``scale`` fitted once on a sample of training embeddings and then frozen
(buffers, saved in the state dict). Fit methods:

* ``"robust"`` (default): what LCM's ``gaussian_robust`` means to do, scikit-learn's
  ``RobustScaler(unit_variance=True)`` with the interquartile range: ``center`` = median,
  ``scale`` = IQR / (Phi^-1(0.75) - Phi^-1(0.25)) = IQR / 1.349, the standard deviation a normal
  distribution with that IQR would have;
* ``"lcm_percentile"``: what LCM's code computes. It passes ``quantile_range=(0.25, 0.75)`` to
  ``RobustScaler``, which reads them as *percentiles*, so the range is from the 0.25th to the
  0.75th percentile (quantiles 0.0025 and 0.0075, both in the lower tail) and the unit-variance
  factor is Phi^-1(0.0075) - Phi^-1(0.0025) = 0.3747: ``scale`` = (P0.75 - P0.25) / 0.3747. On a
  normal distribution both give its standard deviation; on heavy-tailed or skewed data they do
  not (issue 22 measured 5.6x and 0.13x). Use it to reproduce a normalizer fitted by LCM;
* ``"standard"``: ``StandardScaler``, mean and population (ddof 0) standard deviation.

Quantiles interpolate linearly between order statistics (numpy's default), in float64. Scales
below ``min_scale`` (a constant dimension) are raised to it, so normalization never divides by
zero (scikit-learn sets such a scale to 1 instead).

Clipping (LCM's ``clip_proba``): optional ``clip_min`` / ``clip_max`` [E] bounds in the
*normalized* space. ``fit(..., clip_proba=p)`` sets them to the p and 1 - p quantiles of the
normalized sample, as LCM does; ``normalize`` clamps its result to them and ``denormalize`` clamps
its input to them before scaling back, exactly as LCM's ``SonarNormalizer``.

Files: ``save(path)`` writes LCM's format, ``torch.save({"model": state_dict})`` with the state
dict ``center``, ``scale`` (and ``clip_min``, ``clip_max`` when clipping), float32, which LCM's
``sonar_normalizer`` model loader reads; ``SonarNormalizer.load(path)`` reads that format (LCM's
``scripts/fit_embedding_normalizer.py`` also stores ``dataset_mixture`` beside ``model``: ignored)
and a bare state dict (``torch.save(normalizer.state_dict(), path)``).

Inside ``sonarllm.SonarLLM`` the normalizer is fused into the input and output projections
(``sonarllm_kernels.fused_embedding_projection``); this module fits it, and applies it on its own (for
targets, or offline).

Shape legend: N = embeddings, E = SONAR dim.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from statistics import NormalDist

import torch
from torch import nn

METHODS = ("robust", "standard", "lcm_percentile")
# Phi^-1(0.75) - Phi^-1(0.25): the IQR of a standard normal distribution (sklearn's unit_variance).
NORMAL_IQR = NormalDist().inv_cdf(0.75) - NormalDist().inv_cdf(0.25)  # 1.3489795003921634
# LCM's quantile_range=(0.25, 0.75) as scikit-learn reads it: percentiles, i.e. these quantiles.
LCM_QUANTILES = (0.0025, 0.0075)
# sklearn's unit_variance factor for them: Phi^-1(0.0075) - Phi^-1(0.0025) = 0.37465...
LCM_NORMAL_RANGE = NormalDist().inv_cdf(LCM_QUANTILES[1]) - NormalDist().inv_cdf(LCM_QUANTILES[0])
CLIP_KEYS = ("clip_min", "clip_max")


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

    Buffers (float32, persistent): ``center`` [E], ``scale`` [E]; ``clip_min``, ``clip_max`` [E]
    (normalized space) once clipping is set (``fit(clip_proba=...)``, ``set_clip_``, a loaded file),
    None before.
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
        self.register_buffer("clip_min", None)
        self.register_buffer("clip_max", None)

    @property
    def clips(self) -> bool:
        """Whether normalize/denormalize clamp to ``clip_min`` / ``clip_max``."""
        return self.clip_min is not None

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

    def _check_vector(self, name: str, t: torch.Tensor) -> None:
        """Raise naming ``name`` unless ``t`` is a float tensor of shape [E]."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (self.dim,):
            raise ValueError(f"{name} must have shape ({self.dim},), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")

    def _check_values(self, center: torch.Tensor, scale: torch.Tensor, prefix: str = "") -> None:
        """Raise naming ``{prefix}center`` / ``{prefix}scale`` unless both are valid [E] tensors."""
        for name, t in ((prefix + "center", center), (prefix + "scale", scale)):
            self._check_vector(name, t)
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

    def _check_clip(self, clip_min: torch.Tensor, clip_max: torch.Tensor, prefix: str = "") -> None:
        """Raise naming ``{prefix}clip_min`` / ``{prefix}clip_max`` unless both are valid [E]
        float tensors, finite, with clip_min <= clip_max."""
        for name, t in ((prefix + "clip_min", clip_min), (prefix + "clip_max", clip_max)):
            self._check_vector(name, t)
            if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite in every dimension")
        if clip_min.device.type != "meta" and bool((clip_min > clip_max.to(clip_min.device)).any()):
            raise ValueError(f"{prefix}clip_min must be <= {prefix}clip_max in every dimension")

    @torch.no_grad()
    def set_clip_(self, clip_min: torch.Tensor | None, clip_max: torch.Tensor | None) -> SonarNormalizer:
        """Install clipping bounds [E] in the normalized space (float32 copies), or remove them
        with ``None, None``. Returns self."""
        if clip_min is None and clip_max is None:
            self.clip_min = self.clip_max = None
            return self
        if clip_min is None or clip_max is None:
            raise ValueError("clip_min and clip_max must both be tensors [E] or both be None")
        self._check_clip(clip_min, clip_max)
        self.clip_min = clip_min.detach().to(self.center.device, torch.float32).clone()
        self.clip_max = clip_max.detach().to(self.center.device, torch.float32).clone()
        return self

    @torch.no_grad()
    def fit(
        self, embeddings: torch.Tensor, method: str = "robust", *, chunk_size: int = 256,
        clip_proba: float | None = None,
    ) -> SonarNormalizer:  # fmt: skip
        """Fit ``center`` and ``scale`` on ``embeddings`` [N, E] (N >= 2). Returns self.

        Args:
            embeddings: [N, E] float sample of training embeddings (any device); all finite.
            method: "robust" (median, IQR / 1.349), "lcm_percentile" (median,
                (P0.75 - P0.25) / 0.3747: LCM's actual fit, see the module docstring) or
                "standard" (mean, std).
            chunk_size: dimensions processed at a time (bounds the float64 working copy).
            clip_proba: None (no clipping; clears any bounds) or p in (0, 0.5): ``clip_min`` /
                ``clip_max`` = the p / 1 - p quantiles of the normalized sample (LCM's ``clip_proba``,
                1e-4 in its "clipping" architecture).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if clip_proba is not None and (
            isinstance(clip_proba, bool) or not isinstance(clip_proba, (int, float)) or not 0 < clip_proba < 0.5
        ):
            raise ValueError(f"clip_proba must be None or a number in (0, 0.5), got {clip_proba!r}")
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
        centers, scales, clips = [], [], []
        for start in range(0, self.dim, chunk_size):
            x_NC = embeddings[:, start : start + chunk_size].to(torch.float64)
            if method == "robust":
                q25, q50, q75 = _quantiles_linear(x_NC, (0.25, 0.5, 0.75))
                center_C, scale_C = q50, (q75 - q25) / NORMAL_IQR
            elif method == "lcm_percentile":
                lo, q50, hi = _quantiles_linear(x_NC, (LCM_QUANTILES[0], 0.5, LCM_QUANTILES[1]))
                center_C, scale_C = q50, (hi - lo) / LCM_NORMAL_RANGE
            else:
                center_C, scale_C = x_NC.mean(dim=0), x_NC.std(dim=0, correction=0)
            scale_C = scale_C.clamp_min(self.min_scale)
            centers.append(center_C)
            scales.append(scale_C)
            if clip_proba is not None:
                clips.append(_quantiles_linear((x_NC - center_C) / scale_C, (clip_proba, 1.0 - clip_proba)))
        self.set_(torch.cat(centers), torch.cat(scales))
        if clip_proba is None:
            return self.set_clip_(None, None)
        clip_min, clip_max = torch.cat(clips, dim=1)
        return self.set_clip_(clip_min, clip_max)

    # -- application -----------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [..., {self.dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")

    def _clamp(self, y: torch.Tensor) -> torch.Tensor:
        if self.clip_min is None:
            return y
        return torch.clamp(y, min=self.clip_min.to(y.dtype), max=self.clip_max.to(y.dtype))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - center) / scale over the last dimension [..., E], then clamped to
        [clip_min, clip_max] when clipping; computed in float32 (or float64), returned in x's dtype."""
        self._check_input(x, "x")
        acc = torch.promote_types(x.dtype, torch.float32)
        return self._clamp((x.to(acc) - self.center.to(acc)) / self.scale.to(acc)).to(x.dtype)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """y (clamped to [clip_min, clip_max] first when clipping) * scale + center over the last
        dimension [..., E], returned in y's dtype."""
        self._check_input(y, "y")
        acc = torch.promote_types(y.dtype, torch.float32)
        return (self._clamp(y.to(acc)) * self.scale.to(acc) + self.center.to(acc)).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``normalize``."""
        return self.normalize(x)

    # -- state -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the normalizer in LCM's file format, ``{"model": state_dict}`` (see the module
        docstring), atomically. An existing ``path`` is refused unless ``overwrite``. Returns the path."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"path {path} already exists; pass overwrite=True to replace it")
        state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"model": state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, dim: int | None = None, min_scale: float = 1e-6,
        device: torch.device | str | None = None,
    ) -> SonarNormalizer:  # fmt: skip
        """Read a normalizer file: LCM's ``{"model": {center, scale[, clip_min, clip_max]}, ...}``
        or a bare state dict. ``dim`` (optional) is the width it must have. Raises ValueError
        naming the file and what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"normalizer file {path} not found")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors of every kind
            raise ValueError(f"{path} is not a readable torch normalizer file: {exc}") from exc
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        keys = {"center", "scale"} | set(CLIP_KEYS)
        if not isinstance(state, dict) or not {"center", "scale"} <= set(state) or not set(state) <= keys:
            found = sorted(state) if isinstance(state, dict) else type(obj).__name__
            raise ValueError(
                f"{path} is not a SONAR normalizer file: expected LCM's {{'model': {{'center', 'scale'"
                f"[, 'clip_min', 'clip_max']}}}} or those keys at the top level, found {found}"
            )
        center = state["center"]
        if not isinstance(center, torch.Tensor) or center.dim() != 1:
            raise ValueError(f"{path}: center must be a 1-d tensor [E], got {getattr(center, 'shape', type(center).__name__)}")
        if dim is not None and center.shape[0] != dim:
            raise ValueError(f"{path} holds a {center.shape[0]}-d normalizer, expected {dim}-d")
        norm = cls(center.shape[0], min_scale=min_scale, device=device)
        try:
            norm.load_state_dict(state)
        except RuntimeError as exc:  # "Error(s) in loading state_dict for ...:\n\t<msg>\n\t<msg>": one line
            raise ValueError(f"{path}: " + "; ".join(str(exc).split("\n\t")[1:] or [str(exc)])) from exc
        return norm

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
        lo, hi = state_dict.get(prefix + "clip_min"), state_dict.get(prefix + "clip_max")
        if (lo is None) != (hi is None):
            error_msgs.append(f"{prefix}clip_min and {prefix}clip_max must be both present or both absent")
            return
        if lo is not None:
            try:
                self._check_clip(lo, hi, prefix)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
            if self.clip_min is None:  # make the buffers the loaded values copy into
                self.clip_min = torch.zeros_like(self.center)
                self.clip_max = torch.zeros_like(self.center)
        elif self.clip_min is not None:
            self.clip_min = self.clip_max = None  # the loaded normalizer does not clip
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, min_scale={self.min_scale:g}" + (", clipped" if self.clips else "")
