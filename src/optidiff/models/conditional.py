"""A reward-conditioned ε-network for vector data: ``ConditionalMLP(dim, cond_dim)(x, σ, cond=y)``.

The offline reward maximization of the Wang & Chen tutorial (after Yuan et al., NeurIPS 2023) trains ``s(x, y, t)`` on pseudo-labelled data and samples
at ``y = a``; DDOM (Krishnamoorthy et al. 2023) does the same with condition dropout so that one
network also gives the unconditional score for classifier-free guidance. DDOM drops y to 0,
which coincides with the mean of its z-scored labels; here a dropped condition is a separate
**learned null embedding** (as DDOM's code drops it to a fixed value, here learned), used for ``cond=None`` and for
every row of ``cond`` that contains a NaN (the null condition :func:`optidiff.train` writes for
float conditions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import sigma_like
from .mlp import SigmaEmbedding
from .registry import register_model

__all__ = ["ConditionalMLP"]


@register_model
class ConditionalMLP(nn.Module):
    """MLP ε-model conditioned on a continuous value ``y`` of shape ``(B,)`` or ``(B, k)``.

    The embedding ``e = [e_σ(σ), e_y(y)]`` (the sinusoidal σ embedding of
    :class:`~optidiff.models.mlp.SigmaEmbedding`; ``e_y`` a two-layer SiLU MLP of ``y``, or the learned
    null vector where ``y`` is missing) modulates every hidden layer by FiLM (Perez et al. 2018):

        h_0 = W_in·(c_in·x),   c_in = 1/√(σ² + σ_data²)
        h_i = SiLU(h_{i−1}·(1 + γ_i(e)) + β_i(e))   (followed by a linear layer between blocks)
        ε   = W_out·h_depth

    The multiplicative coupling matters: the conditional score of data on the level set
    ``{f̂(x) = y}`` contains terms like ``(θᵀx − y)·θ/σ``, a product of the condition and a
    function of σ that a network seeing ``[x, e]`` only at its input fits poorly (in the
    64-dimensional subspace benchmark it left SubOpt(1) ≈ 0.3 where this form gives ≈ 0).
    Labels should be on a unit scale (z-score them).
    """

    def __init__(self, dim: int, cond_dim: int = 1, hidden: int = 256, depth: int = 3,
                 emb_dim: int = 64, cond_emb_dim: int = 64, sigma_data: float = 1.0):
        super().__init__()
        if min(dim, cond_dim, hidden, depth, cond_emb_dim) < 1:
            raise ValueError(f"dim, cond_dim, hidden, depth and cond_emb_dim must be >= 1, got "
                             f"{dim}, {cond_dim}, {hidden}, {depth}, {cond_emb_dim}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.input_shape = (dim,)
        self.cond_dim = cond_dim
        self.sigma_data = float(sigma_data)
        self.embed = SigmaEmbedding(emb_dim)
        self.cond_embed = nn.Sequential(nn.Linear(cond_dim, cond_emb_dim), nn.SiLU(),
                                        nn.Linear(cond_emb_dim, cond_emb_dim))
        self.null = nn.Parameter(torch.zeros(cond_emb_dim))
        self.inp = nn.Linear(dim, hidden)
        self.film = nn.ModuleList(nn.Linear(emb_dim + cond_emb_dim, 2 * hidden)
                                  for _ in range(depth))
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def cond_embedding(self, cond: Any, batch: int, like: Tensor) -> Tensor:
        """``e_y`` per row (B, cond_emb_dim): the learned null vector for ``None`` or NaN rows."""
        null = self.null.to(like.dtype).expand(batch, -1)
        if cond is None:
            return null
        y = torch.as_tensor(cond, dtype=like.dtype, device=like.device)
        if y.ndim == 0:
            y = y.expand(batch)
        if y.ndim == 1 and self.cond_dim == 1:
            y = y.unsqueeze(1)
        if y.shape != (batch, self.cond_dim):
            raise ValueError(f"cond must have shape ({batch},) or ({batch}, {self.cond_dim}) (or "
                             f"be a scalar or None), got {tuple(y.shape)}")
        missing = torch.isnan(y).any(1, keepdim=True)
        emb = self.cond_embed(torch.where(missing, torch.zeros_like(y), y))
        return torch.where(missing, null, emb)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sig = sigma_like(sigma, x)
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        # a 0-d σ with a None or scalar condition: one embedding row, broadcast over the batch
        rows = 1 if s.ndim == 0 and (cond is None or torch.as_tensor(cond).ndim == 0) else len(x)
        e = torch.cat([self.embed(s.expand(rows)), self.cond_embedding(cond, rows, x)], dim=-1)
        h = self.inp(x / (sig**2 + self.sigma_data**2).sqrt())
        for i, film in enumerate(self.film):
            gamma, beta = film(e).chunk(2, dim=-1)
            h = F.silu(h * (1 + gamma) + beta)
            if i < len(self.hidden):
                h = self.hidden[i](h)
        return self.out(h)
