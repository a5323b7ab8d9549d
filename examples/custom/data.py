"""The user's data: a map-style torch Dataset of points near the unit circle."""

import math

import torch
from torch.utils.data import Dataset


class RingDataset(Dataset):
    """``n`` points at angle θ ~ U[0, 2π) and radius 1 + noise·N(0, 1), drawn once from ``seed``."""

    def __init__(self, n: int, seed: int = 0, noise: float = 0.05):
        g = torch.Generator().manual_seed(seed)
        theta = 2 * math.pi * torch.rand(n, generator=g)
        r = 1 + noise * torch.randn(n, generator=g)
        self.x = torch.stack([r * theta.cos(), r * theta.sin()], dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def ring(n: int = 4096, seed: int = 0) -> RingDataset:
    """The data source ``[train] data = "custom.data:ring"`` names (called with ``data_args``)."""
    return RingDataset(n, seed)
