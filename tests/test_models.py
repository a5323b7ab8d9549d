"""Exact denoisers against brute-force Bayes, the VP adapter against known Gaussians, the MLP.

Every reference is computed here independently (torch.linalg.solve, MultivariateNormal, explicit
loops over data points, autograd) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import optidiff as od
from optidiff.models import (
    EmpiricalDenoiser,
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    SubspaceGaussianDenoiser,
    TimeMLP,
    VPModel,
    X0Model,
)
from optidiff.models.analytic import SubspaceDenoiser

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_cov(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = _gen(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=F64)
    return a @ a.T + (0.1 * torch.eye(d, dtype=F64) if rank is None else 0)


def _posterior_mean_gauss(x, m, cov, sigma):
    """m + Σ(Σ + σ²I)⁻¹(x − m), one σ per row (sigma: (B,))."""
    d = len(m)
    out = []
    for xi, si in zip(x, sigma):
        sol = torch.linalg.solve(cov + si**2 * torch.eye(d, dtype=F64), xi - m)
        out.append(m + cov @ sol)
    return torch.stack(out)


def _orthonormal(D: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, d, generator=_gen(seed), dtype=F64))
    return q


# --------------------------------------------------------------------------------------------
# GaussianDenoiser
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("singular", [False, True])
def test_gaussian_denoiser_posterior_mean(singular):
    d, B = 4, 6
    m = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    cov = _random_cov(d, 1, rank=2 if singular else None)
    if singular:
        assert torch.linalg.matrix_rank(cov) == 2
    den = GaussianDenoiser(m, cov)
    x = 3 * torch.randn(B, d, generator=_gen(2), dtype=F64)
    # scalar σ (0-d tensor and Python float)
    for s in [0.05, 0.7, 4.0]:
        ref = _posterior_mean_gauss(x, m, cov, torch.full((B,), s, dtype=F64))
        eps = den(x, torch.tensor(s, dtype=F64))
        torch.testing.assert_close(x - s * eps, ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(od.models.x0_hat(den, x, s), ref, rtol=1e-8, atol=1e-8)
    # per-sample σ of shape (B,)
    sig = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 30.0], dtype=F64)
    ref = _posterior_mean_gauss(x, m, cov, sig)
    eps = den(x, sig)
    torch.testing.assert_close(x - sig[:, None] * eps, ref, rtol=1e-8, atol=1e-8)
    assert eps.shape == x.shape and den.input_shape == (d,)


def test_gaussian_denoiser_float32_and_density():
    m = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=F64)
    den = GaussianDenoiser(m, cov)
    x = torch.randn(5, 2, generator=_gen(3), dtype=F64)
    eps32 = den(x.float(), torch.tensor(0.3))
    assert eps32.dtype == torch.float32
    torch.testing.assert_close(eps32.double(), den(x, torch.tensor(0.3, dtype=F64)),
                               rtol=1e-5, atol=1e-5)
    ref = MultivariateNormal(m, cov + 0.09 * torch.eye(2, dtype=F64)).log_prob(x)
    torch.testing.assert_close(den.log_density(x, torch.tensor(0.3, dtype=F64)), ref)


# --------------------------------------------------------------------------------------------
# GaussianMixtureDenoiser
# --------------------------------------------------------------------------------------------

def _mixture():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]], dtype=F64)
    covs = torch.stack([torch.tensor([[1.0, 0.3], [0.3, 0.5]]), torch.tensor([[0.6, -0.2], [-0.2, 0.8]]),
                        torch.tensor([[0.4, 0.0], [0.0, 0.0]])]).to(F64)  # the last is singular
    return w, means, covs


def _posterior_mean_mixture(x, w, means, covs, sigma):
    """Brute-force Bayes, one sample and one σ at a time."""
    d = means.shape[1]
    out, resp = [], []
    for xi, si in zip(x, sigma):
        eye = si**2 * torch.eye(d, dtype=F64)
        logp = torch.stack([math.log(wk) + MultivariateNormal(mk, ck + eye).log_prob(xi)
                            for wk, mk, ck in zip(w.tolist(), means, covs)])
        r = torch.softmax(logp, 0)
        x0k = torch.stack([mk + ck @ torch.linalg.solve(ck + eye, xi - mk)
                           for mk, ck in zip(means, covs)])
        out.append((r[:, None] * x0k).sum(0))
        resp.append(r)
    return torch.stack(out), torch.stack(resp)


def test_mixture_denoiser_brute_force_bayes():
    w, means, covs = _mixture()
    den = GaussianMixtureDenoiser(w, means, covs)
    x = 2.5 * torch.randn(8, 2, generator=_gen(4), dtype=F64)
    for s in [0.05, 0.5, 2.0, 20.0]:
        sig = torch.full((8,), s, dtype=F64)
        ref, resp = _posterior_mean_mixture(x, w, means, covs, sig)
        torch.testing.assert_close(x - s * den(x, torch.tensor(s, dtype=F64)), ref,
                                   rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(den.responsibilities(x, torch.tensor(s, dtype=F64)), resp,
                                   rtol=1e-8, atol=1e-8)
    sig = torch.tensor([0.02, 0.1, 0.3, 0.6, 1.0, 2.0, 5.0, 50.0], dtype=F64)
    ref, _ = _posterior_mean_mixture(x, w, means, covs, sig)
    torch.testing.assert_close(x - sig[:, None] * den(x, sig), ref, rtol=1e-8, atol=1e-8)


def test_mixture_of_one_is_gaussian():
    m = torch.tensor([1.0, 2.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.2], [0.2, 0.3]], dtype=F64)
    x = torch.randn(4, 2, generator=_gen(5), dtype=F64)
    mix = GaussianMixtureDenoiser(torch.ones(1), m[None], cov[None])
    torch.testing.assert_close(mix(x, torch.tensor(0.4)), GaussianDenoiser(m, cov)(x, torch.tensor(0.4)))


# --------------------------------------------------------------------------------------------
# EmpiricalDenoiser
# --------------------------------------------------------------------------------------------

def test_empirical_denoiser_brute_force():
    data = torch.randn(7, 2, 3, generator=_gen(6), dtype=F64)  # (N, *dims) with 2-D dims
    den = EmpiricalDenoiser(data)
    assert den.input_shape == (2, 3)
    x = torch.randn(5, 2, 3, generator=_gen(7), dtype=F64)
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=F64)
    ref = []
    for xb, sb in zip(x, sig):
        logw = torch.tensor([-((xb - xi) ** 2).sum().item() / (2 * sb.item() ** 2) for xi in data],
                            dtype=F64)
        wts = torch.exp(logw - logw.max())
        wts = wts / wts.sum()
        ref.append(sum(wk * xi for wk, xi in zip(wts, data)))
    ref = torch.stack(ref)
    torch.testing.assert_close(x - sig.view(-1, 1, 1) * den(x, sig), ref, rtol=1e-8, atol=1e-8)
    # a scalar σ equals the per-sample σ filled with that value
    s = torch.tensor(0.7, dtype=F64)
    torch.testing.assert_close(den(x, s), den(x, s.expand(5)), rtol=1e-12, atol=1e-12)


def test_empirical_denoiser_small_sigma_snaps_to_nearest_point():
    data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    x = torch.tensor([[0.9, 0.2], [0.1, 0.1], [0.2, 0.7]], dtype=F64)
    x0 = x - 1e-3 * EmpiricalDenoiser(data)(x, torch.tensor(1e-3, dtype=F64))
    torch.testing.assert_close(x0, data[[1, 0, 2]], rtol=0, atol=1e-12)


def test_empirical_denoiser_is_gradient_of_smoothed_distance():
    # Permenter & Yuan (ICML 2024): σ·eps = ½∇ₓ dist²_K(x, σ), dist²_K = −2σ² log Σ exp(−‖x − x_i‖²/2σ²)
    data = torch.randn(9, 3, generator=_gen(8), dtype=F64)
    den = EmpiricalDenoiser(data)
    sig = torch.tensor([0.3, 0.8, 1.5, 4.0], dtype=F64)
    x = torch.randn(4, 3, generator=_gen(9), dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(den.smoothed_sq_dist(x, sig).sum(), x)
    eps = den(x.detach(), sig)
    torch.testing.assert_close(sig[:, None] * eps, 0.5 * grad, rtol=1e-9, atol=1e-10)

    # an independently written softmin formula and its autograd gradient
    def softmin_sq_dist(xx, s):
        d2 = ((xx[:, None, :] - data[None]) ** 2).sum(-1)
        return -2 * s**2 * torch.logsumexp(-d2 / (2 * s[:, None] ** 2), dim=1)

    torch.testing.assert_close(den.smoothed_sq_dist(x, sig), softmin_sq_dist(x, sig),
                               rtol=1e-10, atol=1e-10)
    (grad2,) = torch.autograd.grad(softmin_sq_dist(x, sig).sum(), x)
    torch.testing.assert_close(sig[:, None] * eps, 0.5 * grad2, rtol=1e-9, atol=1e-10)
    # as σ → 0 the smoothed distance tends to the squared distance to the nearest point
    s0 = torch.full((4,), 1e-3, dtype=F64)
    nearest = ((x.detach()[:, None] - data[None]) ** 2).sum(-1).min(1).values
    torch.testing.assert_close(den.smoothed_sq_dist(x.detach(), s0), nearest, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Subspace denoisers
# --------------------------------------------------------------------------------------------

def test_subspace_gaussian_equals_singular_ambient_gaussian_and_score_splits():
    D, d = 5, 2
    A = _orthonormal(D, d, 10)
    mu_u = torch.tensor([0.7, -1.2], dtype=F64)
    cov_u = torch.tensor([[2.0, 0.5], [0.5, 0.4]], dtype=F64)
    sub = SubspaceGaussianDenoiser(A, cov_u, mu_u)
    amb = GaussianDenoiser(A @ mu_u, A @ cov_u @ A.T)
    x = 2 * torch.randn(6, D, generator=_gen(11), dtype=F64)
    sig = torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 10.0], dtype=F64)
    for s in [torch.tensor(0.4, dtype=F64), sig]:
        torch.testing.assert_close(sub(x, s), amb(x, s), rtol=1e-8, atol=1e-8)
        ref = _posterior_mean_gauss(x, A @ mu_u, A @ cov_u @ A.T, s.expand(6))
        torch.testing.assert_close(od.models.x0_hat(sub, x, s), ref, rtol=1e-8, atol=1e-8)

    # the Wang & Chen tutorial decomposition: −eps/σ = A∇log p^u_σ(Aᵀx) − (I − AAᵀ)x/σ², p^u_σ = N(μ_u, Σ_u + σ²I)
    score = -sub(x, sig) / sig[:, None]
    u = x @ A
    grad_u = torch.stack([-torch.linalg.solve(cov_u + si**2 * torch.eye(d, dtype=F64), ui - mu_u)
                          for ui, si in zip(u, sig)])
    off = x - u @ A.T
    torch.testing.assert_close(score, grad_u @ A.T - off / sig[:, None] ** 2, rtol=1e-8, atol=1e-8)
    # the latent score by autograd of the latent log density
    uu = u.clone().requires_grad_(True)
    logp = sum(MultivariateNormal(mu_u, cov_u + si**2 * torch.eye(d, dtype=F64)).log_prob(ui)
               for ui, si in zip(uu, sig))
    (g,) = torch.autograd.grad(logp, uu)
    torch.testing.assert_close(g, grad_u, rtol=1e-8, atol=1e-8)


def test_subspace_gaussian_defaults_are_standard_latent():
    A = _orthonormal(4, 2, 12)
    x = torch.randn(3, 4, generator=_gen(13), dtype=F64)
    ref = GaussianDenoiser(torch.zeros(4, dtype=F64), A @ A.T)
    torch.testing.assert_close(SubspaceGaussianDenoiser(A)(x, torch.tensor(0.6)), ref(x, torch.tensor(0.6)))


def test_subspace_mixture_equals_ambient_singular_mixture():
    D, d = 4, 2
    A = _orthonormal(D, d, 14)
    w, means, covs = _mixture()
    sub = SubspaceDenoiser(A, GaussianMixtureDenoiser(w, means, covs))
    amb_means = means @ A.T
    amb_covs = A @ covs @ A.T  # (K, D, D), all singular
    x = 2 * torch.randn(5, D, generator=_gen(15), dtype=F64)
    sig = torch.tensor([0.1, 0.4, 1.0, 2.5, 8.0], dtype=F64)
    ref, _ = _posterior_mean_mixture(x, w, amb_means, amb_covs, sig)
    torch.testing.assert_close(x - sig[:, None] * sub(x, sig), ref, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------------------------
# VPModel (prediction-type adapters) and X0Model
# --------------------------------------------------------------------------------------------

def _gauss_vp_net(m, cov, abar, prediction_type, calls):
    """A VP network that outputs the exact ε / x0 / v of N(m, cov) at training index t."""

    def net(z, t):
        calls.append(t.clone())
        a = abar[t].to(z)[:, None]            # t: (B,) integer indices
        sig = ((1 - a) / a).sqrt()
        x = z / a.sqrt()                      # VE point seen through z = √ᾱ·x
        x0 = _posterior_mean_gauss(x, m, cov, sig[:, 0])
        eps = (x - x0) / sig                  # z = √ᾱ·x0 + √(1−ᾱ)·ε
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return net


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_vp_model_prediction_types_match_exact_gaussian(prediction_type):
    sched = od.DDPMSchedule(1000)
    abar = sched.alphas_cumprod
    m = torch.tensor([0.3, -0.5, 1.0], dtype=F64)
    cov = _random_cov(3, 16)
    calls: list[torch.Tensor] = []
    model = VPModel(_gauss_vp_net(m, cov, abar, prediction_type, calls), abar,
                    prediction_type=prediction_type, input_shape=(3,))
    exact = GaussianDenoiser(m, cov)
    x = 2 * torch.randn(4, 3, generator=_gen(17), dtype=F64)
    idx = [0, 5, 99, 500, 998, 999]
    for i in idx:
        s = sched.sigmas[i]
        torch.testing.assert_close(model(x, s), exact(x, s), rtol=1e-8, atol=1e-8)
        assert (calls[-1] == i).all() and calls[-1].shape == (4,)
    sig = sched.sigmas[[3, 40, 400, 900]]  # per-sample σ on the grid
    torch.testing.assert_close(model(x, sig), exact(x, sig), rtol=1e-8, atol=1e-8)
    assert calls[-1].tolist() == [3, 40, 400, 900]


def test_vp_model_timestep_is_nearest_in_log_sigma():
    sched = od.DDPMSchedule(100)
    model = VPModel(lambda z, t: z, sched.alphas_cumprod)
    logs = sched.sigmas.log()
    g = _gen(18)
    sig = torch.exp(torch.empty(200, dtype=F64).uniform_(logs[0].item() - 1, logs[-1].item() + 1,
                                                         generator=g))
    ref = torch.tensor([int((logs - s.log()).abs().argmin()) for s in sig])
    assert torch.equal(model.timestep(sig), ref)
    for i in [0, 1, 50, 99]:  # the grid maps to itself
        assert model.timestep(sched.sigmas[i]).item() == i
    assert model.timestep(torch.tensor(1e-9)).item() == 0
    assert model.timestep(torch.tensor(1e9)).item() == 99


def test_vp_model_passes_vp_input_and_cond():
    abar = od.DDPMSchedule(50).alphas_cumprod
    seen = {}

    def net(z, t, cond=None):
        seen.update(z=z, t=t, cond=cond)
        return torch.zeros_like(z)

    model = VPModel(net, abar)
    x = torch.randn(3, 2, dtype=F64)
    s = od.DDPMSchedule(50).sigmas[10]
    model(x, s, cond="label")
    torch.testing.assert_close(seen["z"], x / (1 + s**2).sqrt())
    assert seen["cond"] == "label" and seen["t"].tolist() == [10, 10, 10]


def test_vp_model_invalid_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        VPModel(lambda z, t: z, od.DDPMSchedule(10).alphas_cumprod, prediction_type="flow")


def test_x0_model_matches_exact_eps():
    m = torch.tensor([1.0, 0.0], dtype=F64)
    cov = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=F64)
    model = X0Model(lambda x, s, c: _posterior_mean_gauss(x, m, cov, s.expand(len(x))), input_shape=(2,))
    x = torch.randn(4, 2, generator=_gen(19), dtype=F64)
    for s in [torch.tensor(0.2, dtype=F64), torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=F64)]:
        torch.testing.assert_close(model(x, s), GaussianDenoiser(m, cov)(x, s), rtol=1e-8, atol=1e-8)
    assert model.input_shape == (2,)


# --------------------------------------------------------------------------------------------
# TimeMLP
# --------------------------------------------------------------------------------------------

def test_time_mlp_shapes_and_sigma_forms():
    torch.manual_seed(0)
    net = TimeMLP(3, hidden=16, depth=2, emb_dim=8)
    x = torch.randn(5, 3)
    out = net(x, torch.tensor(0.7))
    assert out.shape == (5, 3) and net.input_shape == (3,)
    torch.testing.assert_close(net(x, torch.full((5,), 0.7)), out)
    sig = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    per = net(x, sig)
    rows = torch.cat([net(x[i:i + 1], sig[i]) for i in range(5)])
    torch.testing.assert_close(per, rows, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(net(x, torch.tensor(0.1)), net(x, torch.tensor(10.0)))
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_time_mlp_classes_and_null_class():
    torch.manual_seed(1)
    net = TimeMLP(2, hidden=16, depth=2, emb_dim=8, num_classes=3)
    x, s = torch.randn(4, 2), torch.tensor(0.5)
    null = net(x, s)  # cond None → null class
    torch.testing.assert_close(net(x, s, torch.full((4,), -1)), null)
    assert net.class_embed.num_embeddings == 4
    lab = torch.tensor([0, 1, 2, 0])
    out = net(x, s, lab)
    assert out.shape == (4, 2)
    assert not torch.allclose(out, null)
    for c in range(3):  # the null class is its own embedding, not one of the classes
        assert not torch.allclose(net(x, s, torch.full((4,), c)), null)
    # each row depends on its own label only
    torch.testing.assert_close(out[0], net(x[:1], s, lab[:1])[0])
    assert not torch.allclose(net(x, s, torch.zeros(4, dtype=torch.long)), net(x, s, torch.ones(4, dtype=torch.long)))


def test_time_mlp_trains_toward_gaussian_eps():
    # a few optimizer steps of denoising score matching lower the loss (the net is trainable)
    torch.manual_seed(2)
    net = TimeMLP(2, hidden=32, depth=2, emb_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x0 = torch.randn(256, 2) * torch.tensor([1.0, 0.3]) + torch.tensor([1.0, -1.0])
    sig = torch.exp(torch.empty(256).uniform_(math.log(0.05), math.log(10)))
    eps = torch.randn(256, 2)

    def loss():
        return ((net(x0 + sig[:, None] * eps, sig) - eps) ** 2).mean()

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        l_ = loss()
        l_.backward()
        opt.step()
    assert loss().item() < 0.8 * first


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,word", [
    (lambda: GaussianDenoiser(torch.zeros(2, 1), torch.eye(2)), "mean"),
    (lambda: GaussianDenoiser(torch.zeros(2), torch.eye(3)), "cov"),
    (lambda: GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.5, 1.0]])), "symmetric"),
    (lambda: GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])),
     "positive semi-definite"),
    (lambda: GaussianMixtureDenoiser(torch.tensor([0.5, 0.4]), torch.zeros(2, 2),
                                     torch.eye(2).expand(2, 2, 2)), "weights"),
    (lambda: GaussianMixtureDenoiser(torch.tensor([1.5, -0.5]), torch.zeros(2, 2),
                                     torch.eye(2).expand(2, 2, 2)), "weights"),
    (lambda: GaussianMixtureDenoiser(torch.tensor([0.5, 0.5]), torch.zeros(2),
                                     torch.eye(2).expand(2, 2, 2)), "means"),
    (lambda: GaussianMixtureDenoiser(torch.tensor([0.5, 0.5]), torch.zeros(2, 2),
                                     torch.eye(3).expand(2, 3, 3)), "covs"),
    (lambda: GaussianMixtureDenoiser(torch.tensor([0.5, 0.5]), torch.zeros(2, 2),
                                     torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2)),
     "positive semi-definite"),
    (lambda: SubspaceGaussianDenoiser(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])), "A"),
    (lambda: SubspaceGaussianDenoiser(2 * torch.eye(3)[:, :2]), "orthonormal"),
    (lambda: SubspaceGaussianDenoiser(torch.ones(2, 3) / 2 ** 0.5), "A"),
    (lambda: SubspaceGaussianDenoiser(torch.eye(3)[:, :2], latent_cov=torch.eye(3)), "cov"),
    (lambda: EmpiricalDenoiser(torch.zeros(5)), "data"),
    (lambda: EmpiricalDenoiser(torch.zeros(0, 2)), "data"),
    (lambda: VPModel(lambda z, t: z, torch.ones(3), prediction_type="x0"), "prediction_type"),
])
def test_bad_construction_raises(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_bad_x_shape_raises():
    for den, bad in [(GaussianDenoiser(torch.zeros(2), torch.eye(2)), torch.zeros(4, 3)),
                     (GaussianDenoiser(torch.zeros(2), torch.eye(2)), torch.zeros(2)),
                     (EmpiricalDenoiser(torch.zeros(5, 2, 3)), torch.zeros(4, 6)),
                     (SubspaceGaussianDenoiser(torch.eye(3)[:, :2]), torch.zeros(4, 2))]:
        with pytest.raises(ValueError, match="x must have shape"):
            den(bad.double(), torch.tensor(1.0))


def test_bad_sigma_shape_raises():
    den = GaussianDenoiser(torch.zeros(2), torch.eye(2))
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="sigma"):
        den(x, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="sigma"):
        den(x, torch.ones(3, 1, dtype=F64))
    with pytest.raises(ValueError, match="sigma"):
        TimeMLP(2, hidden=4, depth=1, emb_dim=4)(torch.randn(3, 2), torch.ones(2))
