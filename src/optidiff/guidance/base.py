"""Guidance machinery: the score-correction base class, weights, sums and shared helpers.

A guidance term is a callable ``term(model, x, sigma, cond) -> eps_guided`` (the protocol
:class:`optidiff.sampling.Guidance`) that applies a score correction G(x, σ):
``eps_guided = eps − σ·w(σ)·G`` (VE coordinates, ``x = x0 + σ·ε``, score ``−eps/σ``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["GuidanceTerm", "Sum", "Weight", "guided_model", "renamed"]

Model = Callable[..., Tensor]


def renamed(kwargs: dict[str, Any], old: str, new: str, owner: str) -> dict[str, Any]:
    """Move a deprecated keyword ``old`` to ``new`` in ``kwargs`` with a DeprecationWarning
    (one release of grace for an old spelling)."""
    if old in kwargs:
        if new in kwargs:
            raise TypeError(f"{owner}: give {new}= (the new name of {old}=), not both")
        warnings.warn(f"{owner}({old}=…) is deprecated; use {new}=", DeprecationWarning,
                      stacklevel=3)
        kwargs[new] = kwargs.pop(old)
    return kwargs


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
        max_move: bound on the move of the denoised estimate, ``σ²‖G_b‖ ≤ max_move`` per sample
            (at large σ x0_hat is poor and σ² large, so an unbounded G can throw samples far off).
        chunk_size: evaluate the guided model on batch chunks of this size (memory of the backward
            pass); per-sample targets are sliced with the chunk. Same result as one chunk.
    """

    name = "guidance"

    def __init__(self, *, scale: Any = 1.0, interval: tuple[float, float] | None = None,
                 clip: float | None = None, rescale: float | None = None,
                 max_move: float | None = None, chunk_size: int | None = None):
        self.scale = _weight(scale, "scale", interval)
        self.clip = None if clip is None else _check_positive(clip, "clip")
        self.rescale = None if rescale is None else _check_positive(rescale, "rescale")
        self.max_move = None if max_move is None else _check_positive(max_move, "max_move")
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
        if self.clip is None and self.rescale is None and self.max_move is None:
            return G
        norm = G.flatten(1).norm(dim=1)
        factor = torch.ones_like(norm)
        s = sigma.expand(len(G)) if sigma.ndim == 0 else sigma
        if self.clip is not None:
            factor = torch.minimum(factor, self.clip / norm.clamp(min=1e-300))
        if self.rescale is not None:
            bound = self.rescale * eps.flatten(1).norm(dim=1)
            factor = torch.minimum(factor, bound / (s * norm).clamp(min=1e-300))
        if self.max_move is not None:
            factor = torch.minimum(factor, self.max_move / (s**2 * norm).clamp(min=1e-12))
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
    classifier-free-guided prediction (as the official image code of Guo et al. does):
    ``od.sample(guided_model(net, ClassifierFree(7.5)), sigmas, guidance=LookAhead(g, y), cond=c)``.
    Gradients flow through a :class:`ClassifierFree` wrapper; the gradient-guidance terms return
    detached outputs (their ε is a constant for an outer guidance)."""
    return _GuidedModel(model, guidance)
