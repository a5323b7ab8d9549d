"""Tests of optidiff.tasks.toy2d: shapes, seeding, scale, and the mixture's exact denoiser."""

import math

import pytest
import torch

from optidiff.models import GaussianMixtureDenoiser
from optidiff.tasks import toy2d as T


@pytest.mark.parametrize("name", list(T.DATASETS))
def test_shape_dtype_and_finite(name):
    x = T.DATASETS[name](1000, torch.Generator().manual_seed(0))
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert T.DATASETS[name](5, 0, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("name", list(T.DATASETS))
def test_deterministic_by_seed(name):
    a = T.make_data(name, 500, 3)
    assert torch.equal(a, T.make_data(name, 500, 3))
    assert torch.equal(a, T.DATASETS[name](500, torch.Generator().manual_seed(3)))  # int == gen
    assert torch.equal(a, T.DATASETS[name](500, 3))
    assert not torch.equal(a, T.make_data(name, 500, 4))


def test_draws_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for name in T.DATASETS:
        T.make_data(name, 100, 0)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("name", list(T.DATASETS))
def test_roughly_unit_variance(name):
    x = T.make_data(name, 50_000, 1).double()
    assert x.mean(0).abs().max() < 0.05
    var = x.var(0)
    assert ((var > 0.85) & (var < 1.15)).all(), var


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="moons.*swiss_roll, rings, gaussian_mixture"):
        T.get_dataset("moons")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_n(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        T.swiss_roll(bad, 0)


def test_bad_generator():
    with pytest.raises(ValueError, match="generator"):
        T.rings(10, None)


def _mixture_moments(den: GaussianMixtureDenoiser):
    """Mean and covariance of the mixture the denoiser represents (from its own buffers)."""
    w = den.log_weights.exp()
    means = torch.stack([c.mean for c in den.components])
    covs = torch.stack([c.cov for c in den.components])
    mean = (w[:, None] * means).sum(0)
    second = (w[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :], w, means, covs


def test_mixture_denoiser_matches_the_data():
    den = T.gaussian_mixture_denoiser()
    assert isinstance(den, GaussianMixtureDenoiser) and den.input_shape == (2,)
    mean, cov, w, means, covs = _mixture_moments(den)
    # the layout is chosen for mean 0 and covariance I exactly
    assert torch.allclose(mean, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cov, torch.eye(2, dtype=torch.float64), atol=1e-12)
    n = 200_000
    x = T.gaussian_mixture(n, 7, dtype=torch.float64)
    se = math.sqrt(2 / n)  # Monte-Carlo standard error of a unit-variance moment
    assert (x.mean(0) - mean).abs().max() < 5 * se
    assert (torch.cov(x.T) - cov).abs().max() < 5 * se * 2
    # per component: nearest-mean assignment (components are 14 std apart) gives the weights and
    # each component's covariance
    k = torch.cdist(x, means).argmin(1)
    for j in range(len(w)):
        xj = x[k == j]
        assert abs(len(xj) / n - w[j].item()) < 5 * math.sqrt(w[j] * (1 - w[j]) / n)
        assert torch.allclose(xj.mean(0), means[j], atol=0.01)
        assert torch.allclose(torch.cov(xj.T), covs[j], atol=0.01 * 0.5)


def test_mixture_denoiser_at_tiny_sigma_returns_the_point():
    """Near σ = 0 the exact posterior mean of a non-degenerate mixture is the noisy point itself
    (x0_hat − x = O(σ²)): ties the denoiser to the same component covariances as the data."""
    den = T.gaussian_mixture_denoiser()
    x = T.gaussian_mixture(100, 0, dtype=torch.float64)
    sigma = torch.tensor(1e-3, dtype=torch.float64)
    x0 = x - sigma * den(x, sigma)
    assert (x0 - x).abs().max() < 1e-3
