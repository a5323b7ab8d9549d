"""A score network with the low-dimensional form of the theory: ``x0_hat = V·φ(Vᵀx, σ)``.

Chen, Huang, Zhao & Wang (ICML 2023, "Score approximation, estimation and distribution recovery of
diffusion models on low-dimensional data", §3, the score network class of their Eq. (3.2)): for
data ``x0 = A·u`` on a d-dimensional linear subspace of R^D, the score splits into an on-subspace
part that depends on x only through the latent ``Aᵀx`` and the off-subspace pull
``−(I − AAᵀ)x/σ²``; so the denoiser is ``A·E[u | Aᵀx]``. :class:`SubspaceNet` learns both the basis
V ≈ A (orthonormal columns, kept so by ``torch.nn.utils.parametrizations.orthogonal``) and the
latent denoiser φ: R^d × R₊ → R^d.

φ is EDM-preconditioned (Karras et al., NeurIPS 2022, Eq. (7) and Table 1) with latent scale
``s = sigma_data``:

    φ(z, σ) = c_skip·z + c_out·F(c_in·z, σ),   c_skip = s²/(σ²+s²), c_out = σs/√(σ²+s²),
    c_in = 1/√(σ²+s²),
    F(h, σ) = M(σ)·h + b(σ) + g(h, σ),

with ``[M(σ), b(σ)]`` a linear map of the σ embedding (the *linear path*) and g a σ-conditioned
MLP (the correction), both initialised to zero. With F = 0, φ(z, σ) = z·s²/(s²+σ²) is the exact
posterior mean of u ~ N(0, s²I_d); the affine path represents the exact φ of any Gaussian latent
N(m, Σ), ``m + Σ(Σ+σ²I)⁻¹(z − m)``, so far from the data φ extrapolates like the Gaussian it
learns rather than like an MLP. ``depth=0`` drops g (a purely Gaussian latent model).

The output is ε̂ = (x − x0_hat)/σ in the VE convention, computed without dividing small
differences by σ: ``ε̂ = (x − VVᵀx)/σ + V·[σ·z/(σ²+s²) − s·F/√(σ²+s²)]``, z = Vᵀx.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from .base import sigma_like
from .mlp import SigmaEmbedding, embed_sigma_and_label, mlp_stack
from .registry import register_model

__all__ = ["SubspaceNet"]


@register_model
class SubspaceNet(nn.Module):
    """ε-model ``SubspaceNet(dim, latent_dim)(x, σ, cond) -> eps`` for data of shape ``(B, dim)``
    near a ``latent_dim``-dimensional linear subspace (see the module docstring).

    ``hidden``/``depth``: width and number of SiLU layers of the correction MLP g (``depth=0``: no
    correction); ``emb_dim``: the σ embedding's size; ``sigma_data``: the latent's standard
    deviation s (1 for u ~ N(0, I)). ``cond`` is ignored (an unconditional model).

    V is ``orthogonal(nn.Linear(latent_dim, dim))``'s weight with torch's default map for a tall
    matrix (Householder reflectors, whose signs sit on the diagonal of the unconstrained matrix
    and get no gradient). Train it without weight decay (``od.train``'s default): decay would
    shrink those signs toward 0 and zero V's columns, so ``forward`` raises if it finds them
    altered.
    """

    def __init__(self, dim: int, latent_dim: int, hidden: int = 256, depth: int = 2,
                 emb_dim: int = 64, sigma_data: float = 1.0):
        super().__init__()
        if not 1 <= latent_dim <= dim:
            raise ValueError(f"need 1 <= latent_dim <= dim, got dim={dim}, latent_dim={latent_dim}")
        if hidden < 1 or depth < 0:
            raise ValueError(f"need hidden >= 1 and depth >= 0, got hidden={hidden}, depth={depth}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got sigma_data={sigma_data!r}")
        self.input_shape = (dim,)
        self.latent_dim = latent_dim
        self.sigma_data = sigma_data
        self.proj = parametrizations.orthogonal(nn.Linear(latent_dim, dim, bias=False))
        self.embed = SigmaEmbedding(emb_dim)
        self.linear_path = nn.Linear(emb_dim, latent_dim * (latent_dim + 1))
        self.correction = (mlp_stack(latent_dim + emb_dim, hidden, depth, latent_dim)
                           if depth else None)
        heads = [self.linear_path] + ([self.correction[-1]] if depth else [])
        for head in heads:  # F = 0 at initialisation: the exact N(0, s²I) latent denoiser
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def basis(self) -> Tensor:
        """The learned basis V (dim × latent_dim, orthonormal columns), detached."""
        return self.proj.weight.detach()

    def latent_residual(self, h: Tensor, emb: Tensor) -> Tensor:
        """F(h, σ) = M(σ)·h + b(σ) + g(h, σ) (the preconditioned latent network's output)."""
        d = self.latent_dim
        path = self.linear_path(emb)
        out = (path[:, :d * d].view(-1, d, d) @ h.unsqueeze(-1)).squeeze(-1) + path[:, d * d:]
        if self.correction is not None:
            out = out + self.correction(torch.cat([h, emb], dim=-1))
        return out

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.input_shape[0]:
            raise ValueError(f"x must have shape (B, {self.input_shape[0]}), got {tuple(x.shape)}")
        signs = self.proj.parametrizations.weight.original.diagonal()
        if not bool((signs.abs() == 1).all()):
            raise ValueError("SubspaceNet's basis parametrization was altered (its Householder "
                             "signs are no longer ±1: was it trained with weight_decay > 0?)")
        V = self.proj.weight
        sig = sigma_like(sigma, x)
        s2 = self.sigma_data**2
        z = x @ V
        emb = embed_sigma_and_label(self.embed, None, x, sigma, None)
        F = self.latent_residual(z / (sig**2 + s2).sqrt(), emb)
        par = sig * z / (sig**2 + s2) - self.sigma_data * F / (sig**2 + s2).sqrt()
        return (x - z @ V.T) / sig + par @ V.T
