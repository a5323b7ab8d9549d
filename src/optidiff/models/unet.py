"""A small U-Net ε-model for images ``(C, H, W)``: the DDPM design (Ho et al. 2020, App. B), scaled down.

Residual blocks (GroupNorm → SiLU → 3×3 conv, plus a per-channel shift from the σ embedding),
stride-2 convolutions down and nearest-neighbour upsampling back (to the skip's size, so odd sizes
such as 28 → 14 → 7 → 14 → 28 work), skip connections concatenated on the way up, and optional
single-head self-attention at the lowest resolution. Sizes: 8×8 digits use ``channel_mult=(1, 2)``;
28×28 and 32×32 images ``(1, 2, 2)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import sigma_like
from .mlp import SigmaEmbedding, embed_sigma_and_label
from .registry import register_model

__all__ = ["UNet"]


class ResBlock(nn.Module):
    """``h + conv(SiLU(GN(conv(SiLU(GN(h))) + W·emb)))`` (1×1 conv on the skip when widths differ),
    then self-attention when ``attention`` is set."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float,
                 attention: bool = False):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = SelfAttention(c_out, groups) if attention else None

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        out = self.conv1(F.silu(self.norm1(h))) + self.emb(F.silu(emb))[:, :, None, None]
        out = self.skip(h) + self.conv2(self.dropout(F.silu(self.norm2(out))))
        return out if self.attn is None else self.attn(out)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, h: Tensor) -> Tensor:
        b, c, height, width = h.shape
        q, k, v = self.qkv(self.norm(h)).reshape(b, 3, c, height * width).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return h + self.proj(out.transpose(-1, -2).reshape(b, c, height, width))


@register_model
class UNet(nn.Module):
    """U-Net ε-model ``UNet(image_size)(x, σ, cond) -> eps`` for images of shape ``(B, C, H, W)``.

    As :class:`~optidiff.models.TimeMLP`: the input is scaled by ``c_in = 1/√(σ² + σ_data²)``, the
    network is conditioned on the sinusoidal embedding of σ (followed by a 2-layer MLP, as DDPM),
    plus a class embedding when ``num_classes`` is set (label −1 or ``cond=None`` is the null class
    that classifier-free guidance uses).

    Args:
        image_size: H (square) or (H, W).
        in_channels: C.
        channels: width of the first level; level i has ``channels·channel_mult[i]``.
        channel_mult: one entry per resolution; ``len − 1`` downsamplings.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention: self-attention at the lowest resolution (its blocks and the middle).
        num_classes: class conditioning with labels ``0 … num_classes−1`` (and −1 for none).
        emb_dim: width of the σ/class embedding (default ``4·channels``).
        groups: GroupNorm groups (must divide every level's width).
        dropout: inside the residual blocks.
        sigma_data: the data scale in ``c_in``.
    """

    def __init__(self, image_size: int | tuple[int, int] = 8, in_channels: int = 1,
                 channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
                 num_res_blocks: int = 1, attention: bool = True, num_classes: int | None = None,
                 emb_dim: int | None = None, groups: int = 8, dropout: float = 0.0,
                 sigma_data: float = 1.0):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        widths = [channels * m for m in channel_mult]
        if min(h, w, in_channels, channels, num_res_blocks, len(widths)) < 1:
            raise ValueError(f"image_size, in_channels, channels, num_res_blocks and channel_mult "
                             f"must be positive, got {image_size}, {in_channels}, {channels}, "
                             f"{num_res_blocks}, {channel_mult}")
        if any(c % groups for c in widths):
            raise ValueError(f"groups={groups} must divide every level width {widths}")
        emb_dim = emb_dim or 4 * channels
        self.input_shape = (in_channels, h, w)
        self.sigma_data, self.num_classes = sigma_data, num_classes
        self.embed = nn.Sequential(SigmaEmbedding(channels), nn.Linear(channels, emb_dim),
                                   nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        def block(c_in: int, c_out: int, attn: bool = False) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, groups, dropout, attention and attn)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [channels], channels
        last = len(widths) - 1
        for i, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(block(c, width, i == last))
                c = width
                skips.append(c)
            if i < last:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([block(c, c, True), block(c, c)])
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + skips.pop(), width, i == last))
                c = width
            if i > 0:
                self.up.append(nn.Conv2d(c, c, 3, padding=1))  # after a nearest-neighbour upsample
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(),
                                 nn.Conv2d(c, in_channels, 3, padding=1))

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        sig = sigma_like(sigma, x)
        emb = embed_sigma_and_label(self.embed, self.class_embed, x, sigma, cond)
        h = self.conv_in(x / (sig**2 + self.sigma_data**2).sqrt())
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:  # upsample to the size of the next skip, then convolve
                h = layer(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.out(h)
