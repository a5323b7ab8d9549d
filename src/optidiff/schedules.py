"""Noise schedules in variance-exploding σ coordinates, and conversions between conventions.

Every schedule is a table of training noise levels ``sigmas`` (increasing with the training index,
length ``n``) plus ``sample_sigmas(steps)``, the decreasing grid a sampler walks. The conversions
below are the only place where VP (DDPM) quantities meet σ (Permenter & Yuan, ICML 2024, §2):

    x = x0 + σ·ε  (VE)      z = √ᾱ·x0 + √(1−ᾱ)·ε  (VP)      σ² = (1 − ᾱ)/ᾱ,   z = x/√(1+σ²).

The seeds' Ornstein–Uhlenbeck time t (the Wang & Chen tutorial, ``dX = −½X dt + dW``) has ᾱ = e^{−t}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "CosineSchedule",
    "DDPMSchedule",
    "KarrasSchedule",
    "LDMSchedule",
    "LogLinearSchedule",
    "Schedule",
    "SigmoidSchedule",
    "alpha_bar_to_sigma",
    "ou_time_to_sigma",
    "sigma_to_alpha_bar",
    "sigma_to_ou_time",
    "sigmas_from_betas",
    "trailing_indices",
    "vp_scale",
]


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """ᾱ = 1/(1 + σ²)."""
    return 1.0 / (1.0 + sigma**2)


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """σ = √((1 − ᾱ)/ᾱ)."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_ou_time(sigma: Tensor) -> Tensor:
    """OU time of the Wang & Chen tutorial: ᾱ = e^{−t}, so t = log(1 + σ²)."""
    return torch.log1p(sigma**2)


def ou_time_to_sigma(t: Tensor) -> Tensor:
    """σ = √(e^{t} − 1), the inverse of :func:`sigma_to_ou_time`."""
    return torch.expm1(t).sqrt()


def vp_scale(sigma: Tensor) -> Tensor:
    """√ᾱ = 1/√(1+σ²): the factor that maps VE x to the VP network input z = √ᾱ·x."""
    return (1.0 + sigma**2).rsqrt()


def sigmas_from_betas(betas: Tensor) -> Tensor:
    """σ = √(1/∏(1 − β) − 1) for a DDPM β schedule (Permenter & Yuan (ICML 2024) / smalldiffusion)."""
    return (1.0 / torch.cumprod(1.0 - betas, dim=0) - 1.0).sqrt()


def trailing_indices(n: int, steps: int) -> list[int]:
    """Trailing timestep spacing of Lin et al. 2023 (Table 2): ``round(n·(1 − k/steps)) − 1``.

    Identical to diffusers' ``timestep_spacing="trailing"``: ``round(arange(n, 0, −n/steps)) − 1``.
    """
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}] for a schedule of n={n}, got steps={steps}")
    return [int(round(n - k * n / steps)) - 1 for k in range(steps)]


class Schedule:
    """A table of training noise levels ``sigmas`` (float64, increasing, length n)."""

    def __init__(self, sigmas: Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape "
                             f"{tuple(sigmas.shape)}")
        if not torch.isfinite(sigmas).all() or (sigmas <= 0).any():
            raise ValueError("sigmas must be finite and positive")
        if (sigmas[1:] <= sigmas[:-1]).any():
            raise ValueError("sigmas must be strictly increasing with the training index")
        s32 = sigmas.float() ** 2
        if not (torch.isfinite(s32).all() and (s32 > 0).all()):
            raise ValueError(f"sigmas from {sigmas[0].item():.3g} to {sigmas[-1].item():.3g}: σ² "
                             "must be finite and non-zero in float32, the samplers' default "
                             "dtype")
        self.sigmas = sigmas

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ of each training index, for VP networks trained on this schedule."""
        return sigma_to_alpha_bar(self.sigmas)

    def sample_sigmas(self, steps: int, *, final_zero: bool = False) -> Tensor:
        """Decreasing tensor of ``steps + 1`` σ's with trailing spacing.

        The first ``steps`` entries are ``sigmas[trailing_indices(n, steps)]``; the last is σ_min
        (as smalldiffusion and diffusers' DDIM with ``set_alpha_to_one=False``) or, with
        ``final_zero=True``, exactly 0 so that the sampler ends on the denoised estimate x0_hat.
        """
        idx = trailing_indices(len(self), steps)
        last = torch.zeros(1, dtype=torch.float64) if final_zero else self.sigmas[:1]
        return torch.cat([self.sigmas[idx], last])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, sigma_min={self.sigmas[0].item():.4g}, "
                f"sigma_max={self.sigmas[-1].item():.4g})")


def _check_n(n: int) -> int:
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got n={n!r}")
    return n


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")


class LogLinearSchedule(Schedule):
    """σ geometrically spaced (Permenter & Yuan, ICML 2024 §4): a constant DDIM step size 1 − σ_{t−1}/σ_t."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 10.0, n: int = 1000):
        _check_range(sigma_min, sigma_max)
        super().__init__(torch.logspace(math.log10(sigma_min), math.log10(sigma_max),
                                        _check_n(n), dtype=torch.float64))


class _BetaSchedule(Schedule):
    def __init__(self, betas: Tensor):
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        super().__init__(sigmas_from_betas(betas))


class DDPMSchedule(_BetaSchedule):
    """DDPM linear β (Ho et al. 2020): β = linspace(β_start, β_end, n); σ from 0.0100 to 157.4."""

    def __init__(self, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__(torch.linspace(beta_start, beta_end, _check_n(n), dtype=torch.float64))


class LDMSchedule(_BetaSchedule):
    """Latent/Stable Diffusion "scaled_linear" β: β = linspace(√β_start, √β_end, n)²."""

    def __init__(self, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        super().__init__(torch.linspace(beta_start**0.5, beta_end**0.5, _check_n(n),
                                        dtype=torch.float64) ** 2)


class CosineSchedule(_BetaSchedule):
    """Cosine schedule of Nichol & Dhariwal 2021 (diffusers' ``squaredcos_cap_v2``).

    ᾱ(t) = cos²((t + s)/(1 + s)·π/2), β_i = min(1 − ᾱ((i+1)/n)/ᾱ(i/n), max_beta).
    """

    def __init__(self, n: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        t = torch.arange(_check_n(n) + 1, dtype=torch.float64) / n
        abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        super().__init__((1 - abar[1:] / abar[:-1]).clamp(max=max_beta))


class SigmoidSchedule(_BetaSchedule):
    """Sigmoid β of GeoDiff (Xu et al. 2022; diffusers' DDPM ``sigmoid``)."""

    def __init__(self, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        x = torch.linspace(-6, 6, _check_n(n), dtype=torch.float64)
        super().__init__(torch.sigmoid(x) * (beta_end - beta_start) + beta_start)


class KarrasSchedule(Schedule):
    """EDM schedule (Karras et al. 2022, eq. 5): σ_i = (σ_min^{1/ρ} + i/(n−1)(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 n: int = 1000):
        _check_range(sigma_min, sigma_max)
        if not rho > 0:
            raise ValueError(f"rho must be positive, got rho={rho}")
        ramp = torch.linspace(0, 1, _check_n(n), dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        super().__init__((lo + ramp * (hi - lo)) ** rho)
