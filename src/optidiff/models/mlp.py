"""A small trainable ε-network for vector data (D,)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import sigma_like
from .registry import register_model

__all__ = ["SigmaEmbedding", "TimeMLP", "embed_sigma_and_label", "mlp_stack"]


class SigmaEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise = ¼·log σ (Karras et al. 2022, Table 1) at geometric
    frequencies, as the transformer position embedding of Vaswani et al. 2017."""

    def __init__(self, dim: int = 64, max_period: float = 1e3):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even, got dim={dim}")
        freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2) / (dim // 2))
        self.register_buffer("freqs", freqs * 100.0, persistent=False)

    def forward(self, sigma: Tensor) -> Tensor:
        c = 0.25 * sigma.log().reshape(-1, 1) * self.freqs.to(sigma.dtype)
        return torch.cat([c.sin(), c.cos()], dim=-1)


def mlp_stack(width_in: int, hidden: int, depth: int, width_out: int) -> nn.Sequential:
    """``depth`` Linear+SiLU layers of width ``hidden``, then a Linear to ``width_out``."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden if depth else width_in, width_out))
    return nn.Sequential(*layers)


def embed_sigma_and_label(embed: SigmaEmbedding, class_embed: nn.Embedding | None, x: Tensor,
                          sigma: Tensor, cond: Any) -> Tensor:
    """Per-sample embedding (B, emb_dim): the σ embedding plus, for a class-conditional network,
    the label's embedding; label −1 or ``cond=None`` selects the null class (the last row of
    ``class_embed``), which classifier-free guidance uses as "unconditional"."""
    emb = embed(torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x)))
    if class_embed is None:
        return emb
    null = class_embed.num_embeddings - 1
    labels = (torch.full((len(x),), -1, device=x.device, dtype=torch.long)
              if cond is None else torch.as_tensor(cond, device=x.device).long())
    return emb + class_embed(torch.where(labels < 0, null, labels))


@register_model
class TimeMLP(nn.Module):
    """MLP ε-model ``TimeMLP(dim)(x, σ, cond) -> eps`` for data of shape ``(B, dim)``.

    The input is scaled by ``c_in = 1/√(σ² + σ_data²)`` (the VP scaling of Permenter & Yuan (ICML 2024) when
    σ_data = 1), concatenated with the σ embedding (and a class embedding when ``num_classes`` is
    set; label −1 or ``cond=None`` is the null class used by classifier-free guidance) and fed through
    ``depth`` SiLU layers of width ``hidden``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 sigma_data: float = 1.0, num_classes: int | None = None):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}")
        self.input_shape = (dim,)
        self.sigma_data = sigma_data
        self.num_classes = num_classes
        self.embed = SigmaEmbedding(emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.net = mlp_stack(dim + emb_dim, hidden, depth, dim)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sig = sigma_like(sigma, x)
        emb = embed_sigma_and_label(self.embed, self.class_embed, x, sigma, cond)
        h = torch.cat([x / (sig**2 + self.sigma_data**2).sqrt(), emb], dim=-1)
        return self.net(h)
