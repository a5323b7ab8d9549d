"""optidiff: diffusion models seen through optimization.

One convention (variance-exploding σ): a model is ``model(x, sigma, cond=None) -> eps`` with
``x = x0 + σ·ε``; see DESIGN.md §1.
"""

from . import checkpoint, models, schedules
from . import guidance
from .checkpoint import CheckpointError
from .sampling import Step, sample, sample_iter
from .schedules import (CosineSchedule, DDPMSchedule, KarrasSchedule, LDMSchedule,
                        LogLinearSchedule, SigmoidSchedule)
from .training import TrainResult, dsm_loss, load_model, save_model, train
from . import optimize  # after .training, which optimize uses

__version__ = "0.1.0"

__all__ = ["models", "schedules", "guidance", "optimize", "sample", "sample_iter", "Step", "LogLinearSchedule",
           "DDPMSchedule", "LDMSchedule", "CosineSchedule", "SigmoidSchedule", "KarrasSchedule",
           "checkpoint", "CheckpointError", "train", "dsm_loss", "TrainResult", "save_model",
           "load_model"]
