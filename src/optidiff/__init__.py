"""optidiff: diffusion models seen through optimization.

One convention (variance-exploding σ): a model is ``model(x, sigma, cond=None) -> eps`` with
``x = x0 + σ·ε``; Tweedie's denoised estimate is ``x0_hat = x − σ·eps`` and the score ``−eps/σ``.
Importing optidiff has no side effects and imports neither diffusers, matplotlib nor pydantic.
"""

from . import checkpoint, guidance, models, optimize, results, schedules
from .checkpoint import CheckpointError
from .models.registry import load_model, save_model
from .sampling import Step, sample, sample_iter
from .schedules import (
                        CosineSchedule,
                        DDPMSchedule,
                        KarrasSchedule,
                        LDMSchedule,
                        LogLinearSchedule,
                        SigmoidSchedule,
)
from .training import TrainResult, dsm_loss, train

__version__ = "0.2.0"

__all__ = ["CheckpointError", "CosineSchedule", "DDPMSchedule", "KarrasSchedule", "LDMSchedule",
           "LogLinearSchedule", "SigmoidSchedule", "Step", "TrainResult", "checkpoint",
           "dsm_loss", "guidance", "load_model", "models", "optimize", "results", "sample",
           "sample_iter", "save_model", "schedules", "train"]
