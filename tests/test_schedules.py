"""Schedules and conversions, checked against diffusers' schedulers and closed-form formulas.

diffusers builds its β tables and ``alphas_cumprod`` in float32; the references below say which
float32 error each tolerance absorbs.
"""

from __future__ import annotations

import math

import diffusers  # a dev dependency: the reference implementation
import numpy as np
import pytest
import torch

import optidiff as od
from optidiff import schedules as S

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
CONFIGS = [(1000, 1e-4, 0.02), (100, 0.01, 0.02), (659, 0.001, 0.02)]
BETA_SCHEDULES = {
    "linear": lambda n, b0, b1: od.DDPMSchedule(n, b0, b1),
    "scaled_linear": lambda n, b0, b1: od.LDMSchedule(n, b0, b1),
    "squaredcos_cap_v2": lambda n, b0, b1: od.CosineSchedule(n),
    "sigmoid": lambda n, b0, b1: od.SigmoidSchedule(n, b0, b1),
}


def _ddpm_scheduler(n, b0, b1, name):
    return diffusers.DDPMScheduler(num_train_timesteps=n, beta_start=b0, beta_end=b1,
                                   beta_schedule=name)


# --------------------------------------------------------------------------------------------
# σ tables against diffusers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BETA_SCHEDULES))
@pytest.mark.parametrize("n,b0,b1", CONFIGS)
def test_sigma_table_matches_diffusers(name, n, b0, b1):
    ref = _ddpm_scheduler(n, b0, b1, name)
    sched = BETA_SCHEDULES[name](n, b0, b1)
    assert len(sched) == n and sched.sigmas.dtype == F64

    # 1. β: diffusers rounds each β to float32 (relative error <= 2^-24, 2^-23 after squaring).
    torch.testing.assert_close(sched.betas, ref.betas.to(F64), rtol=1e-6, atol=0)

    # 2. ᾱ: diffusers' float32 cumprod accumulates ~n·2^-24 relative error (1.3e-5 seen for cosine).
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod.to(F64), rtol=3e-5, atol=0)

    # 3. σ = √((1 − ᾱ)/ᾱ) with diffusers' ᾱ. Near ᾱ ≈ 1 the float32 ᾱ loses digits of 1 − ᾱ,
    #    so σ inherits ½·δᾱ/(ᾱ(1 − ᾱ)) relative error: the tolerance scales with 1/(1 − ᾱ).
    abar = ref.alphas_cumprod.to(F64)
    sigma_ref = ((1 - abar) / abar).sqrt()
    tol = 3e-5 * sigma_ref / (1 - abar)
    assert ((sched.sigmas - sigma_ref).abs() <= tol).all()

    # 4. The same σ with diffusers' ᾱ recomputed in float64 from its β (its own recipe
    #    ᾱ = ∏(1 − β) without float32 accumulation): tight, including the smallest σ.
    abar64 = torch.cumprod(1 - ref.betas.to(F64), dim=0)
    torch.testing.assert_close(sched.sigmas, ((1 - abar64) / abar64).sqrt(), rtol=1e-5, atol=0)


def test_default_ddpm_range_matches_paper_table():
    # smalldiffusion's DDPM linear schedule: σ from 0.0100 to 157.4; its 10-step grid.
    sched = od.DDPMSchedule()
    assert sched.sigmas[0].item() == pytest.approx(0.0100, abs=5e-5)
    assert sched.sigmas[-1].item() == pytest.approx(157.4, abs=0.05)
    grid = sched.sample_sigmas(10)
    expected = [157.4, 60.3, 25.5, 11.9, 6.14, 3.42, 2.03, 1.23, 0.72, 0.34, 0.01]
    for got, want in zip(grid.tolist(), expected):
        assert got == pytest.approx(want, rel=0.01, abs=0.005)


# --------------------------------------------------------------------------------------------
# sampling grids against DDIMScheduler(timestep_spacing="trailing")
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_train", [1000, 659])
def test_sample_sigmas_trailing_matches_ddim(n_train):
    sched = od.DDPMSchedule(n_train)
    for steps in range(1, 100):
        grid = sched.sample_sigmas(steps)
        grid0 = sched.sample_sigmas(steps, final_zero=True)
        assert grid.shape == (steps + 1,) and grid0.shape == (steps + 1,)
        assert (grid[1:] < grid[:-1]).all() and (grid0[1:] < grid0[:-1]).all()
        assert grid[-1] == sched.sigmas[0]          # ends at σ_min (set_alpha_to_one=False)
        assert grid0[-1].item() == 0.0               # exactly 0
        torch.testing.assert_close(grid0[:-1], grid[:-1], rtol=0, atol=0)
        assert grid[0] == sched.sigmas[-1]           # trailing spacing starts at σ_max

        ddim = diffusers.DDIMScheduler(num_train_timesteps=n_train, timestep_spacing="trailing")
        ddim.set_timesteps(steps)
        ts = ddim.timesteps
        if n_train % steps == 0:
            assert len(ts) == steps
            torch.testing.assert_close(grid[:-1], sched.sigmas[ts], rtol=0, atol=0)
        else:
            # diffusers builds the grid with np.arange over a float step, which can add an entry
            # or round a tie the other way. The grid must still be the table at indices within
            # rounding of Lin et al.'s N(1 − k/steps) − 1, and within one index of diffusers'.
            pos = torch.searchsorted(sched.sigmas, grid[:-1])
            torch.testing.assert_close(sched.sigmas[pos], grid[:-1], rtol=0, atol=0)
            exact = torch.tensor([n_train * (1 - k / steps) - 1 for k in range(steps)], dtype=F64)
            assert ((pos - exact).abs() <= 0.5 + 1e-9).all()
            m = min(len(ts), steps)
            assert (ts[:m] - pos[:m]).abs().max() <= 1


def test_trailing_indices_formula():
    assert S.trailing_indices(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert S.trailing_indices(10, 10) == list(range(9, -1, -1))
    assert S.trailing_indices(7, 1) == [6]


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_sample_sigmas_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        od.DDPMSchedule(1000).sample_sigmas(steps)


# --------------------------------------------------------------------------------------------
# conversions (float64, exact up to rounding)
# --------------------------------------------------------------------------------------------

SIGMAS = torch.tensor([1e-3, 0.02, 0.5, 1.0, 3.0, 80.0, 157.0], dtype=F64)


def test_sigma_alpha_bar_conversion():
    abar = S.sigma_to_alpha_bar(SIGMAS)
    torch.testing.assert_close(abar, 1 / (1 + SIGMAS**2), rtol=1e-15, atol=0)
    # σ² = (1 − ᾱ)/ᾱ, written from the definition x = z/√ᾱ, z = √ᾱ x0 + √(1−ᾱ) ε
    torch.testing.assert_close(S.alpha_bar_to_sigma(abar), SIGMAS, rtol=1e-9, atol=0)
    for a in [0.9999, 0.5, 1e-4]:
        s = S.alpha_bar_to_sigma(torch.tensor(a, dtype=F64)).item()
        assert s == pytest.approx(math.sqrt((1 - a) / a), rel=1e-12)
    torch.testing.assert_close(S.vp_scale(SIGMAS), abar.sqrt(), rtol=1e-14, atol=0)


def test_ou_time_conversion():
    t = S.sigma_to_ou_time(SIGMAS)
    # ᾱ = e^{−t}: α(t) = e^{−t/2}, h(t) = 1 − e^{−t} = σ²ᾱ
    torch.testing.assert_close(torch.exp(-t), S.sigma_to_alpha_bar(SIGMAS), rtol=1e-13, atol=0)
    torch.testing.assert_close(-torch.expm1(-t), SIGMAS**2 / (1 + SIGMAS**2), rtol=1e-13, atol=0)
    torch.testing.assert_close(S.ou_time_to_sigma(t), SIGMAS, rtol=1e-12, atol=0)
    ts = torch.tensor([1e-6, 0.1, 1.0, 5.0], dtype=F64)
    torch.testing.assert_close(S.ou_time_to_sigma(ts), torch.tensor(
        [math.sqrt(math.exp(v) - 1) for v in ts.tolist()], dtype=F64), rtol=1e-9, atol=0)


def test_sigmas_from_betas_by_loop():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=F64)
    prod, ref = 1.0, []
    for b in betas.tolist():
        prod *= 1 - b
        ref.append(math.sqrt(1 / prod - 1))
    torch.testing.assert_close(S.sigmas_from_betas(betas), torch.tensor(ref, dtype=F64),
                               rtol=1e-12, atol=0)


def test_karras_formula():
    smin, smax, rho, n = 0.002, 80.0, 7.0, 40
    sched = od.KarrasSchedule(smin, smax, rho, n)
    # EDM eq. 5 as written there (decreasing in i), then reversed to the increasing training table
    i = np.arange(n)
    edm = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    torch.testing.assert_close(sched.sigmas, torch.from_numpy(edm[::-1].copy()), rtol=1e-12, atol=0)
    assert sched.sigmas[0].item() == pytest.approx(smin, rel=1e-12)
    assert sched.sigmas[-1].item() == pytest.approx(smax, rel=1e-12)


def test_log_linear_constant_ratio():
    sched = od.LogLinearSchedule(0.02, 10.0, 1000)
    s = sched.sigmas
    assert s[0].item() == pytest.approx(0.02, rel=1e-12)
    assert s[-1].item() == pytest.approx(10.0, rel=1e-12)
    ratio = s[1:] / s[:-1]
    expected = (10.0 / 0.02) ** (1 / 999)
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-10, atol=0)
    # the DDIM step size 1 − σ_{t−1}/σ_t is constant on a trailing grid whose stride divides n
    grid = sched.sample_sigmas(10)[:-1]
    step = 1 - grid[1:] / grid[:-1]
    torch.testing.assert_close(step, torch.full_like(step, 1 - expected**-100), rtol=1e-9, atol=0)


def test_alphas_cumprod_property_and_repr():
    sched = od.LogLinearSchedule(0.1, 5.0, 7)
    torch.testing.assert_close(sched.alphas_cumprod, 1 / (1 + sched.sigmas**2))
    assert "LogLinearSchedule" in repr(sched) and "n=7" in repr(sched)


# --------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,word", [
    (lambda: od.LogLinearSchedule(0.0, 10.0, 100), "sigma_min"),
    (lambda: od.LogLinearSchedule(-1.0, 10.0, 100), "sigma_min"),
    (lambda: od.LogLinearSchedule(10.0, 1.0, 100), "sigma_max"),
    (lambda: od.LogLinearSchedule(0.1, float("inf"), 100), "sigma_max"),
    (lambda: od.LogLinearSchedule(float("nan"), 1.0, 100), "sigma_min"),
    (lambda: od.LogLinearSchedule(0.1, 1.0, 1), "n"),
    (lambda: od.LogLinearSchedule(0.1, 1.0, 10.5), "n"),
    (lambda: od.KarrasSchedule(0.002, 80.0, 0.0), "rho"),
    (lambda: od.KarrasSchedule(0.002, 80.0, -7.0), "rho"),
    (lambda: od.KarrasSchedule(80.0, 0.002), "sigma_min"),
    (lambda: od.DDPMSchedule(1), "n"),
    (lambda: od.DDPMSchedule(100, 0.5, 1.5), "beta"),
    (lambda: od.DDPMSchedule(100, 0.0, 0.02), "beta"),
    (lambda: od.CosineSchedule(0), "n"),
    (lambda: od.SigmoidSchedule(1), "n"),
    (lambda: S.Schedule(torch.tensor([1.0, 0.5, 2.0])), "sigmas"),
    (lambda: S.Schedule(torch.tensor([1.0])), "sigmas"),
    (lambda: S.Schedule(torch.tensor([0.0, 1.0])), "sigmas"),
    (lambda: S.Schedule(torch.tensor([0.1, float("nan")])), "sigmas"),
])
def test_bad_arguments_raise(make, word):
    with pytest.raises(ValueError, match=word):
        make()
