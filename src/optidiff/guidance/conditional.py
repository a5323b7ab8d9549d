"""Guidance by a condition: classifier-free guidance and classifier guidance.

=================  ========================================================  ===================
term               G(x, σ)                                                   cost per NFE
=================  ========================================================  ===================
ClassifierFree(w)  ``eps_u + w·(eps_c − eps_u)`` (diffusers' guidance_scale)  one batched call
Classifier         ``s·∇ₓ log c(y | x, σ)``                                  classifier fwd+bwd
=================  ========================================================  ===================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import (
    GuidanceTerm,
    Model,
    Weight,
    _as_sigma,
    _bcast,
    _check_finite,
    _chunk_cond,
    _no_grad_eps,
    _rows_of,
    _slices,
    renamed,
)

__all__ = ["Classifier", "ClassifierFree"]


class ClassifierFree(GuidanceTerm):
    """Classifier-free guidance (Ho & Salimans, NeurIPS 2021 workshop, "Classifier-free diffusion
    guidance"): ``eps = eps_u + w·(eps_c − eps_u)``, with the scale ``w`` as diffusers'
    ``guidance_scale``.

    One model call on the concatenated batch ``[x, x]`` with conditions ``[null, cond]``
    (diffusers' pipelines batch ``[uncond, cond]`` the same way). ``w = 1`` is the conditional
    model (one plain call), ``w = 0`` the unconditional one. As a score correction relative to the
    conditional model, ``G = −(w − 1)(eps_c − eps_u)/σ = (w − 1)∇ₓ log p_σ(c | x)``.

    Args:
        scale: the guidance scale w, a number ≥ 0 or a callable of σ (``w=`` is the deprecated
            spelling).
        null_cond: the null condition; a number fills a tensor shaped like ``cond`` (label −1 is the
            null class of ``TimeMLP(num_classes=…)``), a tensor is broadcast to ``cond``'s shape.
        interval: outside ``(sigma_lo, sigma_hi)`` the conditional model is used (w = 1).
        chunk_size: evaluate in batch chunks.
    """

    name = "ClassifierFree"

    def __init__(self, scale: Any = None, *, null_cond: Any = -1,
                 interval: tuple[float, float] | None = None, chunk_size: int | None = None,
                 **deprecated: Any):
        kwargs = renamed({**deprecated, **({} if scale is None else {"scale": scale})}, "w",
                         "scale", "ClassifierFree")
        if set(kwargs) != {"scale"}:
            raise TypeError(f"ClassifierFree takes the guidance scale and null_cond, interval, "
                            f"chunk_size; got {sorted(set(kwargs) - {'scale'}) or 'no scale'}")
        scale = kwargs["scale"]
        super().__init__(scale=scale, interval=None, chunk_size=chunk_size)
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
        return f"ClassifierFree(scale={self.scale.value!r})"


class Classifier(GuidanceTerm):
    """Classifier guidance (Dhariwal & Nichol, NeurIPS 2021): ``G = s·∇ₓ log c(y | x, σ)``.

    ``clf(x, sigma) -> logits`` of shape (B, K) is a noise-conditional classifier (e.g.
    :class:`optidiff.models.NoiseConditionalClassifier` trained by
    :func:`optidiff.models.train_classifier`); ``log c`` is its log-softmax. With the exact
    class posterior and s = 1 the guided score is ``∇log p_σ(x) + ∇log p_σ(y|x) = ∇log p_σ(x | y)``.

    Args:
        clf: the classifier.
        y: the class, an int or a (B,) tensor of labels.
        scale: s, a number ≥ 0 or a callable of σ (``s=`` is the deprecated spelling).
        **kwargs: the other knobs of :class:`GuidanceTerm`.
    """

    name = "Classifier"

    def __init__(self, clf: Callable[[Tensor, Tensor], Tensor], y: Any, scale: Any = 1.0,
                 **kwargs: Any):
        if "s" in kwargs:
            scale = renamed(kwargs, "s", "scale", "Classifier").pop("scale")
        super().__init__(scale=scale, **kwargs)
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
