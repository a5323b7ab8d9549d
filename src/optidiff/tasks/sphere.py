"""The ``sphere`` task of Guo, Yuan, Yang, Chen & Wang (NeurIPS 2024, §6; their official code's
``unit_ball`` data, which is the unit sphere).

Data: ``x = z/‖z‖``, ``z ~ N(0, I_64)``: uniform on the unit sphere S⁶³ (65,536 pre-training points,
drawn from a generator seeded with ``seed + 1``). Objective: ``f(x) = θᵀx`` with θ uniform on S⁶³
(a generator seeded with ``seed``), maximum 1 on the sphere, at x = θ. Metric: the distance to the
support ``|‖x‖ − 1|`` (batch mean; the official code logs the signed ``‖x‖ − 1``, also reported
here as ``norm_minus_one``) and the reward of the sample's direction, ``θᵀx/‖x‖`` (batch mean
``cosine_reward``): θᵀx alone credits mass off the sphere (‖x‖ > 1), the cosine does not, so a
Pareto front of the cosine against |‖x‖ − 1| compares guidances fairly.

References: the on-sphere maximum 1; the pre-training data have mean 0 and covariance I/64, so the
Gaussian (linear-score) surrogate of their Theorem 2 gives x_λ* = θ/(64λ) (value 1/(64λ),
off the sphere for λ ≠ 1/64): only a reference for the regime where the theorem's linear-score
assumption holds, which the sphere does not satisfy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import rng
from ..optimize.objectives import Objective
from ..optimize.reference import increment_to_lambda
from .base import check_objective

__all__ = ["OBJECTIVES", "SphereTask"]

D, N_PRETRAIN = 64, 65_536
OBJECTIVES = ("linear",)


@dataclass
class SphereTask:
    """Seeded instance of the sphere task (see the module docstring)."""

    name: ClassVar[str] = "sphere"
    objectives: ClassVar[tuple[str, ...]] = OBJECTIVES
    plot_metrics: ClassVar[tuple[tuple[str, str], ...]] = (("norm_deviation", "|‖x‖ − 1|"),)
    seed: int = 0
    n_pretrain: int = N_PRETRAIN
    theta: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = rng.generator(self.seed)
        t = torch.randn(D, generator=g, dtype=torch.float64)
        self.theta = t / t.norm()

    @property
    def dim(self) -> int:
        return D

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (D,)

    @property
    def data_scale(self) -> float:
        """Per-coordinate standard deviation of the data, 1/√64."""
        return 1.0 / math.sqrt(D)

    def data(self, n: int | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        n = self.n_pretrain if n is None else n
        g = torch.Generator().manual_seed(self.seed + 1)
        z = torch.randn(n, D, generator=g, dtype=torch.float64)
        return (z / z.norm(dim=1, keepdim=True)).to(dtype)

    @property
    def mean(self) -> Tensor:
        return torch.zeros(D, dtype=torch.float64)

    @property
    def cov(self) -> Tensor:
        return torch.eye(D, dtype=torch.float64) / D

    def _check(self, name: str) -> str:
        return check_objective(self, name)

    def objective_fn(self, name: str = "linear"):
        self._check(name)
        theta = self.theta

        def linear(x: Tensor) -> Tensor:
            return x @ theta.to(x)
        return linear

    def objective(self, name: str = "linear") -> Objective:
        return Objective(self.objective_fn(name), name=f"sphere/{name}", maximum=1.0)

    def global_max(self, name: str = "linear") -> float:
        self._check(name)
        return 1.0

    def projection(self, objective: str, x: Tensor) -> tuple[Tensor, str, str]:
        """(θᵀx, ‖x‖) of each sample."""
        self._check(objective)
        x = x.detach().double().flatten(1)
        return torch.stack([x @ self.theta, x.norm(dim=1)], 1), "θᵀx", "‖x‖"

    def metrics(self, x: Tensor) -> dict[str, float]:
        """``norm_deviation`` = mean |‖x‖ − 1|, ``norm_minus_one`` = mean (‖x‖ − 1),
        ``cosine_reward`` = mean θᵀx/‖x‖."""
        x = x.detach().flatten(1).double()
        n = x.norm(dim=1)
        return {"norm_deviation": (n - 1).abs().mean().item(),
                "norm_minus_one": (n - 1).mean().item(),
                "cosine_reward": (x @ self.theta / n).mean().item()}

    def reference(self, name: str = "linear", *, increment: float | None = None,
                  noise_std: float = 0.1) -> dict[str, Any]:
        self._check(name)
        out: dict[str, Any] = {"objective": name, "global_max": 1.0, "in_support_max": 1.0,
                               "pretrain_mean_value": 0.0}
        if increment is not None:
            lam = increment_to_lambda(increment, noise_std)
            out.update(increment=increment, noise_std=noise_std, **{"lambda": lam},
                       gaussian_surrogate_regularized_value=1.0 / (D * lam))
        return out
