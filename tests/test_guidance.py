"""Tests of optidiff.guidance (and optidiff.classifiers) against closed forms and theorems.

References: the exact conditional score ∇ₓ log p_σ(y | x) of a jointly Gaussian (x, y), obtained by
autograd of log N((x, y)) − log N(x) (independent of the code under test); the exact posterior
N(m, C) (Lemma 1 of Guo et al., NeurIPS 2024); Guo et al.'s subspace-preservation theorem; the exact class
posterior of a Gaussian mixture; the closed-form posterior mean of a linear-Gaussian inverse problem.
"""

import math

import pytest
import torch

import optidiff as od
from optidiff import guidance as G
from optidiff.models import (
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    SubspaceGaussianDenoiser,
    TimeMLP,
)
from optidiff.models.analytic import SubspaceDenoiser
from optidiff.models.classifiers import NoiseConditionalClassifier, train_classifier

F64 = torch.float64
SAMPLERS = ("ddim", "ddpm", "ge", "dpmpp_2m", "heun", "reverse_sde")


pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _orth(D, d, seed=0):
    q, r = torch.linalg.qr(torch.randn(D, D, generator=_gen(seed), dtype=F64))
    return (q * torch.sign(torch.diagonal(r)))[:, :d]


def _spd(d, seed=0, jitter=0.1):
    b = torch.randn(d, d, generator=_gen(seed), dtype=F64)
    return b @ b.T / d + jitter * torch.eye(d, dtype=F64)


def _grid(steps, sigma_max=80.0, sigma_min=3e-3):
    return torch.cat([torch.logspace(math.log10(sigma_max), math.log10(sigma_min), steps,
                                     dtype=F64), torch.zeros(1, dtype=F64)])


def exact_cond_score(mean, cov, g, y, x, sigma, noise_std):
    """∇ₓ log p_σ(y | x) for x0 ~ N(mean, cov), x = x0 + σε, y = gᵀx0 + N(0, σ_y²), by autograd of
    log N((x, y); joint) − log N(x; marginal). g: (B, D), y: (B,), x: (B, D)."""
    D = len(mean)
    out = []
    for gb, yb, xb in zip(g, y, x):
        xb = xb.clone().requires_grad_(True)
        cx = cov + sigma**2 * torch.eye(D, dtype=F64)
        joint = torch.zeros(D + 1, D + 1, dtype=F64)
        joint[:D, :D] = cx
        joint[:D, D] = joint[D, :D] = cov @ gb
        joint[D, D] = gb @ cov @ gb + noise_std**2
        mj = torch.cat([mean, (gb @ mean).reshape(1)])
        lj = torch.distributions.MultivariateNormal(mj, joint).log_prob(torch.cat([xb, yb.reshape(1)]))
        lm = torch.distributions.MultivariateNormal(mean, cx).log_prob(xb)
        (grad,) = torch.autograd.grad(lj - lm, xb)
        out.append(grad)
    return torch.stack(out)


def _problem(kind):
    """(model, mean, cov) of the Gaussian test models."""
    D, d = 6, 3
    if kind == "gaussian":
        mean = torch.randn(D, generator=_gen(1), dtype=F64)
        cov = _spd(D, seed=2)
        return GaussianDenoiser(mean, cov), mean, cov
    A = _orth(D, d, seed=3)
    if kind == "subspace_identity":
        return SubspaceGaussianDenoiser(A), torch.zeros(D, dtype=F64), A @ A.T
    lat_cov = _spd(d, seed=4, jitter=0.3)
    lat_mean = torch.randn(d, generator=_gen(5), dtype=F64)
    model = SubspaceGaussianDenoiser(A, latent_cov=lat_cov, latent_mean=lat_mean)
    return model, A @ lat_mean, A @ lat_cov @ A.T


class CountingModel:
    """Wraps a model; counts forward calls, rows seen and backward passes through its output."""

    def __init__(self, model):
        self.model, self.input_shape = model, getattr(model, "input_shape", None)
        self.calls, self.rows, self.backwards = 0, [], 0
        counter = self

        class _Count(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.view_as(t)

            @staticmethod
            def backward(ctx, grad):
                counter.backwards += 1
                return grad

        self._count = _Count

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.rows.append(len(x))
        return self._count.apply(self.model(x, sigma, cond))


# ------------------------------------------------------------------------------ Lemma 1

@pytest.mark.parametrize("kind", ["gaussian", "subspace_identity", "subspace_latent_cov"])
@pytest.mark.parametrize("sigma", [0.03, 0.7, 4.0, 30.0])
def test_lookahead_lemma1_equals_exact_conditional_score(kind, sigma):
    model, mean, cov = _problem(kind)
    D, B, sy = len(mean), 5, 0.2
    x = mean + (1 + sigma) * torch.randn(B, D, generator=_gen(7), dtype=F64)
    g = torch.randn(B, D, generator=_gen(8), dtype=F64)
    y = torch.randn(B, generator=_gen(9), dtype=F64) * 3
    ref = exact_cond_score(mean, cov, g, y, x, sigma, sy)
    s = torch.tensor(sigma, dtype=F64)
    got = G.LookAhead(g, y, beta="lemma1", noise_std=sy).correction(model, x, s)
    assert ((got - ref).norm(dim=1) / ref.norm(dim=1)).max() <= 1e-8
    # and through the protocol: eps_guided = eps − σ·G
    eps_g = G.LookAhead(g, y, noise_std=sy)(model, x, s, None)
    torch.testing.assert_close(eps_g, model(x, s) - sigma * ref, rtol=1e-8, atol=1e-10)


def test_lookahead_shared_g_and_scalar_y_match_per_sample():
    model, mean, cov = _problem("gaussian")
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(6, generator=_gen(2), dtype=F64)
    s = torch.tensor(0.9, dtype=F64)
    shared = G.LookAhead(g, 1.5).correction(model, x, s)
    per = G.LookAhead(g.expand(4, 6).clone(), torch.full((4,), 1.5, dtype=F64)).correction(model, x, s)
    torch.testing.assert_close(shared, per, rtol=1e-12, atol=0)
    ref = exact_cond_score(mean, cov, g.expand(4, 6), torch.full((4,), 1.5, dtype=F64), x, 0.9, 0.1)
    torch.testing.assert_close(shared, ref, rtol=1e-8, atol=1e-10)


def test_official_beta_equals_lemma1_only_for_identity_latent_covariance():
    x = torch.randn(5, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(5, 6, generator=_gen(2), dtype=F64)
    y = torch.randn(5, generator=_gen(3), dtype=F64)
    for sigma in (0.05, 1.0, 10.0):
        s = torch.tensor(sigma, dtype=F64)
        model = _problem("subspace_identity")[0]
        lem = G.LookAhead(g, y, beta="lemma1").correction(model, x, s)
        off = G.LookAhead(g, y, beta="official").correction(model, x, s)
        torch.testing.assert_close(off, lem, rtol=1e-12, atol=1e-14)
        for kind in ("subspace_latent_cov", "gaussian") if sigma >= 1 else ():
            model = _problem(kind)[0]  # (at small σ both β are ≈ 1/(2σ_y²))
            lem = G.LookAhead(g, y, beta="lemma1").correction(model, x, s)
            off = G.LookAhead(g, y, beta="official").correction(model, x, s)
            assert ((off - lem).norm(dim=1) / lem.norm(dim=1)).max() > 1e-3


def test_official_lookahead_beta_is_the_vp_rule_converted():
    # the official code: β_t = (α²/2)/(α²σ_y² + h‖∇_z v‖²), G_VP = −β_t∇_z(y − v)², VE G = α·G_VP
    model, _, _ = _problem("subspace_latent_cov")
    x = torch.randn(3, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(3, 6, generator=_gen(2), dtype=F64)
    y = torch.randn(3, generator=_gen(3), dtype=F64)
    sigma, sy = 0.8, 0.1
    abar = 1 / (1 + sigma**2)
    alpha, h = math.sqrt(abar), 1 - abar
    z = (alpha * x).requires_grad_(True)
    xz = z / alpha
    v = (g * (xz - sigma * model(xz, torch.tensor(sigma, dtype=F64)))).sum(1)
    loss = ((y - v) ** 2)
    grad_v = torch.autograd.grad(v.sum(), z, retain_graph=True)[0]
    beta_t = (alpha**2 / 2) / (alpha**2 * sy**2 + h * (grad_v**2).sum(1))
    g_vp = -beta_t[:, None] * torch.autograd.grad(loss.sum(), z)[0]
    got = G.LookAhead(g, y, beta="official", noise_std=sy).correction(
        model, x, torch.tensor(sigma, dtype=F64))
    torch.testing.assert_close(got, alpha * g_vp, rtol=1e-8, atol=1e-10)


def test_naive_official_is_exact_score_for_standard_normal_data():
    D, sy = 5, 0.1
    mean, cov = torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64)
    model = GaussianDenoiser(mean, cov)
    x = 2 * torch.randn(4, D, generator=_gen(1), dtype=F64)
    g = torch.randn(4, D, generator=_gen(2), dtype=F64)
    y = torch.randn(4, generator=_gen(3), dtype=F64)
    for sigma in (0.02, 0.5, 5.0):
        s = torch.tensor(sigma, dtype=F64)
        ref = exact_cond_score(mean, cov, g, y, x, sigma, sy)
        got = G.NaiveGradient(g, y, beta="official", noise_std=sy).correction(model, x, s)
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


def test_naive_linear_form_is_the_formula_without_model_backprop():
    model = CountingModel(_problem("gaussian")[0])
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(6, generator=_gen(2), dtype=F64)
    s = torch.tensor(0.6, dtype=F64)
    got = G.NaiveGradient(g, 2.0, beta=0.7).correction(model, x, s)
    x0 = x - 0.6 * model.model(x, s)
    torch.testing.assert_close(got, 0.7 * (2.0 - x0 @ g)[:, None] * g, rtol=1e-12, atol=0)
    assert model.calls == 1 and model.backwards == 0


def test_naive_objective_form_is_gradient_at_noisy_point():
    model = _problem("gaussian")[0]
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    b = torch.randn(6, generator=_gen(2), dtype=F64)
    f = lambda z: -((z - b) ** 2).sum(1)
    s = torch.tensor(0.3, dtype=F64)
    got = G.NaiveGradient(objective=f, scale=lambda sig: 2 * sig).correction(model, x, s)
    torch.testing.assert_close(got, 2 * 0.3 * (-2 * (x - b)), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ theorem

@pytest.mark.parametrize("latent", ["mixture", "gaussian_cov"])
def test_subspace_preservation_lookahead_in_span_naive_not(latent):
    D, d = 8, 3
    A = _orth(D, d, seed=11)
    if latent == "mixture":
        means = 2 * torch.randn(3, d, generator=_gen(12), dtype=F64)
        covs = torch.stack([_spd(d, seed=13 + k, jitter=0.2) for k in range(3)])
        lat = GaussianMixtureDenoiser(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)
        model = SubspaceDenoiser(A, lat)
    else:
        model = SubspaceGaussianDenoiser(A, latent_cov=_spd(d, seed=14, jitter=0.3))
    P = torch.eye(D, dtype=F64) - A @ A.T
    x = 2 * torch.randn(16, D, generator=_gen(15), dtype=F64)
    g = torch.randn(16, D, generator=_gen(16), dtype=F64)  # has an off-subspace part
    y = 3 * torch.randn(16, generator=_gen(17), dtype=F64)
    for sigma in (0.01, 0.3, 2.0, 20.0):
        s = torch.tensor(sigma, dtype=F64)
        for beta in ("lemma1", "official", 0.5):
            gl = G.LookAhead(g, y, beta=beta).correction(model, x, s)
            assert gl.norm(dim=1).min() > 0
            assert ((gl @ P).norm(dim=1) <= 1e-12 * gl.norm(dim=1)).all()
        gn = G.NaiveGradient(g, y).correction(model, x, s)
        ratio = (gn @ P).norm(dim=1) / gn.norm(dim=1)
        torch.testing.assert_close(ratio, (g @ P).norm(dim=1) / g.norm(dim=1))
        assert ratio.min() > 0.3


# ------------------------------------------------------------------------------ sampling

def test_exact_conditional_sampling_reproduces_gaussian_posterior():
    D, n, sy = 4, 4000, 0.3
    mean = torch.randn(D, generator=_gen(1), dtype=F64)
    cov = _spd(D, seed=2)
    g = torch.randn(D, generator=_gen(3), dtype=F64)
    y = float(g @ mean + 1.5 * (g @ cov @ g + sy**2).sqrt())
    den = sy**2 + g @ cov @ g
    m = mean + cov @ g * (y - g @ mean) / den
    C = cov - torch.outer(cov @ g, cov @ g) / den
    x = od.sample(GaussianDenoiser(mean, cov), _grid(500, sigma_min=1e-3), batch_size=n,
                  sampler="ddpm", guidance=G.LookAhead(g, y, noise_std=sy), generator=_gen(4),
                  dtype=F64)
    se_m = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - m).abs() <= 4 * se_m + 5e-3).all(), (x.mean(0) - m, se_m)
    se_c = ((torch.outer(C.diagonal(), C.diagonal()) + C**2) / n).sqrt()
    assert ((x.T.cov() - C).abs() <= 4 * se_c + 0.01 * C.abs().max()).all(), x.T.cov() - C
    # the guided mean moved by many standard errors from the prior mean
    assert (g @ x.mean(0) - g @ mean) > 50 * (g @ C @ g / n).sqrt()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_composes_with_every_sampler(sampler):
    D, n, sy = 3, 500, 0.3
    mean = torch.randn(D, generator=_gen(1), dtype=F64)
    cov = _spd(D, seed=2)
    model = GaussianDenoiser(mean, cov)
    g = torch.randn(D, generator=_gen(3), dtype=F64)
    y = float(g @ mean + 2 * (g @ cov @ g).sqrt())
    target = float(g @ (mean + cov @ g * (y - g @ mean) / (sy**2 + g @ cov @ g)))
    kw = {"batch_size": n, "sampler": sampler, "generator": _gen(4), "dtype": F64}
    x0 = od.sample(model, _grid(30), **kw)
    x1 = od.sample(model, _grid(30), guidance=G.LookAhead(g, y, noise_std=sy), **kw)
    r0, r1 = float((x0 @ g).mean()), float((x1 @ g).mean())
    assert r1 > r0  # the reward moves the right way
    assert abs(r1 - target) < 0.1 * abs(r0 - target), (r0, r1, target)


def test_ge_averages_the_guided_predictions():
    model = _problem("gaussian")[0]
    g = torch.randn(6, generator=_gen(1), dtype=F64)
    guid = G.LookAhead(g, 2.0)
    sigmas = _grid(12)
    x = sigmas[0] * torch.randn(8, 6, generator=_gen(2), dtype=F64)
    steps = list(od.sample_iter(model, sigmas, x_init=x, sampler="ge", guidance=guid))
    eps_prev = None
    for st in steps:
        with torch.no_grad():
            guided = guid(model, x, st.sigma, None)
        torch.testing.assert_close(st.eps, guided, rtol=0, atol=0)  # Step.eps is the guided ε
        assert (st.eps - model(x, st.sigma)).abs().max() > 1e-6
        ebar = st.eps if eps_prev is None else 2.0 * st.eps - eps_prev  # γ = 2
        torch.testing.assert_close(st.x, x - (st.sigma - st.sigma_next) * ebar, rtol=1e-12,
                                   atol=1e-12)
        x, eps_prev = st.x, st.eps


# ------------------------------------------------------------------------------ classifier, CFG

def _mixture():
    means = torch.tensor([[-2.0, 0.5], [2.0, -0.5], [0.0, 2.5]], dtype=F64)
    covs = torch.stack([0.3 * torch.eye(2, dtype=F64), _spd(2, seed=3, jitter=0.1) * 0.5,
                        0.2 * torch.eye(2, dtype=F64)])
    return GaussianMixtureDenoiser(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


def _exact_class_logits(mix):
    def clf(x, sigma):
        sig = torch.as_tensor(sigma, dtype=x.dtype)
        logp = torch.stack([c.log_density(x, sig) for c in mix.components], dim=-1)
        return logp + mix.log_weights  # log p(k) + log p_σ(x | k): the exact class posterior
    return clf


def test_classifier_guidance_with_exact_posterior_is_the_component_score():
    mix = _mixture()
    x = 2 * torch.randn(10, 2, generator=_gen(1), dtype=F64)
    for sigma in (0.05, 0.5, 3.0):
        s = torch.tensor(sigma, dtype=F64)
        for k in range(3):
            got = G.Classifier(_exact_class_logits(mix), y=k, scale=1.0)(mix, x, s, None)
            # two matrix-function paths (the components' log-density and their ε): good to
            # ~1e-8 relative on every math library, not to 1e-10
            torch.testing.assert_close(got, mix.components[k](x, s), rtol=1e-7, atol=1e-9)


def test_classifier_guided_sampling_draws_the_chosen_component():
    mix, k, n = _mixture(), 1, 2000
    x = od.sample(mix, _grid(200), batch_size=n, sampler="ddpm",
                  guidance=G.Classifier(_exact_class_logits(mix), y=k), generator=_gen(2), dtype=F64)
    comp = mix.components[k]
    se = (comp.cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - comp.mean).abs() <= 4 * se + 5e-3).all()
    assert ((x.T.cov() - comp.cov).abs() <= 0.08 * comp.cov.abs().max()).all()


def test_cfg_w1_is_conditional_and_other_w_follow_the_formula():
    torch.manual_seed(0)
    net = TimeMLP(3, hidden=16, depth=2, num_classes=4).double()
    model = CountingModel(net)
    x = torch.randn(6, 3, generator=_gen(1), dtype=F64)
    cond = torch.tensor([0, 1, 2, 3, 0, 1])
    s = torch.tensor(0.7, dtype=F64)
    with torch.no_grad():
        eps_c, eps_u = net(x, s, cond), net(x, s, torch.full_like(cond, -1))
        torch.testing.assert_close(G.ClassifierFree(1.0)(model, x, s, cond), eps_c, rtol=1e-12,
                                   atol=1e-14)
        model.calls, model.rows = 0, []
        for w in (0.0, 2.5, 7.5):
            got = G.ClassifierFree(w)(model, x, s, cond)
            torch.testing.assert_close(got, eps_u + w * (eps_c - eps_u), rtol=1e-12, atol=1e-13)
        assert model.calls == 3 and model.rows == [12, 12, 12]  # one batched call each
        # w as a function of σ with an active interval: w = 1 (conditional) outside it
        cfg = G.ClassifierFree(lambda sig: 1 + sig, interval=(0.5, 1.0))
        torch.testing.assert_close(cfg(model, x, s, cond), eps_u + 1.7 * (eps_c - eps_u))
        torch.testing.assert_close(cfg(model, x, torch.tensor(2.0, dtype=F64), cond),
                                   net(x, torch.tensor(2.0, dtype=F64), cond))
        # as a score correction in a sum: eps_c − σG reproduces the CFG prediction
        cfg = G.ClassifierFree(3.0)
        eps, corr = cfg.eps_and_correction(model, x, s, cond)
        torch.testing.assert_close(eps - 0.7 * corr, eps_u + 3.0 * (eps_c - eps_u))
    with pytest.raises(ValueError, match="condition"):
        G.ClassifierFree(2.0)(model, x, s, None)


def test_trained_noise_conditional_classifier_guides_toward_its_class():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    mix = GaussianMixtureDenoiser(torch.tensor([0.5, 0.5]), means, 0.25 * torch.eye(2).expand(2, 2, 2))
    gen = _gen(5)
    labels = torch.randint(2, (4000,), generator=gen)
    data = means[labels] + 0.5 * torch.randn(4000, 2, generator=gen)
    clf = NoiseConditionalClassifier(2, 2, hidden=64, depth=2)
    losses = train_classifier(clf, data, labels, steps=300, batch_size=256, lr=3e-3,
                              sigma_min=0.01, sigma_max=20.0, generator=_gen(6))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        lab = torch.randint(2, (2000,), generator=gen)
        test = means[lab] + 0.5 * torch.randn(2000, 2, generator=gen)
        acc = (clf(test + 0.05 * torch.randn(2000, 2, generator=gen), torch.tensor(0.05))
               .argmax(1) == lab).float().mean()
    assert acc > 0.97
    kw = {"batch_size": 1000, "sampler": "ddpm", "generator": _gen(7)}
    x0 = od.sample(mix, _grid(100, sigma_max=20.0), **kw)
    x1 = od.sample(mix, _grid(100, sigma_max=20.0), guidance=G.Classifier(clf, y=1, scale=1.0), **kw)
    assert 0.4 < (x0[:, 0] > 0).float().mean() < 0.6
    assert (x1[:, 0] > 0).float().mean() > 0.95


def test_train_classifier_is_deterministic_given_the_generator():
    data, labels = torch.randn(64, 3, generator=_gen(1)), torch.arange(64) % 2
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        clf = NoiseConditionalClassifier(3, 2, hidden=8, depth=1)
        out.append(train_classifier(clf, data, labels, steps=5, batch_size=16, generator=_gen(2)))
    assert out[0] == out[1]


# ------------------------------------------------------------------------------ DPS

def test_dps_lands_near_exact_posterior_mean_of_linear_gaussian_problem(capsys):
    D, sm, n = 4, 0.1, 2000
    mean = torch.randn(D, generator=_gen(1), dtype=F64)
    cov = _spd(D, seed=2)
    model = GaussianDenoiser(mean, cov)
    H = torch.randn(2, D, generator=_gen(3), dtype=F64)
    x_true = mean + torch.linalg.cholesky(cov) @ torch.randn(D, generator=_gen(4), dtype=F64)
    y = H @ x_true + sm * torch.randn(2, generator=_gen(5), dtype=F64)
    m_post = mean + cov @ H.T @ torch.linalg.solve(H @ cov @ H.T + sm**2 * torch.eye(2, dtype=F64),
                                                   y - H @ mean)
    kw = {"batch_size": n, "sampler": "ddpm", "generator": _gen(6), "dtype": F64}
    x0 = od.sample(model, _grid(200), **kw)
    x1 = od.sample(model, _grid(200), guidance=G.DPS(lambda a: a @ H.T, y, scale=3.0), **kw)
    d0, d1 = float((x0.mean(0) - m_post).norm()), float((x1.mean(0) - m_post).norm())
    with capsys.disabled():
        print(f"\n[DPS] |mean - exact posterior mean|: unguided {d0:.4f}, DPS(zeta=3) {d1:.4f}")
    assert d1 < 0.2 * d0


def test_dps_is_the_normalised_residual_gradient():
    model = _problem("gaussian")[0]
    H = torch.randn(3, 6, generator=_gen(1), dtype=F64)
    y = torch.randn(4, 3, generator=_gen(2), dtype=F64)  # per sample
    x = torch.randn(4, 6, generator=_gen(3), dtype=F64)
    s = torch.tensor(0.4, dtype=F64)
    xr = x.clone().requires_grad_(True)
    r = y - (xr - 0.4 * model(xr, s)) @ H.T
    ref = -torch.autograd.grad(r.norm(dim=1).sum(), xr)[0]
    torch.testing.assert_close(G.DPS(lambda a: a @ H.T, y, 2.0).correction(model, x, s), 2 * ref)
    xr = x.clone().requires_grad_(True)
    r = y - (xr - 0.4 * model(xr, s)) @ H.T
    ref2 = -torch.autograd.grad(0.5 * (r**2).sum(), xr)[0]
    torch.testing.assert_close(G.DPS(lambda a: a @ H.T, y, 2.0, normalize=False)
                               .correction(model, x, s), 2 * ref2)


# ------------------------------------------------------------------------------ knobs

def test_one_forward_and_one_backward_per_lookahead_evaluation():
    for beta in ("lemma1", "official", 0.3):
        model = CountingModel(_problem("gaussian")[0])
        x = torch.randn(5, 6, generator=_gen(1), dtype=F64)
        with torch.no_grad():  # as inside a sampler
            out = G.LookAhead(torch.ones(6, dtype=F64), 1.0, beta=beta)(
                model, x, torch.tensor(0.5, dtype=F64), None)
        assert model.calls == 1 and model.backwards == 1
        assert not out.requires_grad and out.grad_fn is None


def test_chunked_evaluation_equals_one_chunk():
    model = _problem("subspace_latent_cov")[0]
    x = torch.randn(8, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(8, 6, generator=_gen(2), dtype=F64)
    y = torch.randn(8, generator=_gen(3), dtype=F64)
    H = torch.randn(2, 6, generator=_gen(4), dtype=F64)
    ym = torch.randn(8, 2, generator=_gen(5), dtype=F64)
    mix_x = torch.randn(8, 2, generator=_gen(6), dtype=F64)
    s = torch.tensor(0.7, dtype=F64)
    for make in (lambda **k: G.LookAhead(g, y, **k), lambda **k: G.NaiveGradient(g, y, **k),
                 lambda **k: G.DPS(lambda a: a @ H.T, ym, 1.0, **k)):
        counting = CountingModel(model)
        torch.testing.assert_close(make(chunk_size=3)(counting, x, s, None),
                                   make()(model, x, s, None), rtol=1e-13, atol=1e-14)
        assert counting.rows == [3, 3, 2]
    mix, labels = _mixture(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    clf = _exact_class_logits(mix)
    torch.testing.assert_close(G.Classifier(clf, labels, chunk_size=3)(mix, mix_x, s, None),
                               G.Classifier(clf, labels)(mix, mix_x, s, None))


def test_grad_through_model_false_treats_x0_hat_as_constant():
    model = CountingModel(_problem("gaussian")[0])
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(4, 6, generator=_gen(2), dtype=F64)
    y = torch.randn(4, generator=_gen(3), dtype=F64)
    sigma, sy = 0.6, 0.1
    s = torch.tensor(sigma, dtype=F64)
    got = G.LookAhead(g, y, noise_std=sy, grad_through_model=False).correction(model, x, s)
    v = ((x - sigma * model.model(x, s)) * g).sum(1)
    beta = 1 / (2 * (sy**2 + sigma**2 * (g * g).sum(1)))
    torch.testing.assert_close(got, (2 * beta * (y - v))[:, None] * g, rtol=1e-12, atol=0)
    assert model.backwards == 0


def test_clip_and_rescale_bound_the_correction():
    model = _problem("gaussian")[0]
    x = torch.randn(6, 6, generator=_gen(1), dtype=F64)
    g = 10 * torch.randn(6, 6, generator=_gen(2), dtype=F64)
    y = 100 * torch.randn(6, generator=_gen(3), dtype=F64)
    s = torch.tensor(0.5, dtype=F64)
    raw = G.LookAhead(g, y).correction(model, x, s)
    clipped = G.LookAhead(g, y, clip=0.5).correction(model, x, s)
    assert raw.norm(dim=1).min() > 0.5
    torch.testing.assert_close(clipped.norm(dim=1), torch.full((6,), 0.5, dtype=F64))
    torch.testing.assert_close(clipped, 0.5 * raw / raw.norm(dim=1, keepdim=True))
    eps = model(x, s)
    guided = G.LookAhead(g, y, rescale=0.5)(model, x, s, None)
    assert ((guided - eps).norm(dim=1) <= 0.5 * eps.norm(dim=1) * (1 + 1e-12)).all()


def test_weights_as_functions_of_sigma_and_active_interval():
    model = CountingModel(_problem("gaussian")[0])
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    g = torch.randn(6, generator=_gen(2), dtype=F64)
    base = G.LookAhead(g, 1.0)
    s = torch.tensor(0.5, dtype=F64)
    torch.testing.assert_close(G.LookAhead(g, 1.0, scale=lambda sig: sig**2).correction(model, x, s),
                               0.25 * base.correction(model, x, s))
    inside = G.LookAhead(g, 1.0, interval=(0.1, 1.0))
    torch.testing.assert_close(inside.correction(model, x, s), base.correction(model, x, s))
    model.calls, model.backwards = 0, 0
    with torch.no_grad():
        out = inside(model, x, torch.tensor(3.0, dtype=F64), None)
    torch.testing.assert_close(out, model.model(x, torch.tensor(3.0, dtype=F64)))
    assert model.calls == 1 and model.backwards == 0  # inactive: plain call, no backward


def test_sum_of_terms_sums_the_corrections():
    model = _problem("gaussian")[0]
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    g1, g2 = torch.randn(2, 6, generator=_gen(2), dtype=F64)
    s = torch.tensor(0.8, dtype=F64)
    a, b = G.LookAhead(g1, 1.0), G.NaiveGradient(g2, -1.0)
    c = G.DPS(lambda z: z[:, :2], torch.ones(2, dtype=F64), 0.5)
    total = a + b + c
    assert isinstance(total, G.Sum) and len(total.terms) == 3
    want = a.correction(model, x, s) + b.correction(model, x, s) + c.correction(model, x, s)
    torch.testing.assert_close(total.correction(model, x, s), want)
    torch.testing.assert_close(total(model, x, s, None), model(x, s) - 0.8 * want)
    x1 = od.sample(model, _grid(10), x_init=x, sampler="ddim", guidance=total)
    assert torch.isfinite(x1).all()


def test_lookahead_from_objective_linearises_at_reference():
    b = torch.randn(6, generator=_gen(1), dtype=F64)
    f = lambda z: 5 - ((z - b) ** 2).sum(1)
    x_ref = torch.randn(3, 6, generator=_gen(2), dtype=F64)
    la = G.LookAhead.from_objective(f, x_ref, target=5.0, noise_std=0.2)
    g = -2 * (x_ref - b)
    torch.testing.assert_close(la.g, g)
    torch.testing.assert_close(la.y, 5.0 - f(x_ref) + (g * x_ref).sum(1))
    assert la.noise_std == 0.2
    la = G.LookAhead.from_objective(f, x_ref[:1], increment=0.5)
    assert la.g.shape == (6,) and la.y.ndim == 0
    torch.testing.assert_close(la.y, (g[0] * x_ref[0]).sum() + 0.5)


def test_lookahead_through_a_cfg_guided_model():
    torch.manual_seed(0)
    net = TimeMLP(3, hidden=16, depth=2, num_classes=2).double()
    cfg_model = G.guided_model(net, G.ClassifierFree(2.0))
    x = torch.randn(4, 3, generator=_gen(1), dtype=F64)
    cond, g, sigma = torch.tensor([0, 1, 0, 1]), torch.randn(3, generator=_gen(2), dtype=F64), 0.5
    s = torch.tensor(sigma, dtype=F64)
    got = G.LookAhead(g, 1.0, beta=0.1).correction(cfg_model, x, s, cond)
    xr = x.clone().requires_grad_(True)
    v = ((xr - sigma * cfg_model(xr, s, cond)) @ g)
    ref = torch.autograd.grad((-0.1 * (1.0 - v) ** 2).sum(), xr)[0]
    torch.testing.assert_close(got, ref)


# ------------------------------------------------------------------------------ bad input

def test_non_finite_objective_or_gradient_is_a_clear_error():
    model = _problem("gaussian")[0]
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    s = torch.tensor(0.5, dtype=F64)
    with pytest.raises(FloatingPointError, match=r"objective value f\(x\).*sigma=0.5"):
        G.NaiveGradient(objective=lambda z: z.sum(1) * float("nan"))(model, x, s, None)
    xz = x.clone()
    xz[2] = 0.0
    with pytest.raises(FloatingPointError, match=r"gradient.*samples \[2\]"):
        G.NaiveGradient(objective=lambda z: z.abs().sqrt().sum(1))(model, xz, s, None)
    nan_model = lambda z, sig, c=None: z * float("nan")
    with pytest.raises(FloatingPointError, match="gᵀx0_hat"):
        G.LookAhead(torch.ones(6, dtype=F64), 1.0)(nan_model, x, s, None)
    kink = lambda z, sig, c=None: torch.sqrt(z**2)
    with pytest.raises(FloatingPointError, match=r"Jᵀg.*samples \[2\]"):
        G.LookAhead(torch.ones(6, dtype=F64), 1.0)(kink, xz, s, None)
    with pytest.raises(FloatingPointError, match="x_ref"):
        G.LookAhead.from_objective(lambda z: z.sum(1) / 0.0, x, increment=1.0)
    with pytest.raises(FloatingPointError, match="g is not finite"):
        G.LookAhead(torch.full((6,), float("inf")), 1.0)


def test_mismatched_shapes_are_clear_errors():
    model = _problem("gaussian")[0]
    x = torch.randn(8, 6, generator=_gen(1), dtype=F64)
    s = torch.tensor(0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"g has shape \(5,\), expected \(6,\)"):
        G.LookAhead(torch.ones(5, dtype=F64), 1.0)(model, x, s, None)
    with pytest.raises(ValueError, match=r"g has shape \(3, 6\)"):
        G.LookAhead(torch.ones(3, 6, dtype=F64), 1.0)(model, x, s, None)
    with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
        G.NaiveGradient(torch.ones(6, dtype=F64), torch.ones(3, dtype=F64))(model, x, s, None)
    with pytest.raises(ValueError, match="y must be a number"):
        G.LookAhead(torch.ones(6, dtype=F64), torch.ones(2, 2))
    with pytest.raises(ValueError, match="y_meas has shape"):
        G.DPS(lambda a: a[:, :2], torch.ones(3, dtype=F64))(model, x, s, None)


def test_negative_weights_unknown_beta_and_bad_knobs_are_clear_errors():
    g = torch.ones(6, dtype=F64)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        G.LookAhead(g, 1.0, scale=-1.0)
    with pytest.raises(ValueError, match="scale must be"):
        G.ClassifierFree(-2.0)
    with pytest.raises(ValueError, match="scale must be"):
        G.DPS(lambda a: a, g, -0.1)
    with pytest.warns(DeprecationWarning, match=r"DPS\(zeta=…\) is deprecated"):
        assert G.DPS(lambda a: a, g, zeta=0.3).scale.value == 0.3
    with pytest.warns(DeprecationWarning, match="ClassifierFree"):
        assert G.ClassifierFree(w=2.0).scale.value == 2.0
    with pytest.raises(ValueError, match="beta must be"):
        G.LookAhead(g, 1.0, beta=-0.5)
    with pytest.raises(ValueError, match=r"unknown beta rule 'lemma2'.*'lemma1', 'official'"):
        G.LookAhead(g, 1.0, beta="lemma2")
    with pytest.raises(ValueError, match="unknown beta rule 'lemma1'"):
        G.NaiveGradient(g, 1.0, beta="lemma1")
    with pytest.raises(ValueError, match="noise_std"):
        G.LookAhead(g, 1.0, noise_std=0.0)
    with pytest.raises(ValueError, match="interval"):
        G.LookAhead(g, 1.0, interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        G.LookAhead(g, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="clip"):
        G.LookAhead(g, 1.0, clip=-1)
    model = _problem("gaussian")[0]
    x = torch.randn(2, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"scale\(sigma\) must be finite and >= 0"):
        G.LookAhead(g, 1.0, scale=lambda sig: sig - 1)(model, x, torch.tensor(0.5, dtype=F64), None)
    with pytest.raises(ValueError, match="either"):
        G.NaiveGradient(g, 1.0, objective=lambda z: z.sum(1))
