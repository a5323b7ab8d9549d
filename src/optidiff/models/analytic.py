"""Exact denoisers: E[x0 | x0 + σ·ε = x] in closed form (test oracles and cheap testbeds).

Each returns ε = (x − x0_hat)/σ, so Tweedie's formula recovers the exact posterior mean.
Formulas:

- Gaussian N(m, Σ), Σ = U diag(λ) Uᵀ:  x0_hat = m + U diag(λ/(λ+σ²)) Uᵀ (x − m).
- Kronecker Gaussian N(m, Γ⊗Λ) (stacked sequences, Γ: N×N over positions, Λ: D×D per token):
  with Γ = U diag(a) Uᵀ and Λ = V diag(b) Vᵀ, Γ⊗Λ = (U⊗V) diag(a⊗b) (U⊗V)ᵀ, so for x reshaped
  to X (N, D): X0_hat = M + U [(a bᵀ)/(a bᵀ + σ²) ∘ (Uᵀ (X − M) V)] Vᵀ, O(N²D + ND²) per sample
  instead of O(N²D²).
- Subspace x0 = A·u (A orthonormal columns): the posterior depends on x only through Aᵀx = u + σ·ε_d,
  so x0_hat = A·E[u | Aᵀx] (a latent denoiser in R^d); its score splits (the Wang & Chen tutorial) into the on-subspace
  part A∇log p^u_σ(Aᵀx) and the off-subspace pull −(I − AAᵀ)x/σ².
- Mixture Σ π_k N(m_k, Σ_k): x0_hat = Σ_k r_k(x)·x0_hat_k(x), r_k ∝ π_k N(x; m_k, Σ_k + σ²I).
- Empirical ("ideal") denoiser of a finite set K (Permenter & Yuan (ICML 2024)): x0_hat = Σ_i softmax_i(−‖x − x_i‖²/2σ²)·x_i,
  which satisfies σ·ε = ½∇ₓ dist²_K(x, σ) with dist²_K(x, σ) = −2σ² log Σ_i exp(−‖x − x_i‖²/2σ²)
  (a softmin of the squared distances; it tends to min_i ‖x − x_i‖² as σ → 0).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from .base import sigma_like

__all__ = [
    "EmpiricalDenoiser",
    "ExactDenoiser",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "KroneckerGaussianDenoiser",
    "SubspaceDenoiser",
    "SubspaceGaussianDenoiser",
]


def _as64(t: Any) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _check_cov(cov: Tensor, dim: int, name: str) -> tuple[Tensor, Tensor]:
    """Symmetric PSD check; returns the eigen-decomposition (λ ≥ 0, U)."""
    if cov.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}), got {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.T, atol=1e-10):
        raise ValueError(f"{name} must be symmetric")
    lam, u = torch.linalg.eigh(cov)
    if lam.min() < -1e-10 * max(1.0, lam.max().item()):
        raise ValueError(f"{name} must be positive semi-definite (min eigenvalue {lam.min():.3g})")
    return lam.clamp(min=0), u


class ExactDenoiser(nn.Module, ABC):
    """Base class: subclasses implement ``denoise(x, sig) -> x0_hat`` with ``sig`` broadcastable."""

    input_shape: tuple[int, ...]

    @abstractmethod
    def denoise(self, x: Tensor, sig: Tensor) -> Tensor:
        """E[x0 | x] at noise level ``sig`` (0-d or (B, 1, …, 1))."""

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"x must have shape (B, *{tuple(self.input_shape)}) for this denoiser, "
                             f"got {tuple(x.shape)}")
        sig = sigma_like(sigma, x)
        return (x - self.denoise(x, sig)) / sig


class GaussianDenoiser(ExactDenoiser):
    """Exact denoiser of N(mean, cov); ``cov`` may be singular."""

    def __init__(self, mean: Tensor, cov: Tensor):
        super().__init__()
        mean = _as64(mean)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,), got {tuple(mean.shape)}")
        lam, u = _check_cov(_as64(cov), len(mean), "cov")
        self.input_shape = (len(mean),)
        self.register_buffer("mean", mean)
        self.register_buffer("cov", _as64(cov))
        self.register_buffer("eigvals", lam)
        self.register_buffer("eigvecs", u)

    def denoise(self, x: Tensor, sig: Tensor) -> Tensor:
        m, lam, u = self.mean.to(x), self.eigvals.to(x), self.eigvecs.to(x)
        coeff = (x - m) @ u  # (B, D) in the eigenbasis
        return m + (coeff * lam / (lam + sig**2)) @ u.T

    def log_density(self, x: Tensor, sig: Tensor) -> Tensor:
        """log N(x; m, Σ + σ²I), per sample (B,)."""
        m, lam, u = self.mean.to(x), self.eigvals.to(x), self.eigvecs.to(x)
        var = lam + sig**2
        coeff = (x - m) @ u
        return -0.5 * ((coeff**2 / var).sum(-1) + var.log().sum(-1).expand(len(x))
                       + len(m) * math.log(2 * math.pi))


class KroneckerGaussianDenoiser(ExactDenoiser):
    """Exact denoiser of N(mean, Γ⊗Λ) on stacked vectors ``x = (x_1, …, x_N)``, ``x_i ∈ R^D``
    (index ``i·D + d``, so ``x.view(B, N, D)`` are the tokens): the structured solve of the
    module docstring, equal to ``GaussianDenoiser(mean, kron(Γ, Λ))`` without forming Γ⊗Λ."""

    def __init__(self, mean: Tensor, gamma: Tensor, lam: Tensor):
        super().__init__()
        gamma, lam = _as64(gamma), _as64(lam)
        if gamma.ndim != 2 or lam.ndim != 2:
            raise ValueError(f"gamma and lam must be matrices, got shapes {tuple(gamma.shape)} and "
                             f"{tuple(lam.shape)}")
        n, d = gamma.shape[0], lam.shape[0]
        a, u = _check_cov(gamma, n, "gamma")
        b, v = _check_cov(lam, d, "lam")
        mean = _as64(mean)
        if mean.shape != (n * d,):
            raise ValueError(f"mean must have shape (N·D,)=({n * d},), got {tuple(mean.shape)}")
        self.shape = (n, d)
        self.input_shape = (n * d,)
        self.register_buffer("mean", mean)
        self.register_buffer("gamma", gamma)
        self.register_buffer("lam", lam)
        self.register_buffer("eig_gamma", a)
        self.register_buffer("vec_gamma", u)
        self.register_buffer("eig_lam", b)
        self.register_buffer("vec_lam", v)

    @property
    def cov(self) -> Tensor:
        """The dense covariance Γ⊗Λ (N·D × N·D)."""
        return torch.kron(self.gamma, self.lam)

    def denoise(self, x: Tensor, sig: Tensor) -> Tensor:
        n, d = self.shape
        u, v = self.vec_gamma.to(x), self.vec_lam.to(x)
        ab = self.eig_gamma.to(x)[:, None] * self.eig_lam.to(x)[None, :]      # (N, D)
        s2 = (sig**2).reshape(-1, 1, 1) if sig.ndim else sig**2
        c = u.T @ (x - self.mean.to(x)).view(-1, n, d) @ v                     # (B, N, D)
        return self.mean.to(x) + (u @ (c * ab / (ab + s2)) @ v.T).reshape(x.shape)


class SubspaceDenoiser(ExactDenoiser):
    """Exact denoiser of x0 = A·u for orthonormal A (D×d) and any latent law with exact denoiser
    ``latent`` in R^d: ``x0_hat(x, σ) = A·latent_x0_hat(Aᵀx, σ)``."""

    def __init__(self, A: Tensor, latent: ExactDenoiser):
        super().__init__()
        A = _as64(A)
        if A.ndim != 2 or A.shape[1] > A.shape[0]:
            raise ValueError(f"A must have shape (D, d) with d <= D, got {tuple(A.shape)}")
        if not torch.allclose(A.T @ A, torch.eye(A.shape[1], dtype=A.dtype), atol=1e-8):
            raise ValueError("A must have orthonormal columns (AᵀA = I)")
        if tuple(latent.input_shape) != (A.shape[1],):
            raise ValueError(f"latent denoiser has input_shape {latent.input_shape}, expected "
                             f"({A.shape[1]},)")
        self.input_shape = (A.shape[0],)
        self.register_buffer("A", A)
        self.latent = latent

    def denoise(self, x: Tensor, sig: Tensor) -> Tensor:
        A = self.A.to(x)
        return self.latent.denoise(x @ A, sig) @ A.T


class SubspaceGaussianDenoiser(SubspaceDenoiser):
    """Subspace data with Gaussian latent u ~ N(latent_mean, latent_cov) (Guo et al., NeurIPS 2024, Assumption 1)."""

    def __init__(self, A: Tensor, latent_cov: Tensor | None = None,
                 latent_mean: Tensor | None = None):
        d = _as64(A).shape[-1]
        latent_cov = torch.eye(d, dtype=torch.float64) if latent_cov is None else latent_cov
        latent_mean = torch.zeros(d, dtype=torch.float64) if latent_mean is None else latent_mean
        super().__init__(A, GaussianDenoiser(latent_mean, latent_cov))


class GaussianMixtureDenoiser(ExactDenoiser):
    """Exact denoiser of Σ_k π_k N(m_k, Σ_k): responsibilities times the components' denoisers."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        super().__init__()
        weights, means, covs = _as64(weights), _as64(means), _as64(covs)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        k, dim = means.shape
        if weights.shape != (k,) or (weights < 0).any() or not math.isclose(weights.sum(), 1,
                                                                              rel_tol=1e-9):
            raise ValueError(f"weights must be {k} non-negative numbers summing to 1, got "
                             f"{weights.tolist()}")
        if covs.shape != (k, dim, dim):
            raise ValueError(f"covs must have shape ({k}, {dim}, {dim}), got {tuple(covs.shape)}")
        self.input_shape = (dim,)
        self.register_buffer("log_weights", weights.log())
        self.components = nn.ModuleList(GaussianDenoiser(m, c) for m, c in zip(means, covs))

    def responsibilities(self, x: Tensor, sig: Tensor) -> Tensor:
        """Posterior component probabilities r_k(x) at noise σ, shape (B, K)."""
        logp = torch.stack([c.log_density(x, sig) for c in self.components], dim=-1)
        return torch.softmax(logp + self.log_weights.to(x), dim=-1)

    def denoise(self, x: Tensor, sig: Tensor) -> Tensor:
        r = self.responsibilities(x, sig)
        x0s = torch.stack([c.denoise(x, sig) for c in self.components], dim=-1)  # (B, D, K)
        return (x0s * r.unsqueeze(1)).sum(-1)


class EmpiricalDenoiser(ExactDenoiser):
    """The ideal denoiser of a finite data set (Permenter & Yuan (ICML 2024), smalldiffusion's ``IdealDenoiser``).

    Cost O(N·B·D) time and O(N·B) memory per call.
    """

    def __init__(self, data: Tensor):
        super().__init__()
        data = torch.as_tensor(data)
        if data.ndim < 2 or len(data) == 0:
            raise ValueError(f"data must have shape (N, *dims) with N >= 1, got {tuple(data.shape)}")
        self.input_shape = tuple(data.shape[1:])
        self.register_buffer("data", data.flatten(1))

    def sq_dists(self, x: Tensor) -> Tensor:
        """‖x − x_i‖², shape (B, N)."""
        flat, data = x.flatten(1), self.data.to(x)
        return ((flat**2).sum(1, keepdim=True) + (data**2).sum(1) - 2 * flat @ data.T).clamp(min=0)

    def denoise(self, x: Tensor, sig: Tensor) -> Tensor:
        s2 = (sig**2).reshape(-1, 1)
        d2 = self.sq_dists(x)
        w = torch.softmax(-d2 / (2 * s2), dim=1)
        return (w @ self.data.to(x)).view_as(x)

    def smoothed_sq_dist(self, x: Tensor, sigma: Tensor) -> Tensor:
        """dist²_K(x, σ) = −2σ² log Σ_i exp(−‖x − x_i‖²/2σ²), per sample (B,): ½∇ₓ of it is σ·ε."""
        s2 = (sigma_like(sigma, x.flatten(1)) ** 2).reshape(-1)
        d2 = self.sq_dists(x)
        return -2 * s2 * torch.logsumexp(-d2 / (2 * s2.reshape(-1, 1)), dim=1)
