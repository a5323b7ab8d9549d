"""The user's objective: f(x) = x₂, the height of a point (on the ring, largest at (0, 1))."""

import torch


def height(x: torch.Tensor) -> torch.Tensor:
    """One value per sample, differentiable: what Algorithm 1 climbs."""
    return x[:, 1]
