"""A sequence transformer ε-network: tokens are time positions, D features per token.

The score network of the Wang & Chen tutorial's sequence-data section and of Fu, Dou, Guo, Wang
& Chen ("Diffusion transformer captures spatial-temporal dependencies: a theory for Gaussian
process data", ICLR 2025): a transformer whose attention can represent the unrolled gradient
steps on the score quadratic (see :mod:`optidiff.models.unrolled`).

Architecture (:class:`SequenceTransformer`):

- token i: ``W_in·(c_in·x_i) + W_pos·PE(h_i)``, c_in = 1/√(σ² + σ_data²), PE the sinusoidal
  encoding of the sampling time h_i (Vaswani et al. 2017, of the time itself, not of the index,
  so any length and irregular times work with the same weights);
- ``depth`` pre-LN blocks (multi-head self-attention with ``F.scaled_dot_product_attention``, a
  4× SiLU MLP) whose LayerNorms are modulated by σ (adaLN-Zero of Peebles & Xie, ICCV 2023, "DiT":
  scale, shift and a zero-initialised gate per sub-block, from the embedding of log σ);
- output ``ε_i = W_out·h_i + W_skip·(c_in·x_i)``: **no final LayerNorm** (a final norm caps
  |ε| per token, which leaves the tails of trajectories undenoised) and a linear skip, so ε can be
  as large as x/σ at high noise.

``input_shape`` is ``(length·channels,)``, the stacked layout of :class:`optidiff.tasks.gp.GPTask`
(``x.view(B, length, channels)`` are the tokens); the weights do not depend on the length, so a
model built for another length (or other times) loads the same state dict.

Cost: attention is O(N²·d) per layer and the rest O(N·d²), so a training step at N = 128 costs
about 8–10× one at N = 16. Measured on one CPU thread (width 32, 2 blocks, 2 heads, batch 128,
torch 2.13): 0.01 s a step at N = 16, 0.10 s at N = 128, of which the matrix products of the
linear layers take 41 %, the fused attention forward and backward 21 % and the SiLU backward
10 % (``torch.profiler``). What limits it at N = 128 on a CPU is steps per second, not capacity:
at equal steps it learns N = 128 about as well as N = 16 (the ``gp`` benchmark), at equal wall
time it gets ~10× fewer steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import sigma_like
from .mlp import SigmaEmbedding
from .registry import register_model

__all__ = ["SequenceTransformer", "time_encoding"]


def time_encoding(times: Tensor, dim: int, max_period: float = 1e3) -> Tensor:
    """Sinusoidal encoding (N, dim) of real times h (Vaswani et al. 2017, with h for the index)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float64)
                      / (dim // 2))
    a = times.double()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], dim=-1).float()


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, emb_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.ada = nn.Linear(emb_dim, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _modulation(self, emb: Tensor) -> list[Tensor]:
        return [m.unsqueeze(1) for m in self.ada(emb).chunk(6, dim=-1)]

    def _qkv(self, h: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, W = h.shape
        a = self.norm1(h) * (1 + scale) + shift
        q, k, v = self.qkv(a).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        s1, c1, g1, s2, c2, g2 = self._modulation(emb)
        q, k, v = self._qkv(h, s1, c1)
        att = F.scaled_dot_product_attention(q, k, v)                  # (B, heads, N, W/heads)
        h = h + g1 * self.proj(att.transpose(1, 2).reshape(h.shape))
        return h + g2 * self.mlp(self.norm2(h) * (1 + c2) + s2)

    def attention(self, h: Tensor, emb: Tensor) -> Tensor:
        """The attention weights softmax(QKᵀ/√d) of this block, (B, heads, N, N)."""
        s1, c1 = self._modulation(emb)[:2]
        q, k, _ = self._qkv(h, s1, c1)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


@register_model
class SequenceTransformer(nn.Module):
    """Transformer ε-model for sequences (module docstring).

    ``SequenceTransformer(length, channels, times=None)(x, σ) -> eps`` for x of shape
    (B, length·channels). ``times``: the sampling times h_i (default 0, 1, …, length − 1);
    ``width`` d, ``depth`` blocks, ``heads``, ``emb_dim`` of the σ embedding, ``sigma_data``.
    """

    def __init__(self, length: int, channels: int, times: list[float] | None = None,
                 width: int = 64, depth: int = 2, heads: int = 4, emb_dim: int = 64,
                 sigma_data: float = 1.0):
        super().__init__()
        for k, v in (("length", length), ("channels", channels), ("width", width),
                     ("depth", depth), ("heads", heads), ("emb_dim", emb_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {k}={v!r}")
        if width % heads or width % 2:
            raise ValueError(f"width must be even and a multiple of heads, got width={width}, "
                             f"heads={heads}")
        times_t = (torch.arange(length, dtype=torch.float64) if times is None
                   else torch.as_tensor(times, dtype=torch.float64))
        if times_t.shape != (length,):
            raise ValueError(f"times must hold length={length} values, got {len(times_t)}")
        self.length, self.channels = length, channels
        self.sigma_data = sigma_data
        self.input_shape = (length * channels,)
        self.register_buffer("pe", time_encoding(times_t, width), persistent=False)
        self.embed = SigmaEmbedding(emb_dim)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.inp = nn.Linear(channels, width)
        self.pos = nn.Linear(width, width)
        self.blocks = nn.ModuleList(_Block(width, heads, emb_dim) for _ in range(depth))
        self.out = nn.Linear(width, channels)
        self.skip = nn.Linear(channels, channels)

    def _embed(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (B, {self.input_shape[0]}), got {tuple(x.shape)}")
        sig = sigma_like(sigma, x)
        tokens = (x / (sig**2 + self.sigma_data**2).sqrt()).view(-1, self.length, self.channels)
        emb = self.emb_mlp(self.embed(torch.as_tensor(sigma, dtype=x.dtype,
                                                      device=x.device).expand(len(x))))
        return tokens, emb

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        tokens, emb = self._embed(x, sigma)
        h = self.inp(tokens) + self.pos(self.pe.to(x))
        for block in self.blocks:
            h = block(h, emb)
        return (self.out(h) + self.skip(tokens)).reshape(x.shape)

    @torch.no_grad()
    def attention_maps(self, x: Tensor, sigma: Tensor) -> list[Tensor]:
        """Every block's attention weights at (x, σ), a list of (B, heads, N, N)."""
        tokens, emb = self._embed(x, sigma)
        h = self.inp(tokens) + self.pos(self.pe.to(x))
        maps = []
        for block in self.blocks:
            maps.append(block.attention(h, emb))
            h = block(h, emb)
        return maps
