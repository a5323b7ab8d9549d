"""Gradient guidance: naive gradient, look-ahead (G_loss), DPS and reward guidance.

=================  ========================================================  ===================
term               G(x, σ)                                                   cost per NFE
=================  ========================================================  ===================
NaiveGradient      ``β(σ)·∇f(x)`` at the noisy x, or ``β(σ)(y − gᵀx0_hat)g``  model fwd
LookAhead (G_loss) ``−β(σ)·∇ₓ(y − gᵀx0_hat(x))² = 2β(y − gᵀx0_hat)·Jᵀg``      model fwd+bwd
LinearObs.         ``JᵀPᵀ(σ_y²I + σ²PJPᵀ)⁻¹(y − P·x0_hat)`` (m observations)   fwd + m bwd
DPS                ``−ζ·∇ₓ‖y_meas − 𝒜(x0_hat(x))‖``                           model fwd+bwd
RewardGuidance     ``−s·∇ ½(a − f̂(x0_hat))²``                                 reward fwd+bwd
=================  ========================================================  ===================

Conversion of the official VP rules of Guo, Yuan, Yang, Chen & Wang (NeurIPS 2024, "Gradient
guidance for diffusion models: an optimization perspective"; their code's ``cond_score_v1`` and
``cond_score_v2``) to VE. With ``ᾱ = 1/(1+σ²)``, ``α = √ᾱ``, ``h = 1 − ᾱ`` the VP variable is
``z = α·x``; densities differ by a constant Jacobian, so ``∇_z = (1/α)·∇ₓ`` and a correction G_VP of
the VP score is the correction ``G = α·G_VP`` of the VE score. The official x̂0 = (z + h·s_z)/α
equals the VE ``x0_hat`` (h/α² = σ²).

- Naive (``cond_score_v1``): ``G_VP = α/(σ_y² + h‖g‖²)·(y − gᵀx̂0)·g``, hence
  ``G = (y − gᵀx0_hat)·g / ((1+σ²)σ_y² + σ²‖g‖²)``. For x0 ~ N(0, I_D) this is exactly
  ∇ₓ log p_σ(y | x) (tested).
- Look-ahead (``cond_score_v2``): ``G_VP = −β_t∇_z(y − v)²`` with ``β_t = (α²/2)/(α²σ_y² + h‖∇_z v‖²)``,
  v = gᵀx̂0. Since ``α∇_z = ∇ₓ`` the same β multiplies ``−∇ₓ(y − v)²``, and with
  ``‖∇_z v‖² = (1+σ²)‖∇ₓ v‖²``: ``β_official = 1 / (2(σ_y² + σ²(1+σ²)‖Jᵀg‖²))``.
- Lemma 1 of Guo et al.: ``β_lemma1 = 1 / (2(σ_y² + gᵀCov[x0|x]g))`` with ``Cov[x0|x] = σ²·J``,
  ``J = ∂x0_hat/∂x`` (second-order Tweedie), so ``gᵀCov g = σ²·gᵀ(Jᵀg)`` reuses the vector-Jacobian
  product ``Jᵀg`` of the gradient: one forward and one backward pass per evaluation. Exact
  conditional score for Gaussian data and ``y = gᵀx0 + N(0, σ_y²)``; equal to ``β_official`` when
  ``J = AAᵀ/(1+σ²)`` (subspace data with identity latent covariance, the official setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import (
    GuidanceTerm,
    Weight,
    _bcast,
    _check_finite,
    _check_positive,
    _flatdot,
    _no_grad_eps,
    renamed,
)

__all__ = ["BETA_RULES", "DPS", "LinearObservation", "LookAhead", "NaiveGradient",
           "RewardGuidance"]

#: the named step-size rules of :class:`LookAhead`
BETA_RULES = ("lemma1", "official")


def _gy(owner: str, g: Tensor, y: Tensor, x: Tensor, rows: slice, batch: int
        ) -> tuple[Tensor, Tensor]:
    """Per-chunk g (broadcastable to x) and y (len(x),), with shape checks."""
    dims = tuple(x.shape[1:])
    if tuple(g.shape) == dims:
        gc = g.to(x).unsqueeze(0)
    elif g.ndim == len(dims) + 1 and tuple(g.shape[1:]) == dims and g.shape[0] == batch:
        gc = g[rows].to(x)
    else:
        raise ValueError(f"{owner}: g has shape {tuple(g.shape)}, expected {dims} (shared) or "
                         f"({batch}, {', '.join(map(str, dims))}) (per sample) for x of shape "
                         f"({batch}, {', '.join(map(str, dims))})")
    if y.ndim == 0:
        yc = y.to(x).expand(len(x))
    elif y.shape == (batch,):
        yc = y[rows].to(x)
    else:
        raise ValueError(f"{owner}: y has shape {tuple(y.shape)}, expected a number or ({batch},) "
                         "(one target per sample)")
    return gc, yc


def _check_gy(owner: str, g: Any, y: Any) -> tuple[Tensor, Tensor]:
    g = torch.as_tensor(g)
    if g.ndim < 1 or not g.is_floating_point():
        raise ValueError(f"{owner}: g must be a float tensor of shape (*dims) or (B, *dims), got "
                         f"{g.dtype} of shape {tuple(g.shape)}")
    y = torch.as_tensor(y, dtype=g.dtype)
    if y.ndim > 1:
        raise ValueError(f"{owner}: y must be a number or a (B,) tensor, got shape "
                         f"{tuple(y.shape)}")
    if not torch.isfinite(g).all():
        raise FloatingPointError(f"{owner}: g is not finite")
    if not torch.isfinite(y).all():
        raise FloatingPointError(f"{owner}: y is not finite")
    return g.detach(), y.detach()


def _beta_rule(owner: str, beta: Any, allowed: Sequence[str]) -> Any:
    if isinstance(beta, str):
        if beta not in allowed:
            raise ValueError(f"{owner}: unknown beta rule {beta!r}; choose one of "
                             f"{', '.join(map(repr, allowed))}, a number >= 0 or a callable of "
                             "sigma")
        return beta
    return Weight(beta, name="beta")


def _eval_beta_const(beta: Weight, sigma: Tensor, n: int) -> Tensor:
    b = beta(sigma)
    return b.expand(n) if b.ndim == 0 else b


class NaiveGradient(GuidanceTerm):
    """Naive gradient guidance (Guo et al., NeurIPS 2024, §3; the official ``cond_score_v1``): no model backprop.

    Two forms:

    - **linear** ``NaiveGradient(g, y, beta="official", noise_std=σ_y)``:
      ``G = β(σ)·(y − gᵀx0_hat)·g`` with x0_hat = x − σ·eps **not** differentiated. The official
      β (VP ``α/(σ_y² + h‖g‖²)`` in the official code) written for the VE score is
      ``β = 1/((1+σ²)σ_y² + σ²‖g‖²)``, exactly ∇ₓ log p_σ(y | x) for x0 ~ N(0, I_D).
      ``beta`` may also be a number ≥ 0 or a callable of σ. Note the convention: β multiplies
      ``(y − gᵀx0_hat)g`` directly (no factor 2, unlike :class:`LookAhead`).
    - **objective** ``NaiveGradient(objective=f, scale=…)``: ``G = scale(σ)·∇f(x)`` at the *noisy*
      point; ``f(x) -> (B,)`` by autograd, or any object with
      ``value_and_grad(x)`` (``od.optimize.Objective``). The named β rules do not apply here
      (β ≡ 1 unless ``beta`` is a number or callable, which multiplies ``scale``).

    g: (*dims) or (B, *dims); y: a number or (B,). Other knobs as :class:`GuidanceTerm`.
    """

    name = "NaiveGradient"

    def __init__(self, g: Any = None, y: Any = None, *, objective: Any = None,
                 beta: Any = "official", noise_std: float = 0.1, scale: Any = 1.0,
                 **kwargs: Any):
        super().__init__(scale=scale, **kwargs)
        self.noise_std = _check_positive(noise_std, "noise_std")
        if objective is not None:
            if g is not None or y is not None:
                raise ValueError("NaiveGradient: give either (g, y) (linear form) or objective=f, "
                                 "not both")
            if not callable(objective) and not hasattr(objective, "value_and_grad"):
                raise TypeError("NaiveGradient: objective must be callable f(x) -> (B,)")
            self.objective = objective
            self.g = self.y = None
            if isinstance(beta, str):
                _beta_rule(self.name, beta, ("official",))
                self.beta = None  # the named rule belongs to the linear form: β ≡ 1 here
            else:
                self.beta = Weight(beta, name="beta")
        else:
            if g is None or y is None:
                raise ValueError("NaiveGradient needs (g, y) or objective=f")
            self.objective = None
            self.g, self.y = _check_gy(self.name, g, y)
            self.beta = _beta_rule(self.name, beta, ("official",))

    def _correction(self, model, x, sigma, cond, rows, batch):
        eps = _no_grad_eps(model, x, sigma, cond)
        if self.objective is not None:
            grad = _objective_grad(self.objective, x, self.name, sigma, rows.start)[1]
            if self.beta is not None:
                grad = _bcast(_eval_beta_const(self.beta, sigma, len(x)), x) * grad
            return eps, grad
        g, y = _gy(self.name, self.g, self.y, x, rows, batch)
        x0 = x - _bcast(sigma, x) * eps
        v = _flatdot(g, x0)
        _check_finite(v, "the objective value gᵀx0_hat", self.name, sigma, rows.start)
        if self.beta == "official":
            s2 = sigma**2
            beta = 1.0 / ((1 + s2) * self.noise_std**2 + s2 * (g * g).flatten(1).sum(1))
        else:
            beta = _eval_beta_const(self.beta, sigma, len(x))
        return eps, _bcast(beta * (y - v), x) * g.expand_as(x)

    def __repr__(self) -> str:
        if self.objective is not None:
            return f"NaiveGradient(objective={self.objective!r}, scale={self.scale!r})"
        return f"NaiveGradient(g{tuple(self.g.shape)}, y{tuple(self.y.shape)}, beta={self.beta!r})"


def _objective_grad(f: Any, x: Tensor, who: str, sigma: Tensor | None, offset: int = 0
                    ) -> tuple[Tensor, Tensor]:
    """(f(x), ∇f(x)) with finiteness checks; autograd unless f has ``value_and_grad``."""
    if hasattr(f, "value_and_grad"):
        v, grad = f.value_and_grad(x.detach())
    else:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = f(xg)
            if not isinstance(v, Tensor) or v.shape != (len(x),):
                raise ValueError(f"{who}: the objective must return shape ({len(x)},), got "
                                 f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
            _check_finite(v, "the objective value f(x)", who, sigma, offset)
            (grad,) = torch.autograd.grad(v.sum(), xg)
    _check_finite(v, "the objective value f(x)", who, sigma, offset)
    _check_finite(grad, "the objective gradient ∇f(x)", who, sigma, offset)
    return v.detach(), grad.detach()


class LookAhead(GuidanceTerm):
    """Look-ahead loss guidance G_loss (Guo et al., NeurIPS 2024, Definition 1; official ``cond_score_v2``):

        G = −β(σ)·∇ₓ (y − gᵀx0_hat(x))² = 2β(σ)·(y − gᵀx0_hat)·Jᵀg,   J = ∂x0_hat/∂x,

    by autograd **through the model**: one forward and one backward pass per evaluation (the
    vector-Jacobian product of Σ_b g_bᵀx0_hat_b w.r.t. x gives every sample's ``Jᵀg``, since models
    act row-wise).

    Step size ``beta``:
        - ``"lemma1"`` (default; Lemma 1 of Guo et al.): ``β = 1/(2(σ_y² + σ²·gᵀJᵀg))`` using
          ``Cov[x0|x] = σ²J`` (second-order Tweedie). For Gaussian data and y = gᵀx0 + N(0, σ_y²)
          G is then exactly ∇ₓ log p_σ(y | x). (gᵀJᵀg is clamped at 0 for a learned model whose J
          is not PSD.)
        - ``"official"`` (the authors' code in VE form, module doc):
          ``β = 1/(2(σ_y² + σ²(1+σ²)‖Jᵀg‖²))``; equals lemma1 for subspace data with identity
          latent covariance.
        - a number ≥ 0 or a callable of σ.

    Args:
        g: (*dims) shared or (B, *dims) per sample. y: a number or (B,).
        noise_std: σ_y of the observation model (0.1 as the official code).
        scale: extra weight w(σ) (the official ``beta_coef``), with ``interval``.
        grad_through_model: False treats x0_hat as a constant (J = I): ``G = 2β(y − gᵀx0_hat)g``,
            no backward pass; lemma1 then uses ``Cov[x0|x] = σ²I`` (the flat-prior limit), i.e.
            ``β = 1/(2(σ_y² + σ²‖g‖²))``, and official ``β = 1/(2(σ_y² + σ²(1+σ²)‖g‖²))``.
        clip, rescale, chunk_size, interval: see :class:`GuidanceTerm`.

    :meth:`from_objective` builds it from a differentiable objective linearised at a reference point.
    """

    name = "LookAhead"

    def __init__(self, g: Any, y: Any, *, beta: Any = "lemma1", noise_std: float = 0.1,
                 scale: Any = 1.0, grad_through_model: bool = True, **kwargs: Any):
        super().__init__(scale=scale, **kwargs)
        self.g, self.y = _check_gy(self.name, g, y)
        self.beta = _beta_rule(self.name, beta, BETA_RULES)
        self.noise_std = _check_positive(noise_std, "noise_std")
        self.grad_through_model = bool(grad_through_model)

    @classmethod
    def from_objective(cls, f: Any, x_ref: Tensor, target: float | Tensor | None = None, *,
                       increment: float | Tensor | None = None, **kwargs: Any) -> LookAhead:
        """Linearise a differentiable objective at ``x_ref`` (Guo et al., NeurIPS 2024, Algorithm 1):
        ``f(x) ≈ f(x_ref) + gᵀ(x − x_ref)`` with ``g = ∇f(x_ref)``, and ask for

        - ``target`` f*: ``y = f* − f(x_ref) + gᵀx_ref`` (the official image code's fixed target), or
        - ``increment`` δ: ``y = gᵀx_ref + δ`` (the official simulations' rule).

        ``x_ref`` has shape (B, *dims) (one reference per sample; ``f`` maps (B, *dims) -> (B,)); a
        batch of one gives a shared g and a scalar y. ``f`` may be any callable (autograd) or an
        object with ``value_and_grad``. Other keyword arguments go to :class:`LookAhead`.
        """
        if (target is None) == (increment is None):
            raise ValueError("LookAhead.from_objective: give exactly one of target= or increment=")
        x_ref = torch.as_tensor(x_ref)
        if x_ref.ndim < 2:
            raise ValueError(f"x_ref must have shape (B, *dims), got {tuple(x_ref.shape)}")
        v, g = _objective_grad(f, x_ref, "LookAhead.from_objective", None)
        lin = _flatdot(g, x_ref)
        y = lin + increment if increment is not None else target - v + lin
        y = torch.as_tensor(y, dtype=g.dtype)
        if len(x_ref) == 1:
            return cls(g[0], y.reshape(-1)[0], **kwargs)
        return cls(g, y, **kwargs)

    def _correction(self, model, x, sigma, cond, rows, batch):
        g, y = _gy(self.name, self.g, self.y, x, rows, batch)
        sig = _bcast(sigma, x)
        if self.grad_through_model:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                eps = model(xg, sigma, cond)
                if not eps.requires_grad:
                    raise RuntimeError(
                        "LookAhead: the model output does not depend on x through autograd (did it "
                        "run under torch.no_grad()?); use grad_through_model=False to treat x0_hat "
                        "as a constant")
                v = _flatdot(g, xg - sig * eps)
                _check_finite(v, "the objective value gᵀx0_hat", self.name, sigma, rows.start)
                (u,) = torch.autograd.grad(v.sum(), xg)  # u_b = J_bᵀ g_b
            eps, v = eps.detach(), v.detach()
            _check_finite(u, "the gradient Jᵀg = ∇ₓ(gᵀx0_hat)", self.name, sigma, rows.start)
        else:
            eps = _no_grad_eps(model, x, sigma, cond)
            v = _flatdot(g, x - sig * eps)
            _check_finite(v, "the objective value gᵀx0_hat", self.name, sigma, rows.start)
            u = g.expand_as(x)
        beta = self._beta(sigma, g, u)
        return eps, _bcast(2 * beta * (y - v), x) * u

    def _beta(self, sigma: Tensor, g: Tensor, u: Tensor) -> Tensor:
        if isinstance(self.beta, Weight):
            return _eval_beta_const(self.beta, sigma, len(u))
        s2 = sigma**2
        if self.beta == "lemma1":
            var = s2 * _flatdot(g.expand_as(u), u).clamp(min=0)  # gᵀCov[x0|x]g = σ²·gᵀJᵀg
        else:  # "official"
            var = s2 * (1 + s2) * (u * u).flatten(1).sum(1)
        return 0.5 / (self.noise_std**2 + var)

    def __repr__(self) -> str:
        return (f"LookAhead(g{tuple(self.g.shape)}, y{tuple(self.y.shape)}, beta={self.beta!r}, "
                f"noise_std={self.noise_std})")


class LinearObservation(GuidanceTerm):
    """Conditioning on m linear observations ``y = P x0 + N(0, σ_y²I)`` (forecasting, in-filling,
    window means): Lemma 1 of Guo et al. (NeurIPS 2024) with a vector observation,

        G = ∇ₓ log p_σ(y | x) = Jᵀ Pᵀ (σ_y² I + σ² P J Pᵀ)⁻¹ (y − P x0_hat),   J = ∂x0_hat/∂x,

    using ``Cov[x0 | x] = σ²J`` (second-order Tweedie) for the covariance of ``P x0`` given x.
    For Gaussian data G is exactly the conditional score, so the guided model is the exact
    denoiser of the conditional law; with one row it is :class:`LookAhead` with ``beta="lemma1"``.
    Cost: one forward and m backward passes per evaluation (the rows ``Jᵀp_j``); ``P J Pᵀ`` is
    symmetrised (a learned J need not be symmetric).

    Args:
        P: (m, *dims) observation rows (or (*dims) for one). y: (m,) shared or (B, m) per sample.
        noise_std: σ_y > 0. Other knobs as :class:`GuidanceTerm`.
    """

    name = "LinearObservation"

    def __init__(self, P: Any, y: Any, *, noise_std: float = 0.1, scale: Any = 1.0,
                 **kwargs: Any):
        super().__init__(scale=scale, **kwargs)
        P = torch.as_tensor(P)
        if not P.is_floating_point() or P.ndim < 1 or not torch.isfinite(P).all():
            raise ValueError(f"{self.name}: P must be a finite float tensor of shape (m, *dims), "
                             f"got {P.dtype} of shape {tuple(P.shape)}")
        y = torch.as_tensor(y, dtype=P.dtype)
        if not torch.isfinite(y).all():
            raise FloatingPointError(f"{self.name}: y is not finite")
        self.P, self.y = P.detach(), y.detach()
        self.noise_std = _check_positive(noise_std, "noise_std")

    def _correction(self, model, x, sigma, cond, rows, batch):
        dims = tuple(x.shape[1:])
        P = self.P.to(x)
        if tuple(P.shape) == dims:
            P = P.unsqueeze(0)
        if tuple(P.shape[1:]) != dims:
            raise ValueError(f"{self.name}: P has shape {tuple(self.P.shape)}, expected (m, "
                             f"{', '.join(map(str, dims))}) for x of shape {tuple(x.shape)}")
        P = P.flatten(1)
        m = len(P)
        y = self.y.to(x)
        if y.shape == (m,):
            y = y.expand(len(x), m)
        elif y.shape == (batch, m):
            y = y[rows]
        else:
            raise ValueError(f"{self.name}: y has shape {tuple(self.y.shape)}, expected ({m},) or "
                             f"({batch}, {m})")
        sig = _bcast(sigma, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = model(xg, sigma, cond)
            v = (xg - sig * eps).flatten(1) @ P.T                             # (B, m) = P x0_hat
            _check_finite(v, "the observation P·x0_hat", self.name, sigma, rows.start)
            U = torch.stack([torch.autograd.grad(v[:, j].sum(), xg, retain_graph=j < m - 1)[0]
                             .flatten(1) for j in range(m)], 1)                # (B, m, D): Jᵀp_j
        _check_finite(U, "the gradients Jᵀp_j", self.name, sigma, rows.start)
        M = U @ P.T                                                           # (P J Pᵀ)_kj
        s2 = (sigma**2).reshape(-1, 1, 1) if sigma.ndim else sigma**2
        S = self.noise_std**2 * torch.eye(m, dtype=x.dtype, device=x.device) + s2 * (
            M + M.transpose(1, 2)) / 2
        w = torch.linalg.solve(S, (y - v.detach()).unsqueeze(-1))           # (B, m, 1)
        return eps.detach(), (U.transpose(1, 2) @ w).reshape(x.shape)

    def __repr__(self) -> str:
        return (f"LinearObservation(P{tuple(self.P.shape)}, y{tuple(self.y.shape)}, "
                f"noise_std={self.noise_std})")


class DPS(GuidanceTerm):
    """Diffusion posterior sampling (Chung et al., ICLR 2023, Algorithm 1) as a score correction:

        G = −ζ(σ)·∇ₓ ‖y_meas − 𝒜(x0_hat(x))‖                 (normalize=True, default)
        G = −ζ(σ)·∇ₓ ½‖y_meas − 𝒜(x0_hat(x))‖²               (normalize=False)

    DPS approximates ∇log p(y|x_t) by the Gaussian likelihood of the residual, ∝ −(1/σ_y²)∇‖y −
    𝒜(x̂0)‖², and its Algorithm 1 replaces the scale by the normalised step
    ζ_i = ζ'/‖y − 𝒜(x̂0)‖; since ``∇‖r‖²/‖r‖ = 2∇‖r‖`` that is the gradient of the residual
    *norm* (here ζ = 2ζ'), which is what the official code (DPS2022/diffusion-posterior-sampling,
    ``PosteriorSampling``: ``x_{t−1} −= scale·∇_{x_t}‖y − 𝒜(x̂0)‖``) differentiates. Choices made
    here: (1) the norm is per sample (the official code takes one norm over the whole batch, which
    couples the samples); (2) it is a score correction (``eps − σG``), so it composes with every
    sampler and ζ is a strength per unit of σ²: the official code instead subtracts ``ζ'∇‖r‖``
    from x after each of its 1000 DDPM steps, i.e. ζ ≈ ζ'/(σ_t² − σ_{t−1}²) per step in VE terms;
    (3) ``normalize=False`` gives the unnormalised Gaussian-likelihood form (ζ = 1/σ_y²). The
    gradient is taken through the model (``grad_through_model=False``: J = I, w.r.t. x0_hat).

    Args:
        operator: differentiable ``𝒜(x0) -> (B, *m)``. y_meas: (*m) shared or (B, *m) per sample.
        scale: the strength ζ (number ≥ 0 or callable of σ; ``zeta=`` is the deprecated
            spelling). Other knobs as :class:`GuidanceTerm`.
    """

    name = "DPS"

    def __init__(self, operator: Callable[[Tensor], Tensor], y_meas: Tensor, scale: Any = 1.0, *,
                 normalize: bool = True, grad_through_model: bool = True, **kwargs: Any):
        if "zeta" in kwargs:
            scale = renamed(kwargs, "zeta", "scale", "DPS").pop("scale")
        super().__init__(scale=scale, **kwargs)
        if not callable(operator):
            raise TypeError("DPS: operator must be callable x0 -> measurement")
        y_meas = torch.as_tensor(y_meas)
        if not torch.isfinite(y_meas).all():
            raise FloatingPointError("DPS: y_meas is not finite")
        self.operator, self.y_meas = operator, y_meas.detach()
        self.normalize = bool(normalize)
        self.grad_through_model = bool(grad_through_model)

    def _residual(self, x0: Tensor, rows: slice, batch: int) -> Tensor:
        out = self.operator(x0)
        y = self.y_meas.to(out)
        if out.ndim < 1 or out.shape[0] != len(x0):
            raise ValueError(f"DPS: operator returned shape {tuple(out.shape)} for x0 of batch "
                             f"{len(x0)}; expected (B, *m)")
        if y.shape == out.shape[1:]:
            return y - out
        if y.ndim == out.ndim and y.shape[0] == batch and y.shape[1:] == out.shape[1:]:
            return y[rows] - out
        raise ValueError(f"DPS: y_meas has shape {tuple(y.shape)}, expected {tuple(out.shape[1:])} "
                         f"(shared) or ({batch}, {', '.join(map(str, out.shape[1:]))}) (per sample)")

    def _correction(self, model, x, sigma, cond, rows, batch):
        sig = _bcast(sigma, x)
        with torch.enable_grad():
            if self.grad_through_model:
                xg = x.detach().requires_grad_(True)
                eps = model(xg, sigma, cond)
                x0 = xg - sig * eps
            else:
                eps = _no_grad_eps(model, x, sigma, cond)
                xg = (x - sig * eps).detach().requires_grad_(True)
                x0 = xg
            loss = self._loss(x0, rows, batch)
            _check_finite(loss, f"the {self.loss_name}", self.name, sigma, rows.start)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        _check_finite(grad, f"the gradient of the {self.loss_name}", self.name, sigma, rows.start)
        if self.normalize:  # ∇‖r‖ = ∇(½‖r‖²)/‖r‖
            grad = grad / _bcast(loss.detach().mul(2).sqrt().clamp(min=1e-30), x)
        return eps.detach(), -grad

    loss_name = "residual ‖y_meas − 𝒜(x0_hat)‖"

    def _loss(self, x0: Tensor, rows: slice, batch: int) -> Tensor:
        """Per-sample ½‖y_meas − 𝒜(x0)‖², shape (B,)."""
        r = self._residual(x0, rows, batch).flatten(1)
        return 0.5 * (r * r).sum(1)


class RewardGuidance(DPS):
    """Guidance by a learned reward f̂ on the denoised estimate (classifier guidance with a reward
    model; the image code of Yuan et al., NeurIPS 2023, "Reward-directed conditional diffusion"):

        G = −s·∇ ½(a − f̂(x0_hat))²   (a Gaussian likelihood N(a; f̂, 1/s) of the target a)
        G = s·∇ f̂(x0_hat)            (``target=None``: plain ascent)

    It is :class:`DPS` with the reward as the operator, the target as the measurement and no
    normalisation. By default the gradient is taken w.r.t. x0_hat (``grad_through_model=False``: no
    backward pass through the network); the move of x0_hat is best bounded with ``max_move``. To
    correct a classifier-free-guided ε, pass ``guided_model(model, ClassifierFree(w))`` as the
    model.
    """

    name = "RewardGuidance"
    loss_name = "reward loss ½(a − f̂(x0_hat))²"

    def __init__(self, reward: Callable[[Tensor], Tensor], target: float | None = None, *,
                 scale: Any = 1.0, grad_through_model: bool = False, **kwargs: Any):
        if target is not None and not math.isfinite(target):
            raise ValueError(f"RewardGuidance: target must be finite, got target={target}")
        super().__init__(reward, torch.zeros(()), scale, normalize=False,
                         grad_through_model=grad_through_model, **kwargs)
        self.target = None if target is None else float(target)

    def _loss(self, x0: Tensor, rows: slice, batch: int) -> Tensor:
        f = self.operator(x0).reshape(-1)
        if f.shape != (len(x0),):
            raise ValueError(f"RewardGuidance: the reward returned {tuple(f.shape)} values for a "
                             f"batch of {len(x0)}; expected one per sample")
        return -f if self.target is None else 0.5 * (self.target - f) ** 2
