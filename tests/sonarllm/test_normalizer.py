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


# --- LCM: the percentile fit, clipping and the file format -------------------------------------


def skewed(n=2001, e=6, seed=1):
    """Log-normal (skewed) columns: where LCM's percentile range and the IQR disagree most."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, e, generator=g, dtype=torch.float64)) * 0.004


@pytest.mark.parametrize("data", [sample, skewed], ids=["heavy_tailed", "skewed"])
def test_lcm_percentile_fit_reproduces_lcms_robustscaler_call(data):
    """LCM calls RobustScaler(quantile_range=(0.25, 0.75), unit_variance=True), which scikit-learn
    reads as percentiles: numpy's percentile at 0.25 and 0.75 (float64), divided by the unit-normal
    distance between those percentiles (scipy's norm.ppf(0.0075) - norm.ppf(0.0025) = 0.3747)."""
    x_NE = data()
    x = x_NE.numpy()
    lo, hi = np.percentile(x, [0.25, 0.75], axis=0)
    adjust = NormalDist().inv_cdf(0.75 / 100.0) - NormalDist().inv_cdf(0.25 / 100.0)
    assert adjust == pytest.approx(0.3746547, rel=1e-6)
    norm = SonarNormalizer(x.shape[1]).fit(x_NE, method="lcm_percentile", chunk_size=4)
    np.testing.assert_allclose(norm.center.numpy(), np.median(x, axis=0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(norm.scale.numpy(), (hi - lo) / adjust, rtol=1e-6)
    # ... which is not the true-IQR default on such data
    robust = SonarNormalizer(x.shape[1]).fit(x_NE)
    assert not np.allclose(norm.scale.numpy(), robust.scale.numpy(), rtol=0.1)


def test_fit_with_clip_proba_sets_lcms_bounds_in_the_normalized_space():
    x_NE = sample(2000, 5)
    norm = SonarNormalizer(5).fit(x_NE, clip_proba=0.01)
    z = ((x_NE.numpy() - np.median(x_NE.numpy(), axis=0)) / norm.scale.double().numpy())
    np.testing.assert_allclose(norm.clip_min.numpy(), np.quantile(z, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(norm.clip_max.numpy(), np.quantile(z, 0.99, axis=0), rtol=1e-5)
    assert SonarNormalizer(5).fit(x_NE).clip_min is None
    assert norm.fit(x_NE).clip_min is None and "clip_min" not in norm.state_dict()  # refit without: cleared


def test_clipping_is_honoured_as_lcm_does():
    """LCM: normalize = clamp((x - center) / scale); denormalize = clamp(y) * scale + center."""
    center, scale = torch.tensor([0.1, -0.2, 0.0]), torch.tensor([0.5, 2.0, 1.0])
    lo, hi = torch.tensor([-1.0, -0.5, -3.0]), torch.tensor([1.0, 0.25, 3.0])
    norm = SonarNormalizer.from_tensors(center, scale).set_clip_(lo, hi)
    x = torch.tensor([[2.0, -5.0, 1.0], [0.1, -0.2, 0.5]])
    want = torch.tensor([[1.0, -0.5, 1.0], [0.0, 0.0, 0.5]])  # (x - c) / s = [3.8, -2.4, 1], [0, 0, .5], clamped
    torch.testing.assert_close(norm.normalize(x), want)
    y = torch.tensor([[5.0, 5.0, 5.0]])
    torch.testing.assert_close(norm.denormalize(y), torch.tensor([[0.1 + 0.5, -0.2 + 0.5, 3.0]]))
    with pytest.raises(ValueError, match="clip_min must be <= clip_max"):
        SonarNormalizer(3).set_clip_(hi, lo)
    with pytest.raises(ValueError, match="both be tensors"):
        SonarNormalizer(3).set_clip_(lo, None)


def _lcm_file(path, center, scale, clip=None):
    """A normalizer file as LCM's scripts/fit_embedding_normalizer.py writes it."""
    from collections import OrderedDict

    state = OrderedDict(center=center, scale=scale)
    if clip is not None:
        state.update(clip_min=clip[0], clip_max=clip[1])
    torch.save({"model": state, "dataset_mixture": ["wiki:5", "books:1"]}, path)


def test_lcm_normalizer_files_load_with_and_without_clipping(tmp_path):
    center, scale = torch.randn(8) * 1e-3, torch.rand(8) * 0.01 + 0.001
    _lcm_file(tmp_path / "plain.pt", center, scale)
    norm = SonarNormalizer.load(tmp_path / "plain.pt", dim=8)
    assert torch.equal(norm.center, center) and torch.equal(norm.scale, scale) and not norm.clips
    clip = (-torch.rand(8) - 2, torch.rand(8) + 2)
    _lcm_file(tmp_path / "clipped.pt", center, scale, clip)
    norm = SonarNormalizer.load(tmp_path / "clipped.pt")
    assert torch.equal(norm.clip_min, clip[0]) and torch.equal(norm.clip_max, clip[1])
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm.normalize(x), torch.clamp((x - center) / scale, clip[0], clip[1]))
    torch.save({"center": center, "scale": scale}, tmp_path / "bare.pt")  # a bare state dict
    assert torch.equal(SonarNormalizer.load(tmp_path / "bare.pt").scale, scale)


def test_save_writes_lcms_format_and_round_trips(tmp_path):
    norm = SonarNormalizer(24).fit(sample(), method="lcm_percentile", clip_proba=1e-3)
    path = norm.save(tmp_path / "norm.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"} and set(raw["model"]) == {"center", "scale", "clip_min", "clip_max"}
    assert all(v.dtype == torch.float32 and v.shape == (24,) for v in raw["model"].values())
    back = SonarNormalizer.load(path, dim=24)
    for key in ("center", "scale", "clip_min", "clip_max"):
        assert torch.equal(getattr(back, key), getattr(norm, key))
    with pytest.raises(FileExistsError, match="already exists"):
        norm.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["norm.pt"]  # no temporary left behind
    norm.save(path, overwrite=True)


def test_load_refuses_bad_files_naming_them(tmp_path):
    _lcm_file(tmp_path / "n.pt", torch.zeros(8), torch.ones(8))
    with pytest.raises(ValueError, match=r"n\.pt holds a 8-d normalizer, expected 16-d"):
        SonarNormalizer.load(tmp_path / "n.pt", dim=16)
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"w\.pt is not a SONAR normalizer file.*found \['weight'\]"):
        SonarNormalizer.load(tmp_path / "w.pt")
    _lcm_file(tmp_path / "z.pt", torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"z\.pt: .*scale must be finite and >= min_scale"):
        SonarNormalizer.load(tmp_path / "z.pt")
    torch.save({"model": {"center": torch.zeros(8), "scale": torch.ones(8), "clip_min": torch.zeros(8)}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="clip_min and clip_max must be both present"):
        SonarNormalizer.load(tmp_path / "c.pt")
    (tmp_path / "t.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"t\.pt is not a readable torch normalizer file"):
        SonarNormalizer.load(tmp_path / "t.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        SonarNormalizer.load(tmp_path / "missing.pt")


def test_the_model_refuses_a_clipping_normalizer_it_could_not_honour():
    from sonarllm import SonarLLM, SonarLLMConfig

    cfg = SonarLLMConfig.from_name("toy", use_normalizer=True)
    model = SonarLLM(cfg)
    norm = SonarNormalizer(cfg.sonar_dim).fit(sample(200, cfg.sonar_dim), clip_proba=0.01)
    with pytest.raises(ValueError, match="clip_min/clip_max.*fused projections apply center and scale only"):
        model.set_normalizer(norm)
    model.set_normalizer(norm.set_clip_(None, None))
    assert torch.equal(model.get_normalizer().scale, norm.scale)
