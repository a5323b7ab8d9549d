"""Generative optimization with diffusion models (seed 000; DESIGN.md §3.5).

- :class:`Objective`: a counted objective with an autograd or user-supplied gradient oracle.
- :func:`gradient_guided`: Algorithm 1 (the pre-trained model is fixed; guidance only).
- :func:`adaptive`: Algorithm 2 (the model is also fine-tuned on each round's samples).
- :mod:`~optidiff.optimize.reference`: closed-form references of seed 000's theorems
  (regularized optimum x_λ*, λ = σ_y²/δ, the batch-mean map and its rate).

Config-driven runs (``optidiff optimize``) and the demo live in :mod:`optidiff.runs`, at the
CLI layer, since they use the tasks, config and report layers.
"""

from . import reference
from .adaptive import DSMFinetune, GaussianRefit, adaptive, refit_gaussian
from .gradient_guided import OptimizeResult, gradient_guided, make_guidance
from .objectives import Objective, ObjectiveError, as_objective
from .offline import reward_conditioned

__all__ = [
           "DSMFinetune",
           "GaussianRefit",
           "Objective",
           "ObjectiveError",
           "OptimizeResult",
           "adaptive",
           "as_objective",
           "gradient_guided",
           "make_guidance",
           "reference",
           "refit_gaussian",
           "reward_conditioned",
]
