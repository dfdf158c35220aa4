"""The SONAR normalizer (sonarllm.normalizer): fits against numpy, application, state.

Shape legend: N embeddings, E SONAR dim.
"""

from __future__ import annotations

import io
from statistics import NormalDist

import numpy as np
import pytest
import torch

from sonarllm.normalizer import NORMAL_IQR, SonarNormalizer


def sample(n=1001, e=24, seed=0):
    """Heavy-tailed, shifted, per-dimension-scaled embeddings (float64), like SONAR's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(3.0).sample((n, e)).to(torch.float64)
    return x * (
        0.002 + 0.01 * torch.rand(e, generator=g, dtype=torch.float64)
    ) + 0.003 * torch.randn(e, generator=g, dtype=torch.float64)


def test_normal_iqr_constant():
    assert NORMAL_IQR == pytest.approx(2 * NormalDist().inv_cdf(0.75), rel=1e-15)
    assert NORMAL_IQR == pytest.approx(1.3489795003921634, rel=1e-15)


@pytest.mark.parametrize("n", [2, 5, 1001])
def test_robust_fit_matches_numpy_quantiles(n):
    x_NE = sample(n)
    norm = SonarNormalizer(24).fit(x_NE, chunk_size=7)  # chunks that do not divide E
    q25, q50, q75 = np.quantile(x_NE.numpy(), [0.25, 0.5, 0.75], axis=0)  # numpy's "linear"
    np.testing.assert_allclose(
        norm.center.numpy(), np.median(x_NE.numpy(), axis=0), rtol=1e-6, atol=1e-12
    )
    np.testing.assert_allclose(norm.center.numpy(), q50, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(norm.scale.numpy(), (q75 - q25) / 1.3489795003921634, rtol=1e-6)
    assert norm.center.dtype == norm.scale.dtype == torch.float32


def test_standard_fit_matches_numpy():
    x_NE = sample().to(torch.float32)
    norm = SonarNormalizer(24).fit(x_NE, method="standard")
    x = x_NE.double().numpy()
    np.testing.assert_allclose(norm.center.numpy(), x.mean(axis=0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(norm.scale.numpy(), x.std(axis=0, ddof=0), rtol=1e-6)


def test_constant_dimension_is_clipped_away_from_zero():
    x_NE = sample(50, 4)
    x_NE[:, 2] = 0.25
    norm = SonarNormalizer(4, min_scale=1e-4).fit(x_NE)
    assert norm.scale[2] == pytest.approx(1e-4) and norm.center[2] == pytest.approx(0.25)
    assert torch.isfinite(norm.normalize(x_NE.float())).all()


def test_normalize_denormalize_round_trip_and_dtypes():
    data = sample()
    norm = SonarNormalizer(24).fit(data)
    x = sample(7).float()
    y = norm.normalize(x)
    torch.testing.assert_close(y, (x - norm.center) / norm.scale)
    torch.testing.assert_close(norm.denormalize(y), x, rtol=1e-5, atol=1e-7)
    assert torch.equal(norm(x), y)
    # the normalized fitting sample has median 0 and IQR 1.349 (a unit-variance normal's)
    z = norm.normalize(data.float()).double().numpy()
    q25, q50, q75 = np.quantile(z, [0.25, 0.5, 0.75], axis=0)
    np.testing.assert_allclose(q50, 0, atol=1e-5)
    np.testing.assert_allclose(q75 - q25, NORMAL_IQR, rtol=1e-5)
    half = norm.normalize(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), y, rtol=1e-2, atol=1e-2)


def test_state_dict_round_trip_and_validation():
    norm = SonarNormalizer(24).fit(sample())
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    buf.seek(0)
    other = SonarNormalizer(24)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.center, norm.center) and torch.equal(other.scale, norm.scale)
    assert SonarNormalizer.from_tensors(norm.center, norm.scale).scale.equal(norm.scale)

    bad = {"center": norm.center, "scale": norm.scale.clone()}
    bad["scale"][3] = 0.0
    with pytest.raises(RuntimeError, match="scale must be finite and >= min_scale"):
        SonarNormalizer(24).load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r"center must have shape \(24,\)"):
        SonarNormalizer(24).load_state_dict({"center": torch.zeros(5), "scale": torch.ones(5)})
    # nested in a parent module, the error names the full key
    parent = torch.nn.Module()
    parent.normalizer = SonarNormalizer(24)
    with pytest.raises(RuntimeError, match=r"normalizer\.scale must be finite"):
        parent.load_state_dict({"normalizer.center": norm.center, "normalizer.scale": bad["scale"]})


def test_validation_errors_name_the_argument():
    norm = SonarNormalizer(4)
    with pytest.raises(ValueError, match="method must be one of"):
        norm.fit(torch.randn(10, 4), method="minmax")
    with pytest.raises(ValueError, match=r"embeddings must have shape \[N, 4\]"):
        norm.fit(torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        norm.fit(torch.randn(1, 4))
    with pytest.raises(ValueError, match="embeddings must be finite"):
        norm.fit(torch.tensor([[0.0, 1.0, float("nan"), 2.0]] * 3))
    with pytest.raises(TypeError, match="embeddings must be a float tensor"):
        norm.fit(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_size"):
        norm.fit(torch.randn(3, 4), chunk_size=0)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 4\]"):
        norm.normalize(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"y must have shape \[\.\.\., 4\]"):
        norm.denormalize(torch.randn(3))
    with pytest.raises(ValueError, match="dim must be a positive int"):
        SonarNormalizer(0)
    with pytest.raises(ValueError, match="min_scale"):
        SonarNormalizer(4, min_scale=0.0)
    with pytest.raises(ValueError, match="scale must be finite and >= min_scale"):
        SonarNormalizer.from_tensors(torch.zeros(4), -torch.ones(4))
    with pytest.raises(ValueError, match="center must be finite"):
        SonarNormalizer.from_tensors(torch.full((4,), float("inf")), torch.ones(4))
