"""Ehrlich functions as offline tasks (``[task] name = "ehrlich"``).

Ehrlich functions (Stanton et al. 2024, "Closed-form test functions for biophysical sequence
design", arXiv 2407.00236, §3) score a sequence of length ``L`` over ``v`` states by the spaced
motifs it contains: ``f(x) = Π_i q(h_i(x))`` for ``c`` motifs of length ``k``, ``h_i`` the largest
fraction of motif ``i`` present with its spacing, quantized to ``quantization`` levels; a sequence
is *feasible* only if every transition has non-zero probability under the function's banded
ergodic transition matrix (a discrete Markov process, DMP), otherwise ``f = −∞``. The optimum is
1. The implementation is ``pytorch-holo`` 0.0.5's ``holo.test_functions.closed_form.Ehrlich``
(the authors' own package; installed with ``pip install --no-deps pytorch-holo==0.0.5`` plus
``botorch`` and ``pooch``, which its modules import).

Offline protocol used here (the Design-Bench rule applied to Ehrlich): ``n_offline`` sequences are
drawn from the function's own initial distribution (the DMP from its stationary distribution,
so all are feasible), scored, and only those at or below the median score are visible. The task's
score is ``f`` with infeasible sequences scoring 0. Uniform random sequences are almost never
feasible (≈ 1 % at L = 32, none at L = 128), and the space (20³² or 20¹²⁸) cannot be enumerated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .. import rng
from ..sequences import to_integers, to_logits
from .base import OfflineData

__all__ = ["SIZES", "EhrlichProblem", "EhrlichTask", "make_function"]

#: length -> (number of motifs, motif length); quantization = motif length
SIZES = {32: (2, 4), 128: (4, 4)}


def make_function(length: int, num_states: int = 20, seed: int = 0):
    """holo's Ehrlich function of ``length`` (motifs from :data:`SIZES`), seeded by ``seed``."""
    if length not in SIZES:
        raise ValueError(f"length={length} is not one of the Ehrlich sizes {sorted(SIZES)}")
    try:
        from holo.test_functions.closed_form import Ehrlich
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the ehrlich task needs pytorch-holo: pip install --no-deps "
                          f"pytorch-holo==0.0.5 botorch pooch ({e})") from None
    c, k = SIZES[length]
    return Ehrlich(num_states=num_states, dim=length, num_motifs=c, motif_length=k,
                   quantization=k, random_seed=seed)


class EhrlichProblem:
    """One Ehrlich function with its offline data: ``x`` (N, L) visible designs, ``y`` scores;
    ``heldout``: fresh unfiltered draws from the initial distribution."""

    def __init__(self, length: int, num_states: int, n_offline: int, seed: int):
        from holo.test_functions.elemental import sample_dmp

        self.length, self.num_states = length, num_states
        self.fn = make_function(length, num_states, seed)

        def draw(n: int, stream: str) -> Tensor:
            g = rng.generator(rng.derive_seed("optidiff.ehrlich", seed, length, stream))
            return sample_dmp(initial_dist=self.fn.stationary_dist.squeeze(-1),
                              transition_matrix=self.fn.transition_matrix, num_steps=length,
                              num_samples=n, generator=g)

        x = draw(n_offline, "offline")
        y = self.score(x)
        self.threshold = float(torch.quantile(y, 0.5))
        keep = y <= self.threshold
        self.x, self.y = x[keep], y[keep].float()
        self.heldout = draw(2048, "heldout")

    def feasible(self, x: Tensor) -> Tensor:
        return torch.isfinite(self.fn(torch.as_tensor(x).long()))

    def score(self, x: Tensor) -> Tensor:
        """``f(x)`` with infeasible sequences scoring 0 (float64)."""
        f = self.fn(torch.as_tensor(x).long()).double()
        return torch.where(torch.isfinite(f), f, torch.zeros_like(f))


@dataclass
class EhrlichTask:
    """Ehrlich offline problems of the given ``lengths`` over ``num_states`` states (the function
    of each length seeded by ``seed``); :meth:`problems` gives them to the suite, the
    single-method pipelines use the first length (designs: flattened Design-Bench logits)."""

    name: ClassVar[str] = "ehrlich"
    lengths: list[int] = field(default_factory=lambda: [32, 128])
    num_states: int = 20
    n_offline: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("lengths must hold at least one Ehrlich length")
        if self.num_states < 2 or self.n_offline < 16:
            raise ValueError(f"need num_states >= 2 and n_offline >= 16, got num_states="
                             f"{self.num_states}, n_offline={self.n_offline}")
        self._problems = [EhrlichProblem(L, self.num_states, self.n_offline, self.seed)
                          for L in self.lengths]

    def offline_data(self) -> OfflineData:
        p = self._problems[0]
        x = to_logits(p.x, num_classes=self.num_states).flatten(1)
        return OfflineData(None, x, p.y, x.std(0))

    def decode(self, x: Tensor) -> Tensor:
        return to_integers(x, self.num_states)

    def evaluate(self, x: Tensor, target: float | None) -> dict[str, float]:
        """The suite's metrics (:func:`optidiff.optimize.suite.evaluate`) of the first length."""
        from ..optimize.baselines import seq_keys
        from ..optimize.suite import evaluate

        p = self.problems()[0]
        m = evaluate(p, self.decode(x), set(seq_keys(p.x)))
        m.pop("scores")
        return m

    def problems(self) -> list:
        from ..optimize.suite import SequenceProblem

        return [SequenceProblem(
            name=f"ehrlich L={p.length}", x=p.x, y=p.y, num_classes=self.num_states,
            oracle=p.score, heldout=p.heldout, feasible=p.feasible,
            info={"visible": len(p.x), "best_visible": float(p.y.max()),
                  "threshold": p.threshold, "function": repr(p.fn)})
            for p in self._problems]

