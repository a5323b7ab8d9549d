"""The user's task: what optidiff's runs need besides the objective (data, metrics, a 2-D view)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from .data import RingDataset


@dataclass
class RingTask:
    """Points near the unit circle; the metric is how far samples leave it."""

    seed: int = 0
    name: ClassVar[str] = "ring"
    objectives: ClassVar[tuple[str, ...]] = ()  # objectives come from task.objective = "..."
    plot_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        ("radius_deviation", "mean |‖x‖ − 1|"),)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2,)

    def data(self, n: int | None = None) -> torch.Tensor:
        return RingDataset(n or 4096, self.seed).x

    def metrics(self, x: torch.Tensor) -> dict[str, float]:
        return {"radius_deviation": (x.norm(dim=1) - 1).abs().mean().item()}

    def projection(self, objective: str, x: torch.Tensor) -> tuple[torch.Tensor, str, str]:
        return x.detach(), "x₁", "x₂"
