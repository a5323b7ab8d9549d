"""The log-density of a trained diffusion model, up to a constant, from its denoising loss.

For the VE process ``x_σ = x + σ·ε`` and an ε-model ``ε̂(x_σ, σ)``, the variational bound of
Kingma, Salimans, Poole & Ho (NeurIPS 2021, "Variational diffusion models", eq. (17) in its
continuous-time form) written in ``λ = −log SNR = 2 log σ`` is, apart from x-independent prior
and reconstruction terms,

    −log p(x) ≲ ½ ∫ E_ε ‖ε − ε̂(x + σε, σ)‖² dλ = ∫ E_ε ‖ε − ε̂(x + σε, σ)‖² d log σ,

with equality (up to the constant) for the exact denoiser when σ runs over (0, ∞): for
``x ~ N(μ, s²)`` per coordinate the integrand is ``(d·s⁴ + σ²‖x − μ‖²)/(s² + σ²)²`` and
``∫ σ‖x − μ‖²/(s² + σ²)² dσ = ‖x − μ‖²/(2s²)``, the Gaussian's negative log-density.
:func:`log_density` evaluates the right-hand side by the trapezoid rule on ``levels`` values of
log σ uniform in ``[log σ_min, log σ_max]`` with ``draws`` antithetic pairs ``±ε`` per level; the
noise is drawn once from ``seed`` and shared by every ``x`` (common random numbers), so the
estimate is a deterministic function of ``x``. For the exact Gaussian denoiser the error
``ε − ε̂`` is affine in ε: the pairs cancel its x-dependent linear part and the shared noise its
x-independent quadratic part, so differences between designs are exact up to the quadrature.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import rng

__all__ = ["log_density"]


def log_density(model: nn.Module, x: Tensor, *, sigma_min: float = 0.01,
                sigma_max: float = 20.0, levels: int = 16, draws: int = 1, seed: int = 0,
                cond: Any = None, chunk_size: int = 4096) -> Tensor:
    """``−∫ E‖ε − ε̂(x + σε, σ)‖² d log σ`` per row of ``x`` (B, *dims): log p(x) up to an
    x-independent constant (see the module docstring); float64 (B,). ``cond`` (a number, NaN for
    a null condition, or None) is passed to the model as a 0-d tensor shared by the batch;
    ``chunk_size`` noisy rows go through the model at once (the rows are independent, so it sets
    only speed and memory: 4096 keeps an MLP's activations in cache)."""
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    for name, v in (("levels", levels), ("draws", draws), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "levels" else 1):
            raise ValueError(f"{name} must be an int >= {2 if name == 'levels' else 1}, "
                             f"got {name}={v!r}")
    g = rng.generator(rng.derive_seed("optidiff.log_density", seed))
    log_s = torch.linspace(math.log(sigma_min), math.log(sigma_max), levels, dtype=torch.float64)
    w = torch.full((levels,), float(log_s[1] - log_s[0]), dtype=torch.float64)
    w[0] = w[-1] = w[0] / 2  # trapezoid rule in log σ
    eps = torch.randn((levels, draws, *x.shape[1:]), generator=g)
    eps = torch.cat([eps, -eps], dim=1)  # antithetic pairs
    out = torch.zeros(len(x), dtype=torch.float64)
    c = None if cond is None else torch.tensor(float(cond))
    chunk = max(1, chunk_size // (2 * draws))
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            xc = x[i:i + chunk].float()
            n = len(xc)
            for k in range(levels):
                s = float(log_s[k].exp())
                e = eps[k].unsqueeze(1).expand(2 * draws, *xc.shape).reshape(-1, *xc.shape[1:])
                xs = xc.repeat(2 * draws, *([1] * (xc.ndim - 1))) + s * e
                err = ((model(xs, torch.tensor(s), cond=c).float() - e) ** 2).flatten(1).sum(1)
                out[i:i + n] -= w[k] * err.double().view(2 * draws, n).mean(0)
    return out
