"""Guidance terms: every guidance is a score correction G(x, σ).

In VE coordinates (``x = x0 + σ·ε``) a model predicts ε, Tweedie's estimate is
``x0_hat = x − σ·eps`` and the score is ``−eps/σ``. A score correction G turns the model into

    eps_guided = eps − σ·G        (so the score becomes score + G and x0_hat moves by σ²·G).

Each term is a callable ``guidance(model, x, sigma, cond) -> eps_guided`` (the protocol
:class:`optidiff.sampling.Guidance`), called once per network evaluation by every sampler of
``od.sample``, so every guidance composes with every sampler. Terms add up: ``a + b`` (or
``Sum([a, b, …])``) sums the corrections.

=================  ========================================================  ===================
term               G(x, σ)                                                   cost per NFE
=================  ========================================================  ===================
ClassifierFree     ``eps_u + w·(eps_c − eps_u)`` (diffusers' guidance_scale)  one batched call
Classifier         ``s·∇ₓ log c(y | x, σ)``                                  classifier fwd+bwd
NaiveGradient      ``β(σ)·∇f(x)`` at the noisy x, or ``β(σ)(y − gᵀx0_hat)g``  model fwd
LookAhead (G_loss) ``−β(σ)·∇ₓ(y − gᵀx0_hat(x))² = 2β(y − gᵀx0_hat)·Jᵀg``      model fwd+bwd
LinearObservation  ``JᵀPᵀ(σ_y²I + σ²PJPᵀ)⁻¹(y − P·x0_hat)`` (forecast, in-fill)  fwd + m bwd
DPS                ``−ζ·∇ₓ‖y_meas − 𝒜(x0_hat(x))‖``                           model fwd+bwd
RewardGuidance     ``−s·∇ ½(a − f̂(x0_hat))²`` (DPS with a reward model)        reward fwd+bwd
=================  ========================================================  ===================

The weight of every term is called ``scale`` (a number ≥ 0 or a function of σ, with an optional
active ``interval=(sigma_lo, sigma_hi)`` outside which G = 0). Robustness knobs of every gradient
guidance: ``clip`` (max per-sample ‖G‖), ``rescale`` (bound ``‖σG‖ ≤ rescale·‖eps‖``), ``max_move``
(bound ``σ²‖G‖``, the move of x0_hat), ``grad_through_model=False`` (x0_hat treated as a constant,
J = I), ``chunk_size`` (evaluate the batch in chunks, per-sample targets sliced along), and a
:class:`FloatingPointError` naming the quantity, σ and the rows when a value or gradient is not
finite.
"""

from .base import GuidanceTerm, Sum, Weight, guided_model
from .conditional import Classifier, ClassifierFree
from .gradient import BETA_RULES, DPS, LinearObservation, LookAhead, NaiveGradient, RewardGuidance

__all__ = ["BETA_RULES", "DPS", "Classifier", "ClassifierFree", "GuidanceTerm",
           "LinearObservation", "LookAhead",
           "NaiveGradient", "RewardGuidance", "Sum", "Weight", "guided_model"]
