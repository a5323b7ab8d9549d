"""Samplers against diffusers' DDIM/DDPM schedulers, exact denoisers and hand-computed steps.

References:
- diffusers ``DDIMScheduler`` / ``DDPMScheduler`` (trailing spacing) on the same deterministic VP
  ε-network, seen by optidiff through ``od.models.VPModel`` (compared in VP coordinates);
- exact Gaussian and Gaussian-mixture denoisers: every sampler must reproduce the data law within
  Monte-Carlo error (tolerances in standard errors derived from the sample size);
- hand-written updates for a zero model under constant guidance.
"""

from __future__ import annotations

import itertools
import math

import diffusers  # a dev dependency: the reference implementation
import pytest
import torch

import optidiff as od
from optidiff.models import GaussianDenoiser, GaussianMixtureDenoiser, VPModel
from optidiff.schedules import Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
ALL_SAMPLERS = [("ddim", {}), ("ddpm", {}), ("ge", {}), ("gamma_mu", {"gamma": 1.5, "mu": 0.3}),
                ("dpmpp_2m", {}), ("heun", {}), ("reverse_sde", {})]
SAMPLER_IDS = [s for s, _ in ALL_SAMPLERS]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# diffusers equivalence
# --------------------------------------------------------------------------------------------

N_TRAIN = 1000


def _diffusers_abar() -> torch.Tensor:
    """diffusers' default DDPM table (linear β 1e-4…0.02), as float64 for both sides."""
    return diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN).alphas_cumprod.to(F64)


class VPNet:
    """A deterministic VP ε-network ε(z, t), depending on both z and the integer timestep t.

    Its main term √(1−ᾱ_t)·z is the exact ε of N(0, I) data (so samples stay O(1)); a tanh of a
    fixed random linear map of z, shifted by a function of t, makes any mismatch of z or t show.
    """

    def __init__(self, abar: torch.Tensor, dim: int = 4, seed: int = 0):
        g = _gen(seed)
        self.abar = abar
        self.W = torch.randn(dim, dim, generator=g, dtype=F64) / dim**0.5
        self.b = torch.randn(dim, generator=g, dtype=F64)
        self.timesteps: list[int] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1)          # 0-d from diffusers, (B,) from VPModel
        self.timesteps.append(int(t[0]))
        assert (t == t[0]).all()
        a = self.abar[t].to(z).reshape(-1, 1)
        tf = t.to(z).reshape(-1, 1)
        return (1 - a).sqrt() * z + 0.5 * torch.tanh(z @ self.W + torch.sin(tf / 37.0) * self.b)


def _to_float64(scheduler, abar: torch.Tensor) -> None:
    """Run diffusers' own step code in float64 on the same ᾱ table (its tables are float32)."""
    scheduler.alphas_cumprod = abar
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = abar[0]  # set_alpha_to_one=False


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_equals_diffusers_ddim(steps):
    abar = _diffusers_abar()
    sigma_table = ((1 - abar) / abar).sqrt()
    ref = diffusers.DDIMScheduler(num_train_timesteps=N_TRAIN, timestep_spacing="trailing",
                                  clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(steps)
    _to_float64(ref, abar)
    z_init = torch.randn(16, 4, generator=_gen(1), dtype=F64)

    net_ref = VPNet(abar)
    z = z_init.clone()
    for t in ref.timesteps:
        z = ref.step(net_ref(z, t), t, z, eta=0.0).prev_sample

    net = VPNet(abar)
    sigmas = Schedule(sigma_table).sample_sigmas(steps)
    x = od.sample(VPModel(net, abar), sigmas, sampler="ddim",
                  x_init=z_init * (1 + sigmas[0] ** 2).sqrt())
    assert net.timesteps == net_ref.timesteps == ref.timesteps.tolist()
    z_od = x / (1 + sigmas[-1] ** 2).sqrt()         # VP coordinates at the final σ = σ_min
    torch.testing.assert_close(z_od, z, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(z, z_init, atol=1e-2)   # the run moved


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("seed", [0, 7])
def test_ddpm_equals_diffusers_ddpm_with_matched_noise(steps, seed):
    abar = _diffusers_abar()
    sigma_table = ((1 - abar) / abar).sqrt()
    ref = diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN, timestep_spacing="trailing",
                                  clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(steps)
    _to_float64(ref, abar)
    z_init = torch.randn(16, 4, generator=_gen(100 + seed), dtype=F64)

    net_ref = VPNet(abar)
    z, g = z_init.clone(), _gen(seed)
    for t in ref.timesteps:  # diffusers draws one randn of z's shape per step (variance 0 at the last)
        z = ref.step(net_ref(z, t), t, z, generator=g).prev_sample

    net = VPNet(abar)
    sigmas = Schedule(sigma_table).sample_sigmas(steps, final_zero=True)  # ᾱ_prev = 1 at the end
    x = od.sample(VPModel(net, abar), sigmas, sampler="ddpm",
                  x_init=z_init * (1 + sigmas[0] ** 2).sqrt(), generator=_gen(seed))
    assert net.timesteps == net_ref.timesteps
    torch.testing.assert_close(x, z, rtol=1e-9, atol=1e-9)  # σ = 0: VP and VE coincide

    # the noise matters: another seed gives another result
    x_other = od.sample(VPModel(VPNet(abar), abar), sigmas, sampler="ddpm",
                        x_init=z_init * (1 + sigmas[0] ** 2).sqrt(), generator=_gen(seed + 1))
    assert (x_other - x).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# exact denoisers: the samplers reproduce the data distribution
# --------------------------------------------------------------------------------------------

GRID = od.KarrasSchedule(0.002, 80.0, 7.0, 1000)
# Steps per sampler: enough for the discretisation bias of each to stay below ~1.5 standard errors
# at the sample size used (measured once with 200k / 60k samples); the first-order stochastic
# samplers need more steps than DDIM, GE and the second-order peers.
STEPS = {"ddim": 400, "ddpm": 1000, "ge": 400, "gamma_mu": 1000, "dpmpp_2m": 200, "heun": 200,
         "reverse_sde": 1000}
N_SAMPLES = 20000
STEPS_MIX = {"ddim": 200, "ddpm": 400, "ge": 200, "gamma_mu": 400, "dpmpp_2m": 200, "heun": 200,
             "reverse_sde": 400}
N_MIX = 5000  # the mixture denoiser costs ~5x the Gaussian one per sample
Z = 5.0  # tolerance in standard errors

G_MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
G_CHOL = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.5, 0.4]], dtype=F64)
G_COV = G_CHOL @ G_CHOL.T

M_W = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
M_MEANS = torch.tensor([[-4.0, 0.0], [4.0, 1.0], [0.0, 5.0]], dtype=F64)
M_COVS = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 0.8]],
                       [[0.4, 0.0], [0.0, 0.4]]], dtype=F64)


def _gauss_draw(n, g):
    return G_MEAN + torch.randn(n, 3, generator=g, dtype=F64) @ G_CHOL.T


def _mix_draw(n, g):
    k = torch.multinomial(M_W, n, replacement=True, generator=g)
    chol = torch.linalg.cholesky(M_COVS)
    return M_MEANS[k] + (chol[k] @ torch.randn(n, 2, 1, generator=g, dtype=F64)).squeeze(-1)


def _mix_moments():
    mean = (M_W[:, None] * M_MEANS).sum(0)
    second = (M_W[:, None, None] * (M_COVS + M_MEANS[:, :, None] * M_MEANS[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


def _run(den, draw, sampler, kw, steps, seed=0, n=N_SAMPLES):
    """Start from the exact marginal at σ_max (data + σ_max·w), sample down to σ = 0."""
    sigmas = GRID.sample_sigmas(steps, final_zero=True)
    g = _gen(seed)
    x_init = draw(n, g) + sigmas[0] * torch.randn(n, den.input_shape[0], generator=g, dtype=F64)
    return od.sample(den, sigmas, x_init=x_init, sampler=sampler, generator=g, **kw)


def _assert_moments(x, mean, cov):
    n = len(x)
    c = x - x.mean(0)
    se_mean = x.std(0) / math.sqrt(n)
    se_cov = (c[:, :, None] * c[:, None, :]).std(0) / math.sqrt(n)  # from the 4th moments
    z_mean = ((x.mean(0) - mean) / se_mean).abs().max().item()
    z_cov = ((torch.cov(x.T) - cov) / se_cov).abs().max().item()
    assert z_mean < Z, f"sample mean off by {z_mean:.1f} standard errors"
    assert z_cov < Z, f"sample covariance off by {z_cov:.1f} standard errors"


def _w2_gauss(m1, c1, m2, c2) -> float:
    """Closed-form 2-Wasserstein distance between N(m1, c1) and N(m2, c2)."""

    def sqrtm(a):
        lam, u = torch.linalg.eigh(a)
        return u @ torch.diag(lam.clamp(min=0).sqrt()) @ u.T

    r2 = sqrtm(c2)
    cross = sqrtm(r2 @ c1 @ r2)
    return math.sqrt(max(((m1 - m2) ** 2).sum().item() + torch.trace(c1 + c2 - 2 * cross).item(), 0))


@pytest.mark.parametrize("sampler,kw", ALL_SAMPLERS, ids=SAMPLER_IDS)
def test_samplers_reproduce_gaussian(sampler, kw):
    den = GaussianDenoiser(G_MEAN, G_COV)
    x = _run(den, _gauss_draw, sampler, kw, STEPS[sampler])
    assert x.shape == (N_SAMPLES, 3) and torch.isfinite(x).all()
    _assert_moments(x, G_MEAN, G_COV)


@pytest.mark.parametrize("sampler,kw", ALL_SAMPLERS, ids=SAMPLER_IDS)
def test_samplers_reproduce_gaussian_mixture(sampler, kw):
    den = GaussianMixtureDenoiser(M_W, M_MEANS, M_COVS)
    n = N_MIX
    x = _run(den, _mix_draw, sampler, kw, STEPS_MIX[sampler], n=n)
    mean, cov = _mix_moments()
    _assert_moments(x, mean, cov)
    # occupancy of the components (nearest mean) against the same statistic of 400k true draws
    def nearest(y):
        return torch.cdist(y, M_MEANS).argmin(1)

    occ = torch.bincount(nearest(x), minlength=3).to(F64) / n
    ref = torch.bincount(nearest(_mix_draw(400000, _gen(99))), minlength=3).to(F64) / 400000
    assert (ref - M_W).abs().max() < 0.01  # the statistic measures the weights here
    se = (ref * (1 - ref) * (1 / n + 1 / 400000)).sqrt()
    assert ((occ - ref).abs() < Z * se).all(), f"occupancy {occ.tolist()} vs {ref.tolist()}"


def test_w2_formula_and_ddim_w2_shrinks_with_steps():
    # the closed form on cases with known answers
    m, c = G_MEAN, G_COV
    assert _w2_gauss(m, c, m, c) == pytest.approx(0, abs=1e-6)
    shift = torch.tensor([0.3, -0.4, 0.0], dtype=F64)
    assert _w2_gauss(m + shift, c, m, c) == pytest.approx(0.5, rel=1e-6)
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    assert _w2_gauss(m, torch.diag(d1).to(F64), m, torch.diag(d2).to(F64)) == pytest.approx(
        math.sqrt(1 + 1 + 4), rel=1e-6)

    den = GaussianDenoiser(G_MEAN, G_COV)
    w2 = []
    for steps in [3, 10, 30, 400]:
        x = _run(den, _gauss_draw, "ddim", {}, steps)  # same seed: common random numbers
        w2.append(_w2_gauss(x.mean(0), torch.cov(x.T), G_MEAN, G_COV))
    assert all(a > b for a, b in itertools.pairwise(w2)), w2
    # at 400 steps what is left is Monte-Carlo error: W2 of the true draws' own estimate is the scale
    x0 = _gauss_draw(N_SAMPLES, _gen(0))
    floor = _w2_gauss(x0.mean(0), torch.cov(x0.T), G_MEAN, G_COV)
    assert w2[-1] < 3 * floor + 0.01 and w2[0] > 10 * w2[-1], (w2, floor)


# --------------------------------------------------------------------------------------------
# identities between samplers, determinism
# --------------------------------------------------------------------------------------------

def _small_problem(seed=0, n=64):
    den = GaussianMixtureDenoiser(M_W, M_MEANS, M_COVS)
    sigmas = GRID.sample_sigmas(25, final_zero=True)
    x_init = sigmas[0] * torch.randn(n, 2, generator=_gen(seed), dtype=F64)
    return den, sigmas, x_init


def test_gamma_mu_at_1_0_is_ddim_exactly():
    den, sigmas, x_init = _small_problem()
    a = od.sample(den, sigmas, x_init=x_init, sampler="gamma_mu", gamma=1.0, mu=0.0)
    b = od.sample(den, sigmas, x_init=x_init, sampler="ddim")
    c = od.sample(den, sigmas, x_init=x_init, sampler="gamma_mu")  # its default is (1, 0)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, od.sample(den, sigmas, x_init=x_init, sampler="ge"))


def test_presets_are_points_of_the_family():
    den, sigmas, x_init = _small_problem()
    ge = od.sample(den, sigmas, x_init=x_init, sampler="ge")
    assert torch.equal(ge, od.sample(den, sigmas, x_init=x_init, sampler="gamma_mu", gamma=2.0))
    ddpm = od.sample(den, sigmas, x_init=x_init, sampler="ddpm", generator=_gen(3))
    fam = od.sample(den, sigmas, x_init=x_init, sampler="gamma_mu", gamma=1.0, mu=0.5,
                    generator=_gen(3))
    assert torch.equal(ddpm, fam)


@pytest.mark.parametrize("sampler", ["ddpm", "reverse_sde"])
def test_same_seed_bit_identical(sampler):
    den, sigmas, x_init = _small_problem()
    a = od.sample(den, sigmas, x_init=x_init, sampler=sampler, generator=_gen(5))
    b = od.sample(den, sigmas, x_init=x_init, sampler=sampler, generator=_gen(5))
    c = od.sample(den, sigmas, x_init=x_init, sampler=sampler, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # and without x_init the initial noise comes from the generator too
    d = od.sample(den, sigmas, batch_size=8, sampler=sampler, generator=_gen(5))
    e = od.sample(den, sigmas, batch_size=8, sampler=sampler, generator=_gen(5))
    assert torch.equal(d, e)


def test_ge_first_step_is_ddim_then_differs():
    den, sigmas, x_init = _small_problem()
    ge = list(od.sample_iter(den, sigmas, x_init=x_init, sampler="ge"))
    ddim = list(od.sample_iter(den, sigmas, x_init=x_init, sampler="ddim"))
    assert torch.equal(ge[0].x, ddim[0].x) and torch.equal(ge[0].eps, ddim[0].eps)
    assert not torch.allclose(ge[1].x, ddim[1].x)


def test_gamma_mu_matches_transcribed_algorithm():
    # Permenter & Yuan, Algorithm 2 with the μ generalisation, transcribed step by step here
    den, sigmas, x_init = _small_problem()
    gamma, mu = 1.7, 0.4
    out = od.sample(den, sigmas, x_init=x_init, sampler="gamma_mu", gamma=gamma, mu=mu,
                    generator=_gen(11))
    g, x, eps_prev = _gen(11), x_init.clone(), None
    s = sigmas.tolist()
    for t in range(len(s) - 1):
        eps = den(x, torch.tensor(s[t], dtype=F64))
        ebar = eps if eps_prev is None else gamma * eps + (1 - gamma) * eps_prev
        s_prime = (s[t + 1] / s[t] ** mu) ** (1 / (1 - mu))
        eta = math.sqrt(max(s[t + 1] ** 2 - s_prime**2, 0.0))
        x = x - (s[t] - s_prime) * ebar + eta * torch.randn(x.shape, generator=g, dtype=F64)
        eps_prev = eps
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_default_initial_noise_is_sigma_max_times_generator_draw():
    den = GaussianDenoiser(G_MEAN, G_COV)
    sigmas = torch.tensor([50.0, 10.0, 1.0])
    step = next(od.sample_iter(den, sigmas, batch_size=6, sampler="ddim", generator=_gen(4)))
    w = torch.randn((6, 3), generator=_gen(4), dtype=torch.float32)
    x_start = step.x0_hat + step.sigma * step.eps
    assert x_start.dtype == torch.float32
    torch.testing.assert_close(x_start, 50.0 * w, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# sample_iter: step records, NFE, grad mode
# --------------------------------------------------------------------------------------------

def test_sample_iter_records():
    den = GaussianDenoiser(G_MEAN, G_COV)
    sigmas = GRID.sample_sigmas(6, final_zero=True)
    x_init = sigmas[0] * torch.randn(5, 3, generator=_gen(0), dtype=F64)
    steps = list(od.sample_iter(den, sigmas, x_init=x_init, sampler="ge"))
    assert len(steps) == 6
    x_t = x_init
    for i, st in enumerate(steps):
        assert st.index == i and st.nfe == i + 1
        assert st.sigma == sigmas[i] and st.sigma_next == sigmas[i + 1]
        torch.testing.assert_close(st.eps, den(x_t, sigmas[i]), rtol=0, atol=0)
        torch.testing.assert_close(st.x0_hat, x_t - sigmas[i] * st.eps, rtol=0, atol=0)
        x_t = st.x
    assert torch.equal(steps[-1].x, od.sample(den, sigmas, x_init=x_init, sampler="ge"))
    # DDIM with σ_0 = 0 ends on its last denoised estimate (GE extrapolates ε instead)
    last = list(od.sample_iter(den, sigmas, x_init=x_init, sampler="ddim"))[-1]
    torch.testing.assert_close(last.x, last.x0_hat, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(steps[-1].x, steps[-1].x0_hat)


@pytest.mark.parametrize("sampler,kw", ALL_SAMPLERS, ids=SAMPLER_IDS)
def test_sample_iter_x0_hat_and_nfe_all_samplers(sampler, kw):
    calls = []

    class Counting(GaussianDenoiser):
        def forward(self, x, sigma, cond=None):
            calls.append(float(sigma))
            assert not torch.is_grad_enabled()  # samplers evaluate under no_grad
            return super().forward(x, sigma, cond)

    den, ref = Counting(G_MEAN, G_COV), GaussianDenoiser(G_MEAN, G_COV)
    for final_zero in [True, False]:
        calls.clear()
        sigmas = GRID.sample_sigmas(5, final_zero=final_zero)
        x_init = sigmas[0] * torch.randn(4, 3, generator=_gen(1), dtype=F64)
        x_t, n_steps = x_init, 0
        for st in od.sample_iter(den, sigmas, x_init=x_init, sampler=sampler, generator=_gen(2),
                                 **kw):
            assert torch.is_grad_enabled()  # grad mode is not left disabled in the caller
            # (the reverse SDE's state round-trips through VP coordinates: rounding only)
            torch.testing.assert_close(st.eps, ref(x_t, st.sigma), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(st.x0_hat, x_t - st.sigma * st.eps, rtol=1e-12, atol=1e-12)
            assert st.nfe == len(calls)
            if sampler == "heun":
                last_to_zero = final_zero and st.index == 4
                assert st.nfe == 2 * st.index + (1 if last_to_zero else 2)
            else:
                assert st.nfe == st.index + 1
            x_t, n_steps = st.x, n_steps + 1
        assert n_steps == 5
        assert calls[0] == float(sigmas[0])


def test_grad_mode_restored_after_early_stop():
    den, sigmas, x_init = _small_problem()
    for i, _ in enumerate(od.sample_iter(den, sigmas, x_init=x_init)):
        if i == 2:
            break
    assert torch.is_grad_enabled()
    with torch.no_grad():  # and a caller's no_grad is respected inside the loop
        for _ in od.sample_iter(den, sigmas, x_init=x_init):
            assert not torch.is_grad_enabled()


# --------------------------------------------------------------------------------------------
# guidance hook
# --------------------------------------------------------------------------------------------

class ZeroModel:
    input_shape = (2,)

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return torch.zeros_like(x)


class ConstantGuidance:
    """Score correction G constant in x and σ: eps_guided = eps − σ·G."""

    def __init__(self, G):
        self.G, self.calls, self.conds = G, 0, []

    def __call__(self, model, x, sigma, cond):
        self.calls += 1
        self.conds.append(cond)
        return model(x, sigma, cond) - sigma * self.G


G_VEC = torch.tensor([1.0, -2.0], dtype=F64)


def _guided(sampler, sigmas, x0, **kw):
    model, guide = ZeroModel(), ConstantGuidance(G_VEC)
    out = od.sample(model, torch.tensor(sigmas, dtype=F64), x_init=x0, sampler=sampler,
                    guidance=guide, cond="c", **kw)
    assert model.calls == guide.calls and set(guide.conds) == {"c"}
    return out, guide.calls


def test_guidance_by_hand_two_steps():
    x0 = torch.tensor([[0.5, 0.25], [-1.0, 2.0]], dtype=F64)
    s0, s1, s2 = 3.0, 1.0, 0.5
    G = G_VEC
    # DDIM: x ← x + (σ_next − σ)·(−σG)
    out, n = _guided("ddim", [s0, s1, s2], x0)
    x1 = x0 + (s0 - s1) * s0 * G
    torch.testing.assert_close(out, x1 + (s1 - s2) * s1 * G)
    assert n == 2
    # GE: second step averages the *guided* ε's: ebar = 2(−s1 G) − (−s0 G)
    out, n = _guided("ge", [s0, s1, s2], x0)
    torch.testing.assert_close(out, x1 - (s1 - s2) * (-2 * s1 * G + s0 * G))
    assert n == 2
    # Heun integrates dx/dσ = −σG exactly: x(σ) = x(σ_N) + (σ_N² − σ²)/2·G
    out, n = _guided("heun", [s0, s1, s2], x0)
    torch.testing.assert_close(out, x0 + (s0**2 - s2**2) / 2 * G)
    assert n == 4
    out, n = _guided("heun", [s0, s1, 0.0], x0)  # the last step to 0 is a plain Euler step
    torch.testing.assert_close(out, x0 + (s0**2 - s1**2) / 2 * G + s1 * s1 * G)
    assert n == 3
    # DPM-Solver++(2M) with D = x + σ²G (k-diffusion's formulation, λ = −log σ)
    out, n = _guided("dpmpp_2m", [s0, s1, s2], x0)
    h1, h2 = math.log(s0 / s1), math.log(s1 / s2)
    d0 = x0 + s0**2 * G
    y1 = (s1 / s0) * x0 - math.expm1(-h1) * d0
    d1 = y1 + s1**2 * G
    r = h1 / h2
    dbar = (1 + 1 / (2 * r)) * d1 - (1 / (2 * r)) * d0
    torch.testing.assert_close(out, (s2 / s1) * y1 - math.expm1(-h2) * dbar)
    assert n == 2
    # (γ, μ) with noise: the same draws, by hand
    gamma, mu = 1.5, 0.3
    out, n = _guided("gamma_mu", [s0, s1, s2], x0, gamma=gamma, mu=mu, generator=_gen(8))
    g = _gen(8)
    sp0 = (s1 / s0**mu) ** (1 / (1 - mu))
    y = x0 - (s0 - sp0) * (-s0 * G) + math.sqrt(s1**2 - sp0**2) * torch.randn(2, 2, generator=g,
                                                                              dtype=F64)
    sp1 = (s2 / s1**mu) ** (1 / (1 - mu))
    ebar = gamma * (-s1 * G) + (1 - gamma) * (-s0 * G)
    y = y - (s1 - sp1) * ebar + math.sqrt(s2**2 - sp1**2) * torch.randn(2, 2, generator=g, dtype=F64)
    torch.testing.assert_close(out, y)
    assert n == 2
    # reverse SDE (Euler–Maruyama in VP coordinates, OU time t = log(1 + σ²)); score = −eps/(√ᾱσ)
    out, n = _guided("reverse_sde", [s0, s1, s2], x0, generator=_gen(9))
    g = _gen(9)
    z = x0 / math.sqrt(1 + s0**2)
    for a, b in [(s0, s1), (s1, s2)]:
        h = math.log1p(a**2) - math.log1p(b**2)
        score = (a * G) * math.sqrt(1 + a**2) / a
        z = z + h * (0.5 * z + score) + math.sqrt(h) * torch.randn(2, 2, generator=g, dtype=F64)
    torch.testing.assert_close(out, z * math.sqrt(1 + s2**2))
    assert n == 2
    # ... and its last step to σ = 0 adds no noise
    out, n = _guided("reverse_sde", [s0, s1, 0.0], x0, generator=_gen(9))
    g = _gen(9)
    z = x0 / math.sqrt(1 + s0**2)
    for a, b in [(s0, s1), (s1, 0.0)]:
        h = math.log1p(a**2) - math.log1p(b**2)
        z = z + h * (0.5 * z + G * math.sqrt(1 + a**2))
        if b > 0:
            z = z + math.sqrt(h) * torch.randn(2, 2, generator=g, dtype=F64)
    torch.testing.assert_close(out, z)


@pytest.mark.parametrize("sampler,kw", ALL_SAMPLERS, ids=SAMPLER_IDS)
def test_every_sampler_calls_guidance(sampler, kw):
    sigmas = GRID.sample_sigmas(7, final_zero=True)
    x0 = sigmas[0] * torch.randn(3, 2, generator=_gen(0), dtype=F64)
    guided, n = _guided(sampler, sigmas.tolist(), x0, generator=_gen(1), **kw)
    plain = od.sample(ZeroModel(), sigmas, x_init=x0, sampler=sampler, generator=_gen(1), **kw)
    assert n == (13 if sampler == "heun" else 7)
    assert (guided - plain).abs().min() > 1e-3


# --------------------------------------------------------------------------------------------
# chunking
# --------------------------------------------------------------------------------------------

def test_chunk_size_same_result():
    seen = []

    def model(x, sigma, cond=None):
        seen.append(len(x))
        return torch.tanh(x) * 0.3 + cond[:, None] * 0.1 / (1 + sigma)

    sigmas = GRID.sample_sigmas(8, final_zero=True)
    x0 = sigmas[0] * torch.randn(20, 2, generator=_gen(0), dtype=F64)
    cond = torch.arange(20, dtype=F64)
    for sampler in ["ddpm", "heun"]:
        seen.clear()
        full = od.sample(model, sigmas, x_init=x0, cond=cond, sampler=sampler, generator=_gen(1))
        assert set(seen) == {20}
        seen.clear()
        chunked = od.sample(model, sigmas, x_init=x0, cond=cond, sampler=sampler,
                            generator=_gen(1), chunk_size=7)
        assert max(seen) == 7 and set(seen) == {7, 6}
        torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _plain(x, sigma, cond=None):
    return 0.1 * x


X2 = torch.zeros(3, 2, dtype=F64)


@pytest.mark.parametrize("sigmas,word", [
    ([1.0, 2.0, 0.0], "decreasing"),
    ([1.0, 1.0, 0.0], "decreasing"),
    ([1.0, float("nan"), 0.0], "finite"),
    ([float("inf"), 1.0, 0.0], "finite"),
    ([1.0], "at least 2"),
    ([], "at least 2"),
    ([[1.0, 0.5]], "1-D"),
    ([1.0, 0.5, -0.1], ">= 0"),
])
def test_bad_sigmas(sigmas, word):
    with pytest.raises(ValueError, match="sigmas") as err:
        od.sample(_plain, torch.tensor(sigmas, dtype=F64), x_init=X2)
    assert word in str(err.value)


@pytest.mark.parametrize("kw,word", [
    ({"sampler": "gamma_mu", "gamma": 0.0}, "gamma"),
    ({"sampler": "gamma_mu", "gamma": -1.0}, "gamma"),
    ({"sampler": "gamma_mu", "gamma": float("nan")}, "gamma"),
    ({"sampler": "gamma_mu", "mu": 1.0}, "mu"),
    ({"sampler": "gamma_mu", "mu": -0.1}, "mu"),
    ({"sampler": "gamma_mu", "mu": 1.5}, "mu"),
    ({"sampler": "euler"}, "sampler"),
    ({"sampler": "ddim", "gamma": 2.0}, "gamma"),
    ({"sampler": "ddim", "mu": 0.5}, "mu"),
    ({"sampler": "ddpm", "mu": 0.0}, "mu"),
    ({"sampler": "ge", "mu": 0.5}, "mu"),
    ({"sampler": "heun", "gamma": 1.5}, "gamma"),
    ({"sampler": "reverse_sde", "mu": 0.2}, "mu"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
])
def test_bad_sampler_arguments(kw, word):
    with pytest.raises(ValueError, match=word):
        od.sample(_plain, torch.tensor([1.0, 0.5, 0.0], dtype=F64), x_init=X2, **kw)


def test_bad_initial_point_and_model_output():
    sig = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="batch_size"):
        od.sample(_plain, sig)  # a plain function and neither x_init nor batch_size
    with pytest.raises(ValueError, match="input_shape"):
        od.sample(_plain, sig, batch_size=4)  # a plain function has no input_shape
    with pytest.raises(ValueError, match="batch_size"):
        od.sample(GaussianDenoiser(G_MEAN, G_COV), sig, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        od.sample(_plain, sig, x_init=X2, batch_size=5)
    with pytest.raises(ValueError, match="x_init"):
        od.sample(_plain, sig, x_init=torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        od.sample(lambda x, s, c=None: x[:, :1], sig, x_init=X2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        od.sample(lambda x, s, c=None: x * float("nan"), sig, x_init=X2 + 1)
    with pytest.raises(FloatingPointError):
        od.sample(_plain, sig, x_init=X2, guidance=lambda m, x, s, c: x / 0.0 + 1)


def test_the_default_sampler_is_ge_as_the_command_line():
    den, sigmas, x_init = _small_problem()
    assert torch.equal(od.sample(den, sigmas, x_init=x_init),
                       od.sample(den, sigmas, x_init=x_init, sampler="ge"))
    # a given γ or μ picks a point of the (γ, μ) family instead
    assert torch.equal(od.sample(den, sigmas, x_init=x_init, gamma=1.5),
                       od.sample(den, sigmas, x_init=x_init, sampler="gamma_mu", gamma=1.5))
    assert not torch.equal(od.sample(den, sigmas, x_init=x_init, gamma=1.5),
                           od.sample(den, sigmas, x_init=x_init))


def test_autocast_sampling_keeps_the_state_dtype_and_stays_close():
    """bf16 autocast of a network's evaluations: the sampler's state stays float32 and the samples
    move by about bf16's resolution, not more."""
    torch.manual_seed(0)
    net = od.models.TimeMLP(2, hidden=32, depth=2, emb_dim=8)
    sig = od.LogLinearSchedule().sample_sigmas(8, final_zero=True)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 10
    a = od.sample(net, sig, x_init=x0)
    b = od.sample(net, sig, x_init=x0, precision="bf16")
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        od.sample(net, sig, x_init=x0, precision="int8")
