"""Closed-form references of Guo et al.'s optimization theorems (for tests and benchmarks).

- :func:`increment_to_lambda`: λ = σ_y²/δ, the regularization strength of the fixed point of
  Algorithm 1 with the increment rule ``y = gᵀz̄ + δ`` and the Lemma-1 step size on Gaussian data
  (derived in :mod:`optidiff.optimize.gradient_guided`).
- :func:`regularized_optimum`: x_λ* = argmax f(x) − (λ/2)‖x − x̄0‖²_{Σ̄0⁺} over x̄0 + range(Σ̄0)
  (Guo et al.'s Theorem 2; the pseudo-inverse and the restriction to range(Σ̄0) make it the subspace
  version for singular Σ̄0 = AAᵀ), by damped Newton in the whitened coordinates x = x̄0 + Σ̄0^{½}u.
- :func:`lookahead_mean_map`: the batch-mean map of Algorithm 1 on a Gaussian prior N(m, Σ) when
  each guided round samples the exact posterior (Lemma 1):
  ``M(z) = m + Σg·(gᵀ(z − m) + δ)/(σ_y² + gᵀΣg)`` with g = ∇f(z). Its fixed point is x_λ*.
- :func:`mean_map_rate`: the spectral radius of ∂M/∂z at x_λ*, the asymptotic linear rate of the
  batch-mean iterates (ρ < 1: linear convergence; ρ > 1: the iteration leaves x_λ*). Writing
  S = Σ^{½}(−∇²f)Σ^{½} (L = its largest eigenvalue, Guo et al.'s smoothness in the Σ̄0 metric),
  directions orthogonal to Σ^{½}g contract by about L/λ, Guo et al.'s rate λ(L/λ)^K; the direction
  of g itself contracts only by about 1 − σ_y²(1 + L/λ)/(σ_y² + gᵀΣg) (derived here from the
  formula for M), close to 1 when ‖∇f(x_λ*)‖_Σ ≫ σ_y: then each round raises gᵀz̄ by at most δ
  and the approach is slow (tests stay inside the regime where it contracts).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "increment_to_lambda",
    "lookahead_mean_map",
    "mean_map_rate",
    "regularized_optimum",
    "whitening",
]

Fn = Callable[[Tensor], Tensor]


def increment_to_lambda(increment: float, noise_std: float) -> float:
    """λ = σ_y²/δ (derived in :mod:`optidiff.optimize.gradient_guided`)."""
    if not (increment > 0 and noise_std > 0):
        raise ValueError(f"need increment > 0 and noise_std > 0, got {increment}, {noise_std}")
    return noise_std**2 / increment


def whitening(cov: Tensor, tol: float = 1e-10) -> Tensor:
    """R (D, r) with RRᵀ = Σ and orthogonal columns spanning range(Σ) (eigenvalues > tol·max)."""
    lam, u = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
    keep = lam > tol * lam.max().clamp(min=1e-300)
    return u[:, keep] * lam[keep].sqrt()


def _value(f: Fn, x: Tensor) -> Tensor:
    v = f(x.unsqueeze(0))
    return v.reshape(())


def regularized_optimum(f: Fn, mean: Tensor, cov: Tensor, lam: float, *,
                        tol: float = 1e-12, max_iter: int = 200) -> Tensor:
    """x_λ* = argmax_{x ∈ x̄0 + range(Σ)} f(x) − (λ/2)(x − x̄0)ᵀΣ⁺(x − x̄0), for concave f.

    With x = x̄0 + R·u (RRᵀ = Σ, :func:`whitening`) the problem is max_u φ(u) = f(x̄0 + Ru) −
    (λ/2)‖u‖², strongly concave; damped Newton steps ``u ← u − t·(∇²φ)⁻¹∇φ`` (autograd Hessian,
    backtracking on φ) until ‖∇φ‖ < tol·max(1, ‖λu‖). ``f`` maps (B, D) -> (B,) and is evaluated in
    float64 (it may be an :class:`~optidiff.optimize.Objective`'s ``fn``; no queries are counted).
    Also valid for λ → 0 (the in-subspace optimum) when f has a maximiser on the subspace.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got lam={lam!r}")
    mean = torch.as_tensor(mean, dtype=torch.float64)
    R = whitening(cov)

    def phi(u: Tensor) -> Tensor:
        return _value(f, mean + R @ u) - 0.5 * lam * (u * u).sum()

    u = torch.zeros(R.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        grad = torch.autograd.functional.jacobian(phi, u)
        if grad.norm() < tol * max(1.0, (lam * u).norm().item(), 1.0):
            break
        hess = torch.autograd.functional.hessian(phi, u)
        hess = (hess + hess.T) / 2
        # a concave φ has a negative definite Hessian; regularize a flat direction (λ = 0)
        eig_max = torch.linalg.eigvalsh(hess).max()
        if eig_max > -1e-12:
            hess = hess - (eig_max + 1e-9 * max(1.0, hess.abs().max().item())) * torch.eye(
                len(u), dtype=hess.dtype)
        step = -torch.linalg.solve(hess, grad)
        t, p0 = 1.0, phi(u)
        while t > 1e-12 and not phi(u + t * step) >= p0 + 1e-4 * t * (grad @ step):
            t *= 0.5
        u = u + t * step
        if t * step.norm() < 1e-15 * max(1.0, u.norm().item()):
            break
    return (mean + R @ u).detach()


def lookahead_mean_map(z: Tensor, grad_fn: Fn, mean: Tensor, cov: Tensor, increment: float,
                       noise_std: float) -> Tensor:
    """M(z) = m + Σg·(gᵀ(z − m) + δ)/(σ_y² + gᵀΣg), g = ∇f(z): the mean of the exact posterior of
    N(m, Σ) given y = gᵀx0 + N(0, σ_y²) at y = gᵀz + δ (one round of Algorithm 1 at the batch
    mean with LookAhead(beta="lemma1") and an exact Gaussian score). ``grad_fn`` maps (D,) -> (D,).
    """
    g = grad_fn(z)
    sg = cov @ g
    return mean + sg * ((g @ (z - mean)) + increment) / (noise_std**2 + g @ sg)


def mean_map_rate(f: Fn, mean: Tensor, cov: Tensor, increment: float, noise_std: float,
                  x_star: Tensor | None = None) -> float:
    """Spectral radius of the Jacobian of :func:`lookahead_mean_map` at x_λ* (restricted to
    range(Σ), where the iterates live): the asymptotic per-round contraction of ‖z̄_k − x_λ*‖."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if x_star is None:
        x_star = regularized_optimum(f, mean, cov, increment_to_lambda(increment, noise_std))

    def grad_fn(z: Tensor) -> Tensor:
        return torch.func.grad(lambda x: _value(f, x))(z)

    R = whitening(cov)
    Q, _ = torch.linalg.qr(R)

    def restricted(c: Tensor) -> Tensor:
        return Q.T @ lookahead_mean_map(x_star + Q @ c, grad_fn, mean, cov, increment, noise_std)

    J = torch.autograd.functional.jacobian(restricted, torch.zeros(Q.shape[1], dtype=torch.float64))
    return torch.linalg.eigvals(J).abs().max().item()


def quadratic_testbed(lam: float = 0.1, ratio: float = 0.7, xstar_norm: float = 2.0, D: int = 8,
                      seed: int = 0, noise_std: float = 1.0) -> dict:
    """An exact Gaussian testbed for Guo et al.'s theorems, with every reference in closed form.

    Prior N(0, Σ), Σ with eigenvalues 10^[−½, ½] in a seeded random basis; objective
    ``f(x) = −(h/2)(x − c)ᵀΣ⁻¹(x − c)`` with ``h = ratio·λ`` (so L/λ = ``ratio`` in the Σ metric:
    Σ^{½}(−∇²f)Σ^{½} = h·I), concave with global maximum f* = 0 at c; c is scaled so that
    ‖x_λ*‖_{Σ⁻¹} = ``xstar_norm``. Closed forms: x_λ* = h·c/(h + λ), f(x_λ*) = −(h/2)(λ/(h+λ))²‖c‖²_{Σ⁻¹};
    the increment that produces λ is δ = σ_y²/λ.

    Returns a dict with ``mean``, ``cov``, ``f`` (a function (B, D) -> (B,)), ``c``, ``lam``,
    ``x_star``, ``delta``, ``noise_std``, ``L`` (= h).
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(-0.5, 0.5, D, dtype=torch.float64)) @ q.T
    cinv = torch.linalg.inv(cov)
    c0 = torch.randn(D, generator=g, dtype=torch.float64)
    h = ratio * lam
    c = c0 / (c0 @ cinv @ c0).sqrt() * xstar_norm * (h + lam) / h
    H = h * cinv

    def f(x: Tensor) -> Tensor:
        dx = x - c.to(x)
        return -0.5 * ((dx @ H.to(x)) * dx).sum(-1)

    return {"mean": torch.zeros(D, dtype=torch.float64), "cov": cov, "f": f, "c": c, "lam": lam,
            "x_star": h * c / (h + lam), "delta": noise_std**2 / lam, "noise_std": noise_std,
            "L": h}
