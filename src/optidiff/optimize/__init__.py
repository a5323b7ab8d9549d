"""Generative optimization with diffusion models: the algorithms, no tasks.

- :class:`Objective`: a counted objective with an autograd or user-supplied gradient oracle.
- :func:`gradient_guided`: Algorithm 1 of Guo, Yuan, Yang, Chen & Wang (NeurIPS 2024) (the
  pre-trained model is fixed; guidance only).
- :func:`adaptive`: their Algorithm 2 (the model is also fine-tuned on each round's samples).
- :mod:`~optidiff.optimize.delivered`: the delivered fraction of a guided round, the plateau it
  implies, and the corrected target rule.
- :mod:`~optidiff.optimize.reference`: closed-form references of their theorems (regularized
  optimum x_λ*, λ = σ_y²/δ, the batch-mean map and its rate).
- :mod:`~optidiff.optimize.rewards` and :mod:`~optidiff.optimize.offline`: offline reward
  maximization (reward models; reward-conditioned diffusion and its variants).

Results load back from their run directories with :func:`load_result` (:mod:`optidiff.results`).

Config-driven runs (``optidiff optimize``) and the demo live in :mod:`optidiff.runs`.
"""

from typing import Any

from . import delivered, reference
from .adaptive import DSMFinetune, GaussianRefit, adaptive, refit_gaussian
from .gradient_guided import OptimizeResult, gradient_guided, make_guidance
from .objectives import Objective, ObjectiveError, as_objective
from .offline import OfflineResult, ddom_schedule, reward_conditioned, reward_guided, subopt
from .rewards import (
                      EnsembleReward,
                      MLPReward,
                      RidgeReward,
                      ddom_weights,
                      fit_reward,
                      gradient_ascent,
                      pseudo_label,
)

__all__ = ["DSMFinetune", "EnsembleReward", "GaussianRefit", "MLPReward", "Objective",
           "ObjectiveError", "OfflineResult", "OptimizeResult", "RidgeReward", "adaptive",
           "as_objective", "ddom_schedule", "ddom_weights", "delivered", "fit_reward",
           "gradient_ascent", "gradient_guided", "load_result", "make_guidance", "pseudo_label",
           "reference", "refit_gaussian", "reward_conditioned", "reward_guided", "subopt"]


def load_result(run_dir: Any, device: Any = None) -> OptimizeResult:
    """The :class:`OptimizeResult` saved in ``run_dir`` by ``result.save``, or written there by
    ``gradient_guided``/``adaptive`` (``run_dir=``) or ``optidiff optimize``: history, samples,
    best samples and the model (see :mod:`optidiff.results`)."""
    return OptimizeResult.load(run_dir, device)

