"""optidiff: diffusion models seen through optimization.

One convention (variance-exploding σ): a model is ``model(x, sigma, cond=None) -> eps`` with
``x = x0 + σ·ε``; see DESIGN.md §1.
"""

from . import models, schedules
from .sampling import Step, sample, sample_iter
from .schedules import (CosineSchedule, DDPMSchedule, KarrasSchedule, LDMSchedule,
                        LogLinearSchedule, SigmoidSchedule)

__version__ = "0.1.0"

__all__ = ["models", "schedules", "sample", "sample_iter", "Step", "LogLinearSchedule",
           "DDPMSchedule", "LDMSchedule", "CosineSchedule", "SigmoidSchedule", "KarrasSchedule"]
