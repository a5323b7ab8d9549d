"""A small ε-network of the user's own: an MLP on (c_in·x, log σ)."""

import torch
from torch import nn

import optidiff as od


@od.models.register_model  # records the constructor's arguments: checkpoints load by import path
class RingNet(nn.Module):
    """ε̂(x, σ) for points in R^dim: an MLP of the scaled input x/√(σ² + 1) and log σ (the input
    scaling of Karras et al., NeurIPS 2022, for unit-variance data)."""

    def __init__(self, dim: int = 2, hidden: int = 64):
        super().__init__()
        self.input_shape = (dim,)  # what samplers draw when no starting point is given
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x))
        features = torch.cat([x / (sigma[:, None] ** 2 + 1).sqrt(),
                              sigma.clamp_min(1e-6).log()[:, None] / 4], dim=1)
        return self.net(features)
