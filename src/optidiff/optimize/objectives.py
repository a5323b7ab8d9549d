"""Objectives for generative optimization: a value, a gradient oracle, and a query count.

Guo et al. (NeurIPS 2024) treat the objective f as a black box that the optimizer *queries*:
Algorithm 1 asks for ∇f at the current samples (or at their batch mean) once per round, and the
fixed-target rule also asks for f. Queries are the budget a user pays for, so every call is
counted, per point:

- ``value_queries``: points at which f was evaluated (``value`` and ``value_and_grad``);
- ``grad_queries``: points at which ∇f was evaluated (``grad`` and ``value_and_grad``).

``Objective(fn)`` differentiates ``fn`` by autograd; ``Objective(fn, grad=oracle)`` uses a
user-supplied gradient oracle (a black-box objective). Any callable ``f(x) -> (B,)`` passed to
``od.optimize`` is wrapped by :func:`as_objective`. A value or gradient that is not finite, or of
the wrong shape, raises a :class:`ObjectiveError` that names the objective, the shape and the rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Objective", "ObjectiveError", "as_objective"]

Fn = Callable[[Tensor], Tensor]


class ObjectiveError(ValueError):
    """An objective (or its gradient oracle) returned a wrong shape or a non-finite value."""


class Objective:
    """A counted objective ``f: (B, *dims) -> (B,)`` with a gradient ``(B, *dims)``.

    Args:
        fn: the value ``f(x) -> (B,)``; differentiable by autograd unless ``grad`` is given.
        grad: optional gradient oracle ``grad(x) -> (B, *dims)`` (for black-box objectives).
        name: used in error messages and reports.
        maximum: the known global maximum f*, if any (reported, never used by the optimizers).
    """

    def __init__(self, fn: Fn, grad: Fn | None = None, *, name: str | None = None,
                 maximum: float | None = None):
        if not callable(fn):
            raise TypeError(f"the objective must be callable, got {type(fn).__name__}")
        if grad is not None and not callable(grad):
            raise TypeError(f"grad must be callable or None, got {type(grad).__name__}")
        self.fn = fn
        self.grad_oracle = grad
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.maximum = maximum
        self.value_queries = 0
        self.grad_queries = 0

    # ---------------------------------------------------------------- counting
    @property
    def queries(self) -> dict[str, int]:
        """``{"value_queries": …, "grad_queries": …}`` so far."""
        return {"value_queries": self.value_queries, "grad_queries": self.grad_queries}

    def load_queries(self, counts: dict[str, int]) -> None:
        """Restore the counters (used when a run is resumed)."""
        self.value_queries = int(counts["value_queries"])
        self.grad_queries = int(counts["grad_queries"])

    # ---------------------------------------------------------------- checks
    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ObjectiveError(f"objective {self.name!r} takes x of shape (B, *dims), got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")

    def _check_value(self, v: Tensor, x: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            raise ObjectiveError(f"objective {self.name!r} must return a tensor of shape "
                                 f"({len(x)},), got {type(v).__name__}")
        if v.shape != (len(x),):
            raise ObjectiveError(f"objective {self.name!r} returned shape {tuple(v.shape)} for x of "
                                 f"shape {tuple(x.shape)}; expected ({len(x)},), one value per sample")
        bad = ~torch.isfinite(v.detach())
        if bad.any():
            rows = bad.nonzero().flatten()[:8].tolist()
            raise ObjectiveError(f"objective {self.name!r} returned non-finite values "
                                 f"{v.detach()[bad][:8].tolist()} at rows {rows}")
        return v

    def _check_grad(self, g: Tensor, x: Tensor) -> Tensor:
        if not isinstance(g, Tensor) or g.shape != x.shape:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ObjectiveError(f"the gradient of objective {self.name!r} has shape {shape}; "
                                 f"expected {tuple(x.shape)}, the shape of x")
        bad = ~torch.isfinite(g).flatten(1).all(1)
        if bad.any():
            rows = bad.nonzero().flatten()[:8].tolist()
            raise ObjectiveError(f"the gradient of objective {self.name!r} is not finite at "
                                 f"rows {rows}")
        return g

    # ---------------------------------------------------------------- queries
    def value(self, x: Tensor) -> Tensor:
        """f(x), shape (B,); counts ``B`` value queries."""
        self._check_x(x)
        with torch.no_grad():
            v = self._check_value(self.fn(x), x)
        self.value_queries += len(x)
        return v.detach()

    def grad(self, x: Tensor) -> Tensor:
        """∇f(x), shape (B, *dims) (per-sample gradients); counts ``B`` gradient queries."""
        return self.value_and_grad(x, _count_value=False)[1]

    def value_and_grad(self, x: Tensor, *, _count_value: bool = True) -> tuple[Tensor, Tensor]:
        """(f(x), ∇f(x)); counts ``B`` value and ``B`` gradient queries.

        Autograd computes ``∇ Σ_i f(x_i)``, which is the per-sample gradient as long as f does not
        couple the rows of the batch (as the official code's ``BatchGradV2``).
        """
        self._check_x(x)
        if self.grad_oracle is not None:
            with torch.no_grad():
                v = self._check_value(self.fn(x), x).detach() if _count_value else None
                g = self._check_grad(self.grad_oracle(x), x).detach()
        else:
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.fn(xg)
                self._check_value(out, x)
                if not out.requires_grad:
                    raise ObjectiveError(f"objective {self.name!r} is not differentiable by "
                                         "autograd (its output does not require grad); pass a "
                                         "gradient oracle: Objective(fn, grad=...)")
                (g,) = torch.autograd.grad(out.sum(), xg)
            v = out.detach()
            g = self._check_grad(g, x).detach()
        if _count_value:
            self.value_queries += len(x)
        self.grad_queries += len(x)
        return v, g

    def __call__(self, x: Tensor) -> Tensor:
        return self.value(x)

    def __repr__(self) -> str:
        return (f"Objective({self.name!r}, grad={'oracle' if self.grad_oracle else 'autograd'}, "
                f"value_queries={self.value_queries}, grad_queries={self.grad_queries})")


def as_objective(f: Fn | Objective) -> Objective:
    """Wrap a callable ``f(x) -> (B,)`` as an :class:`Objective` (autograd gradient); an Objective
    is returned as is, so its counters keep running."""
    return f if isinstance(f, Objective) else Objective(f)
