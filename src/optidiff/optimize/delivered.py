"""The delivered fraction of a guided round, the plateau it implies, and the corrected target rule.

Algorithm 1 of Guo, Yuan, Yang, Chen & Wang (NeurIPS 2024) draws every round from fresh noise: round
k+1 is a guided sample of the *pre-trained* model, asked for ``gₖᵀx = yₖ``. How much of the
requested shift a round delivers decides where the iteration stops.

**Delivered fraction** (centred form). With x̄0 the mean of the pre-trained model (estimated by the
mean z̄₀ of the unguided round 0) and per-sample gradients g_i and targets y_i of round k (or one
g, y at the batch mean, where z_i is replaced by z̄)::

    rₖ = Σ_i g_iᵀ(z_{k+1,i} − z̄₀) / Σ_i (y_i − g_iᵀz̄₀),

the shift realised along g over the shift requested, both from the prior mean (mean-zero data:
rₖ = gᵀz̄ₖ₊₁ / yₖ). Assumptions: the delivered shift is proportional to the requested one (exact
for a linear-Gaussian model, whose guided rounds are affine in y) and g changes little between
rounds (f locally linear).

**Exact fraction.** For an exact Gaussian prior N(x̄0, Σ) and ``y = gᵀx0 + N(0, σ_y²)`` (the model
of Lemma 1), the guided round samples the posterior, of mean
x̄0 + Σg·(y − gᵀx̄0)/(σ_y² + gᵀΣg), so it delivers ρ = gᵀΣg/(σ_y² + gᵀΣg); here gᵀΣg is
estimated from the unguided round-0 samples (unbiased sample covariance), a property of the
model's own distribution, not of its guided response.

**Plateau.** Write sₖ = gᵀ(z̄ₖ − x̄0). The increment rule asks yₖ − gᵀx̄0 = sₖ + δ, so
sₖ₊₁ = r·(sₖ + δ), whose fixed point is s* = δ·r/(1 − r) (for 0 < r < 1; none for r ≥ 1). To first
order about round k's samples, f(z*) ≈ f(zₖ) + gᵀ(z* − zₖ), so the mean reward stalls at
Rₖ + s* − sₖ, Rₖ the round's mean reward (``plateau``; for a linear f this is R₀ + δ·r/(1 − r),
R₀ the mean reward of round 0; the error is second order in the distance to the fixed point, so
it vanishes as the run settles). For the exact model r = ρ and s* = δ·gᵀΣg/σ_y², the linearised x_λ* with
λ = σ_y²/δ (Guo et al.'s fixed point): a network with r < ρ stalls short of it.

**Corrected target rule** (beyond the paper). Ask for the target whose delivered part is what an
exact model would deliver for the plain target y_plain::

    yᵢ = g_iᵀz̄₀ + cᵢ·(y_plain,i − g_iᵀz̄₀),   cᵢ = clip(ρᵢ / r_{k−1}, 1, c_max),

with r_{k−1} the delivered fraction measured in the previous round (cᵢ = 1 in the first guided
round, and c_max when r_{k−1} ≤ 0; never below 1: when r ≈ ρ ≈ 1 the plateau δ·r/(1 − r) is so
sensitive to r that the ~1 % error of ρ estimated from B unguided samples, let shrink the target,
costs more than it corrects). Then sₖ₊₁ = r·c·(sₖ + δ) ≈ ρ·(sₖ + δ): the exact model's
iteration, converging to x_λ*. When the model delivers what the exact model would (r = ρ), c = 1
and the rule is the plain one. (Dividing δ by r alone, y = gᵀz̄ + δ/r, has the fixed point
δ/(1 − r): it gains only a factor 1/r and still stalls for small r.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["corrected_targets", "delivered_fraction", "exact_fraction", "implied_plateau", "ratio",
           "shifts"]


def _rows(g: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(G, Z) flattened to (n, D): per-sample g with the samples, or one g with the batch mean."""
    zf = z.detach().flatten(1).double()
    gf = g.detach().double()
    if gf.ndim == z.ndim:               # per sample (B, *dims)
        return gf.flatten(1), zf
    return gf.reshape(1, -1), zf.mean(0, keepdim=True)


def shifts(g: Tensor, y: Tensor, z_next: Tensor, z0: Tensor) -> tuple[Tensor, Tensor]:
    """(delivered g_iᵀ(z_{k+1,i} − z̄₀), requested y_i − g_iᵀz̄₀), each (n,): n = B for
    per-sample g, 1 for a shared g (then z_{k+1} is the batch mean)."""
    G, Z = _rows(g, z_next)
    base = G @ z0.detach().flatten(1).double().mean(0)
    return (G * Z).sum(1) - base, y.detach().double().reshape(-1) - base


def ratio(num: Tensor, den: Tensor) -> float | None:
    """Σ num / Σ den, ``None`` when Σ den = 0."""
    d = den.sum()
    return None if d == 0 else (num.sum() / d).item()


def delivered_fraction(g: Tensor, y: Tensor, z_next: Tensor, z0: Tensor) -> float | None:
    """rₖ = Σ g_iᵀ(z_{k+1,i} − z̄₀) / Σ (y_i − g_iᵀz̄₀) (module docstring); ``None`` when the
    requested shift is zero."""
    return ratio(*shifts(g, y, z_next, z0))


def exact_fraction(g: Tensor, z0: Tensor, noise_std: float) -> Tensor:
    """ρ_i = q_i/(σ_y² + q_i), q_i = g_iᵀΣ̂₀g_i with Σ̂₀ the sample covariance of the unguided
    round ``z0``: the fraction an exact Gaussian model delivers (module docstring). (n,) with n = B
    for per-sample g, 1 for a shared g."""
    x = z0.detach().flatten(1).double()
    xc = x - x.mean(0)
    G = g.detach().double().flatten(1) if g.ndim == z0.ndim else g.detach().double().reshape(1, -1)
    q = (G @ xc.T).pow(2).sum(1) / max(1, len(x) - 1)
    return q / (noise_std**2 + q)


def implied_plateau(r: float | None, increment: float, base: float) -> float | None:
    """base + δ·r/(1 − r): with base = Rₖ − sₖ (R₀ for a linear f), the mean reward at which the
    increment rule stalls when every round delivers the fraction r (module docstring); ``None``
    without a fixed point (r ≤ 0 or r ≥ 1)."""
    if r is None or not math.isfinite(r) or not 0 < r < 1:
        return None
    return base + increment * r / (1 - r)


def corrected_targets(g: Tensor, y_plain: Tensor, z0: Tensor, rho: Tensor, r_prev: float | None,
                      max_correction: float) -> tuple[Tensor, float]:
    """(y, mean c) of the corrected rule ``y = gᵀz̄₀ + c·(y_plain − gᵀz̄₀)``, ``c = clip(ρ/r_prev,
    1, c_max)`` (module docstring; c = 1 without a previous round)."""
    if r_prev is None:
        return y_plain, 1.0
    G = g.detach().flatten(1) if g.ndim == z0.ndim else g.detach().reshape(1, -1)
    base = (G.double() @ z0.detach().flatten(1).double().mean(0)).to(y_plain.dtype)
    if r_prev > 0:
        c = (rho / r_prev).clamp(1.0, max_correction)
    else:
        c = torch.full_like(rho, max_correction)
    c = c.to(y_plain.dtype)
    y = base.reshape(y_plain.shape) + c.reshape(y_plain.shape) * (y_plain - base.reshape(y_plain.shape))
    return y, c.mean().item()
