"""Guidance terms: every guidance is a score correction G(x, σ) (DESIGN.md §1 and §3.4).

In VE coordinates (``x = x0 + σ·ε``) a model predicts ε, Tweedie's estimate is
``x0_hat = x − σ·eps`` and the score is ``−eps/σ``. A score correction G turns the model into

    eps_guided = eps − σ·G        (so the score becomes score + G and x0_hat moves by σ²·G).

Each term below is a callable ``guidance(model, x, sigma, cond) -> eps_guided`` (the protocol
:class:`optidiff.sampling.Guidance`), called once per network evaluation by every sampler of
``od.sample`` (DDIM, DDPM, GE, DPM-Solver++(2M), Heun, reverse SDE), so every guidance composes
with every sampler. Terms add up: ``a + b`` (or ``Sum([a, b, …])``) sums the corrections.

=================  ========================================================  ===================
term               G(x, σ)                                                   cost per NFE
=================  ========================================================  ===================
ClassifierFree(w)  ``eps_u + w·(eps_c − eps_u)`` (diffusers' guidance_scale)  one batched call
Classifier         ``s·∇ₓ log c(y | x, σ)``                                  classifier fwd+bwd
NaiveGradient      ``β(σ)·∇f(x)`` at the noisy x, or ``β(σ)(y − gᵀx0_hat)g``  model fwd
LookAhead (G_loss) ``−β(σ)·∇ₓ(y − gᵀx0_hat(x))² = 2β(y − gᵀx0_hat)·Jᵀg``      model fwd+bwd
DPS                ``−ζ·∇ₓ‖y_meas − 𝒜(x0_hat(x))‖``                           model fwd+bwd
=================  ========================================================  ===================

Conversion of the official VP rules (Guo et al., seed 000; ``research/ggdm.md`` §2) to VE. With
``ᾱ = 1/(1+σ²)``, ``α = √ᾱ``, ``h = 1 − ᾱ`` the VP variable is ``z = α·x``; densities differ by a
constant Jacobian, so ``∇_z = (1/α)·∇ₓ`` and a correction G_VP of the VP score is the correction
``G = α·G_VP`` of the VE score. The official x̂0 = (z + h·s_z)/α equals the VE ``x0_hat`` (h/α² = σ²).

- Naive (``cond_score_v1``): ``G_VP = α/(σ_y² + h‖g‖²)·(y − gᵀx̂0)·g``, hence
  ``G = (y − gᵀx0_hat)·g / ((1+σ²)σ_y² + σ²‖g‖²)``. For x0 ~ N(0, I_D) this is exactly
  ∇ₓ log p_σ(y | x) (tested).
- Look-ahead (``cond_score_v2``): ``G_VP = −β_t∇_z(y − v)²`` with ``β_t = (α²/2)/(α²σ_y² + h‖∇_z v‖²)``,
  v = gᵀx̂0. Since ``α∇_z = ∇ₓ`` the same β multiplies ``−∇ₓ(y − v)²``, and with
  ``‖∇_z v‖² = (1+σ²)‖∇ₓ v‖²``: ``β_official = 1 / (2(σ_y² + σ²(1+σ²)‖Jᵀg‖²))``.
- Lemma 1 of seed 000: ``β_lemma1 = 1 / (2(σ_y² + gᵀCov[x0|x]g))`` with ``Cov[x0|x] = σ²·J``,
  ``J = ∂x0_hat/∂x`` (second-order Tweedie), so ``gᵀCov g = σ²·gᵀ(Jᵀg)`` reuses the vector-Jacobian
  product ``Jᵀg`` of the gradient: one forward and one backward pass per evaluation. Exact
  conditional score for Gaussian data and ``y = gᵀx0 + N(0, σ_y²)``; equal to ``β_official`` when
  ``J = AAᵀ/(1+σ²)`` (subspace data with identity latent covariance, the official setting).

Robustness knobs of every gradient guidance: ``clip`` (max per-sample ‖G‖), ``rescale`` (bound
``‖σG‖ ≤ rescale·‖eps‖`` per sample), ``grad_through_model=False`` (x0_hat treated as a constant,
J = I), ``chunk_size`` (evaluate the batch in chunks, per-sample g and y sliced along), and a
:class:`FloatingPointError` naming the quantity, σ and the rows when an objective value or a
gradient is not finite. Weights (``scale``, ``s``, ``zeta``, ``w``) are numbers ≥ 0 or functions
of σ, with an optional active ``interval=(sigma_lo, sigma_hi)`` outside which G = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BETA_RULES",
    "DPS",
    "Classifier",
    "ClassifierFree",
    "GuidanceTerm",
    "LookAhead",
    "NaiveGradient",
    "Sum",
    "Weight",
    "guided_model",
]

Model = Callable[..., Tensor]
#: the named step-size rules of :class:`LookAhead`
BETA_RULES = ("lemma1", "official")


# ------------------------------------------------------------------------------ small helpers

def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """A 0-d or (B,) tensor as a tensor broadcastable against ``x`` of shape (B, *dims)."""
    return v if v.ndim == 0 else v.reshape(-1, *([1] * (x.ndim - 1)))


def _flatdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product ⟨a_b, b_b⟩, shape (B,)."""
    return (a * b).flatten(1).sum(1)


def _rows_of(t: Tensor, rows: slice) -> Tensor:
    return t[rows] if t.ndim > 0 else t


def _chunk_cond(cond: Any, rows: slice, batch: int) -> Any:
    if isinstance(cond, Tensor) and cond.ndim > 0 and cond.shape[0] == batch:
        return cond[rows]
    return cond


def _slices(batch: int, chunk_size: int | None) -> list[slice]:
    if chunk_size is None or chunk_size >= batch:
        return [slice(0, batch)]
    return [slice(i, min(i + chunk_size, batch)) for i in range(0, batch, chunk_size)]


def _as_sigma(sigma: Any, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim not in (0, 1) or (sigma.ndim == 1 and sigma.shape != (len(x),)):
        raise ValueError(f"sigma must be 0-d or of shape (B,)=({len(x)},), got "
                         f"{tuple(sigma.shape)}")
    return sigma


def _fmt_sigma(sigma: Tensor | None) -> str:
    if sigma is None:
        return "x_ref"
    return f"{sigma.item():.6g}" if sigma.ndim == 0 else f"{sigma.tolist()}"


def _check_finite(t: Tensor, what: str, who: str, sigma: Tensor | None, offset: int = 0) -> None:
    """Raise :class:`FloatingPointError` naming ``what``, σ and the offending rows."""
    ok = torch.isfinite(t.detach())
    if ok.all():
        return
    bad = (~ok).flatten(1).any(1) if t.ndim > 1 else ~ok
    rows = (torch.nonzero(bad).flatten() + offset).tolist()
    raise FloatingPointError(f"{who}: {what} is not finite at "
                             f"{'sigma=' if sigma is not None else ''}{_fmt_sigma(sigma)} for "
                             f"samples {rows[:10]}{' …' if len(rows) > 10 else ''} (of the "
                             "batch); check the objective/model or lower the guidance strength")


def _no_grad_eps(model: Model, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    with torch.no_grad():
        return model(x, sigma, cond)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or (
        isinstance(v, Tensor) and v.ndim == 0)


# ------------------------------------------------------------------------------ weights

class Weight:
    """A guidance weight as a function of σ: a number ≥ 0 or a callable ``w(sigma)``, zero outside
    an optional active interval ``[sigma_lo, sigma_hi]`` (σ as a 0-d or (B,) tensor).

    The callable may return a number or a tensor broadcastable to σ; every value must be finite
    and ≥ 0 (checked at each call).
    """

    def __init__(self, value: float | Callable[[Tensor], Any], *, name: str = "scale",
                 interval: tuple[float, float] | None = None):
        self.name = name
        if callable(value) and not isinstance(value, Tensor):
            self.value: Any = value
        elif _is_number(value):
            v = float(value)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 or a callable of sigma, "
                                 f"got {name}={v}")
            self.value = v
        else:
            raise TypeError(f"{name} must be a number or a callable of sigma, got "
                            f"{type(value).__name__}")
        if interval is not None:
            try:
                lo, hi = (float(interval[0]), float(interval[1]))
            except (TypeError, IndexError, ValueError):
                raise ValueError(f"interval must be (sigma_lo, sigma_hi), got {interval!r}") from None
            if not (0 <= lo < hi) or math.isnan(hi):
                raise ValueError(f"interval must satisfy 0 <= sigma_lo < sigma_hi, got {interval!r}")
            interval = (lo, hi)
        self.interval = interval

    @property
    def constant(self) -> float | None:
        """The value when it is a number, else None."""
        return self.value if isinstance(self.value, float) else None

    def __call__(self, sigma: Tensor) -> Tensor:
        if isinstance(self.value, float):
            w = torch.full_like(sigma, self.value)
        else:
            w = torch.as_tensor(self.value(sigma), dtype=sigma.dtype, device=sigma.device)
            w = w.expand_as(sigma) if w.ndim <= sigma.ndim else w
            if w.shape != sigma.shape:
                raise ValueError(f"{self.name}(sigma) returned shape {tuple(w.shape)} for sigma "
                                 f"of shape {tuple(sigma.shape)}")
            if not (torch.isfinite(w).all() and (w >= 0).all()):
                raise ValueError(f"{self.name}(sigma) must be finite and >= 0, got {w.tolist()} at "
                                 f"sigma={_fmt_sigma(sigma)}")
        if self.interval is not None:
            lo, hi = self.interval
            w = torch.where((sigma >= lo) & (sigma <= hi), w, torch.zeros_like(w))
        return w

    def __repr__(self) -> str:
        iv = "" if self.interval is None else f", interval={self.interval}"
        return f"Weight({self.value!r}{iv})"


def _weight(value: Any, name: str, interval: Any) -> Weight:
    return value if isinstance(value, Weight) else Weight(value, name=name, interval=interval)


def _check_positive(v: Any, name: str) -> float:
    if not _is_number(v) or not (math.isfinite(float(v)) and float(v) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={v!r}")
    return float(v)


# ------------------------------------------------------------------------------ base classes

class GuidanceTerm:
    """Base class of a guidance term: a weighted score correction ``w(σ)·G(x, σ)``.

    ``term(model, x, sigma, cond) -> eps − σ·w(σ)·G`` (the sampler protocol);
    :meth:`correction` returns ``w·G`` alone and :meth:`eps_and_correction` both. Subclasses
    implement ``_correction(model, x, sigma, cond, rows, batch) -> (eps, G)`` on one chunk of rows.

    Args (shared by every gradient guidance):
        scale: the weight w(σ) (number ≥ 0 or callable of σ).
        interval: ``(sigma_lo, sigma_hi)``: G = 0 (no extra cost) outside it.
        clip: max per-sample norm of the weighted G: ``G_b ← G_b·min(1, clip/‖G_b‖)``.
        rescale: bound on the relative change of ε: ``σ‖G_b‖ ≤ rescale·‖eps_b‖`` per sample.
        chunk_size: evaluate the guided model on batch chunks of this size (memory of the backward
            pass); per-sample targets are sliced with the chunk. Same result as one chunk.
    """

    name = "guidance"

    def __init__(self, *, scale: Any = 1.0, interval: tuple[float, float] | None = None,
                 clip: float | None = None, rescale: float | None = None,
                 chunk_size: int | None = None, scale_name: str = "scale"):
        self.scale = _weight(scale, scale_name, interval)
        self.clip = None if clip is None else _check_positive(clip, "clip")
        self.rescale = None if rescale is None else _check_positive(rescale, "rescale")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
                chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
        self.chunk_size = chunk_size

    # -- protocol
    def __call__(self, model: Model, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sigma = _as_sigma(sigma, x)
        eps, G = self.eps_and_correction(model, x, sigma, cond)
        return eps - _bcast(sigma, x) * G

    def correction(self, model: Model, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """The weighted score correction ``w(σ)·G(x, σ)``, shape of ``x``."""
        return self.eps_and_correction(model, x, _as_sigma(sigma, x), cond)[1]

    def eps_and_correction(self, model: Model, x: Tensor, sigma: Tensor, cond: Any = None
                           ) -> tuple[Tensor, Tensor]:
        """``(eps, w·G)``: the unguided model output at ``x`` and the weighted correction."""
        sigma = _as_sigma(sigma, x)
        w = self.scale(sigma)
        if not bool((w > 0).any()):
            eps = torch.cat([_no_grad_eps(model, x[r], _rows_of(sigma, r),
                                          _chunk_cond(cond, r, len(x)))
                             for r in _slices(len(x), self.chunk_size)])
            return eps, torch.zeros_like(x)
        eps_parts, g_parts = [], []
        for r in _slices(len(x), self.chunk_size):
            e, G = self._correction(model, x[r], _rows_of(sigma, r), _chunk_cond(cond, r, len(x)),
                                    r, len(x))
            eps_parts.append(e.detach())
            g_parts.append(G.detach())
        eps, G = torch.cat(eps_parts), torch.cat(g_parts)
        G = _bcast(w, x) * G
        G = self._limit(G, eps, sigma)
        _check_finite(G, "the guidance correction G", self.name, sigma)
        return eps, G

    def _limit(self, G: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        if self.clip is None and self.rescale is None:
            return G
        norm = G.flatten(1).norm(dim=1)
        factor = torch.ones_like(norm)
        if self.clip is not None:
            factor = torch.minimum(factor, self.clip / norm.clamp(min=1e-300))
        if self.rescale is not None:
            s = sigma.expand(len(G)) if sigma.ndim == 0 else sigma
            bound = self.rescale * eps.flatten(1).norm(dim=1)
            factor = torch.minimum(factor, bound / (s * norm).clamp(min=1e-300))
        return G * _bcast(factor, G)

    def _correction(self, model: Model, x: Tensor, sigma: Tensor, cond: Any, rows: slice,
                    batch: int) -> tuple[Tensor, Tensor]:
        """(eps, G) on the chunk ``rows`` of a batch of ``batch``; every gradient term defines it
        (ClassifierFree and Sum override ``eps_and_correction`` instead)."""
        raise TypeError(f"{type(self).__name__} defines neither _correction nor "
                        f"eps_and_correction")

    def __add__(self, other: Any) -> Sum:
        if not isinstance(other, GuidanceTerm):
            return NotImplemented
        return Sum([self, other])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale!r})"


class Sum(GuidanceTerm):
    """The sum of guidance terms: ``eps − σ·Σ_k w_k G_k`` (``a + b`` builds one).

    ``eps`` is the first term's model output; each term evaluates the model itself (a look-ahead
    term needs its own forward pass with gradients). :class:`ClassifierFree` joins a sum as the
    score correction ``−(w − 1)(eps_c − eps_u)/σ`` relative to the conditional model.
    """

    name = "Sum"

    def __init__(self, terms: Iterable[GuidanceTerm]):
        flat: list[GuidanceTerm] = []
        for t in terms:
            if not isinstance(t, GuidanceTerm):
                raise TypeError(f"Sum takes guidance terms, got {type(t).__name__}")
            flat.extend(t.terms if isinstance(t, Sum) else [t])
        if not flat:
            raise ValueError("Sum needs at least one guidance term")
        self.terms = flat

    def eps_and_correction(self, model: Model, x: Tensor, sigma: Tensor, cond: Any = None
                           ) -> tuple[Tensor, Tensor]:
        sigma = _as_sigma(sigma, x)
        eps, G = self.terms[0].eps_and_correction(model, x, sigma, cond)
        for t in self.terms[1:]:
            G = G + t.eps_and_correction(model, x, sigma, cond)[1]
        return eps, G

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.terms))


class _GuidedModel:
    """``model`` with ``guidance`` applied, as a model ``(x, sigma, cond) -> eps_guided``."""

    def __init__(self, model: Model, guidance: Callable[..., Tensor]):
        self.model, self.guidance = model, guidance
        self.input_shape = getattr(model, "input_shape", None)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        return self.guidance(self.model, x, sigma, cond)


def guided_model(model: Model, guidance: Callable[..., Tensor]) -> _GuidedModel:
    """A model that returns the guided ε, e.g. to run a :class:`LookAhead` *through* a
    classifier-free-guided prediction (as the official image code of seed 000 does):
    ``od.sample(guided_model(net, ClassifierFree(7.5)), sigmas, guidance=LookAhead(g, y), cond=c)``.
    Gradients flow through a :class:`ClassifierFree` wrapper; the gradient-guidance terms return
    detached outputs (their ε is a constant for an outer guidance)."""
    return _GuidedModel(model, guidance)


# ------------------------------------------------------------------------------ CFG

class ClassifierFree(GuidanceTerm):
    """Classifier-free guidance (Ho & Salimans 2022; seed 002):
    ``eps = eps_u + w·(eps_c − eps_u)``, with ``w`` as diffusers' ``guidance_scale``.

    One model call on the concatenated batch ``[x, x]`` with conditions ``[null, cond]``
    (diffusers' pipelines batch ``[uncond, cond]`` the same way). ``w = 1`` is the conditional
    model (one plain call), ``w = 0`` the unconditional one. As a score correction relative to the
    conditional model, ``G = −(w − 1)(eps_c − eps_u)/σ = (w − 1)∇ₓ log p_σ(c | x)``.

    Args:
        w: guidance scale, a number ≥ 0 or a callable of σ.
        null_cond: the null condition; a number fills a tensor shaped like ``cond`` (label −1 is the
            null class of ``TimeMLP(num_classes=…)``), a tensor is broadcast to ``cond``'s shape.
        interval: outside ``(sigma_lo, sigma_hi)`` the conditional model is used (w = 1).
        chunk_size: evaluate in batch chunks.
    """

    name = "ClassifierFree"

    def __init__(self, w: Any, *, null_cond: Any = -1, interval: tuple[float, float] | None = None,
                 chunk_size: int | None = None):
        super().__init__(scale=w, interval=None, chunk_size=chunk_size, scale_name="w")
        self.interval = Weight(1.0, interval=interval).interval
        self.null_cond = null_cond

    def _w(self, sigma: Tensor) -> Tensor:
        w = self.scale(sigma)
        if self.interval is not None:
            lo, hi = self.interval
            w = torch.where((sigma >= lo) & (sigma <= hi), w, torch.ones_like(w))
        return w

    def _null(self, cond: Tensor) -> Tensor:
        if isinstance(self.null_cond, Tensor):
            return self.null_cond.to(device=cond.device, dtype=cond.dtype).expand_as(cond)
        return torch.full_like(cond, self.null_cond)

    def _cond(self, cond: Any, x: Tensor) -> Tensor:
        if cond is None:
            raise ValueError("ClassifierFree needs a condition: pass cond=… to od.sample")
        cond = torch.as_tensor(cond, device=x.device)
        if cond.ndim == 0:
            cond = cond.expand(len(x))
        if cond.shape[0] != len(x):
            raise ValueError(f"cond has batch {cond.shape[0]} but x has batch {len(x)}")
        return cond

    def _both(self, model: Model, x: Tensor, sigma: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """(eps_u, eps_c) from one batched call."""
        cond = self._cond(cond, x)
        s2 = sigma if sigma.ndim == 0 else torch.cat([sigma, sigma])
        out = model(torch.cat([x, x]), s2, torch.cat([self._null(cond), cond]))
        return out[:len(x)], out[len(x):]

    def __call__(self, model: Model, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sigma = _as_sigma(sigma, x)
        w = self._w(sigma)
        if bool((w == 1).all()):
            return torch.cat([model(x[r], _rows_of(sigma, r), _chunk_cond(cond, r, len(x)))
                              for r in _slices(len(x), self.chunk_size)])
        parts = []
        for r in _slices(len(x), self.chunk_size):
            eu, ec = self._both(model, x[r], _rows_of(sigma, r), _chunk_cond(cond, r, len(x)))
            parts.append(eu + _bcast(_rows_of(w, r), eu) * (ec - eu))
        return torch.cat(parts)

    def eps_and_correction(self, model: Model, x: Tensor, sigma: Tensor, cond: Any = None
                           ) -> tuple[Tensor, Tensor]:
        sigma = _as_sigma(sigma, x)
        w = self._w(sigma)
        eu, ec = self._both(model, x, sigma, cond)
        G = -_bcast(w - 1, x) * (ec - eu) / _bcast(sigma, x)
        return ec, G

    def __repr__(self) -> str:
        return f"ClassifierFree(w={self.scale.value!r})"


# ------------------------------------------------------------------------------ classifier

class Classifier(GuidanceTerm):
    """Classifier guidance (Dhariwal & Nichol 2021; seed 002): ``G = s·∇ₓ log c(y | x, σ)``.

    ``clf(x, sigma) -> logits`` of shape (B, K) is a noise-conditional classifier (e.g.
    :class:`optidiff.classifiers.NoiseConditionalClassifier` trained by
    :func:`optidiff.classifiers.train_classifier`); ``log c`` is its log-softmax. With the exact
    class posterior and s = 1 the guided score is ``∇log p_σ(x) + ∇log p_σ(y|x) = ∇log p_σ(x | y)``.

    Args:
        clf: the classifier. y: the class, an int or a (B,) tensor of labels. s: the scale (number
        ≥ 0 or callable of σ). Other knobs as :class:`GuidanceTerm`.
    """

    name = "Classifier"

    def __init__(self, clf: Callable[[Tensor, Tensor], Tensor], y: Any, s: Any = 1.0, **kwargs: Any):
        super().__init__(scale=s, scale_name="s", **kwargs)
        if not callable(clf):
            raise TypeError(f"clf must be callable (x, sigma) -> logits, got {type(clf).__name__}")
        y = torch.as_tensor(y)
        if y.ndim > 1 or y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must be an int label or a (B,) tensor of int labels, got "
                             f"{y.dtype} of shape {tuple(y.shape)}")
        self.clf, self.y = clf, y.long()

    def _correction(self, model, x, sigma, cond, rows, batch):
        if self.y.ndim == 1 and len(self.y) != batch:
            raise ValueError(f"Classifier: y has {len(self.y)} labels but x has batch {batch}")
        y = _rows_of(self.y, rows).to(x.device).expand(len(x))
        eps = _no_grad_eps(model, x, sigma, cond)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.clf(xg, sigma)
            if logits.ndim != 2 or logits.shape[0] != len(x):
                raise ValueError(f"Classifier: clf returned shape {tuple(logits.shape)}; "
                                 f"expected (B, K) = ({len(x)}, K)")
            if (y < 0).any() or (y >= logits.shape[1]).any():
                raise ValueError(f"Classifier: labels must be in [0, {logits.shape[1]}), got "
                                 f"{y.unique().tolist()}")
            logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
            _check_finite(logp, "the classifier log-probability log c(y|x)", self.name, sigma,
                          rows.start)
            (grad,) = torch.autograd.grad(logp.sum(), xg)
        _check_finite(grad, "the gradient of log c(y|x)", self.name, sigma, rows.start)
        return eps, grad


# ------------------------------------------------------------------------------ linear targets

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


def _sig2(sigma: Tensor) -> Tensor:
    return sigma**2


def _eval_beta_const(beta: Weight, sigma: Tensor, n: int) -> Tensor:
    b = beta(sigma)
    return b.expand(n) if b.ndim == 0 else b


class NaiveGradient(GuidanceTerm):
    """Naive gradient guidance (seed 000 §3, the official ``cond_score_v1``): no model backprop.

    Two forms:

    - **linear** ``NaiveGradient(g, y, beta="official", noise_std=σ_y)``:
      ``G = β(σ)·(y − gᵀx0_hat)·g`` with x0_hat = x − σ·eps **not** differentiated. The official
      β (VP ``α/(σ_y² + h‖g‖²)``, ``research/ggdm.md`` §2.1) written for the VE score is
      ``β = 1/((1+σ²)σ_y² + σ²‖g‖²)``, exactly ∇ₓ log p_σ(y | x) for x0 ~ N(0, I_D).
      ``beta`` may also be a number ≥ 0 or a callable of σ. Note the convention: β multiplies
      ``(y − gᵀx0_hat)g`` directly (no factor 2, unlike :class:`LookAhead`).
    - **objective** ``NaiveGradient(objective=f, scale=…)``: ``G = scale(σ)·∇f(x)`` at the *noisy*
      point (DESIGN.md §3.4); ``f(x) -> (B,)`` by autograd, or any object with
      ``value_and_grad(x)`` (``od.optimize.Objective``). The named β rules do not apply here
      (β ≡ 1 unless ``beta`` is a number or callable, which multiplies ``scale``).

    g: (*dims) or (B, *dims); y: a number or (B,). Other knobs as :class:`GuidanceTerm`
    (``grad_through_model`` is accepted for symmetry and has no effect: no model backprop here).
    """

    name = "NaiveGradient"

    def __init__(self, g: Any = None, y: Any = None, *, objective: Any = None,
                 beta: Any = "official", noise_std: float = 0.1, scale: Any = 1.0,
                 grad_through_model: bool = False, **kwargs: Any):
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
            s2 = _sig2(sigma)
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
    """Look-ahead loss guidance G_loss of seed 000 (Definition 1; the official ``cond_score_v2``):

        G = −β(σ)·∇ₓ (y − gᵀx0_hat(x))² = 2β(σ)·(y − gᵀx0_hat)·Jᵀg,   J = ∂x0_hat/∂x,

    by autograd **through the model**: one forward and one backward pass per evaluation (the
    vector-Jacobian product of Σ_b g_bᵀx0_hat_b w.r.t. x gives every sample's ``Jᵀg``, since models
    act row-wise).

    Step size ``beta``:
        - ``"lemma1"`` (default; Lemma 1 of seed 000): ``β = 1/(2(σ_y² + σ²·gᵀJᵀg))`` using
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
        """Linearise a differentiable objective at ``x_ref`` (seed 000, Algorithm 1):
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
        s2 = _sig2(sigma)
        if self.beta == "lemma1":
            var = s2 * _flatdot(g.expand_as(u), u).clamp(min=0)  # gᵀCov[x0|x]g = σ²·gᵀJᵀg
        else:  # "official"
            var = s2 * (1 + s2) * (u * u).flatten(1).sum(1)
        return 0.5 / (self.noise_std**2 + var)

    def __repr__(self) -> str:
        return (f"LookAhead(g{tuple(self.g.shape)}, y{tuple(self.y.shape)}, beta={self.beta!r}, "
                f"noise_std={self.noise_std})")


# ------------------------------------------------------------------------------ DPS

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
        zeta: the strength ζ (number ≥ 0 or callable of σ). Other knobs as :class:`GuidanceTerm`.
    """

    name = "DPS"

    def __init__(self, operator: Callable[[Tensor], Tensor], y_meas: Tensor, zeta: Any = 1.0, *,
                 normalize: bool = True, grad_through_model: bool = True, **kwargs: Any):
        super().__init__(scale=zeta, scale_name="zeta", **kwargs)
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
            r = self._residual(x0, rows, batch).flatten(1)
            half_sq = 0.5 * (r * r).sum(1)
            _check_finite(half_sq, "the residual ‖y_meas − 𝒜(x0_hat)‖", self.name, sigma,
                          rows.start)
            (grad,) = torch.autograd.grad(half_sq.sum(), xg)
        _check_finite(grad, "the gradient of the residual", self.name, sigma, rows.start)
        if self.normalize:  # ∇‖r‖ = ∇(½‖r‖²)/‖r‖
            grad = grad / _bcast(half_sq.detach().mul(2).sqrt().clamp(min=1e-30), x)
        return eps.detach(), -grad
