"""Non-generative baselines of offline sequence design, each given the same reward model f̂ and the
same budget of ``n`` candidates (the "honest baselines" every offline table carries):

- :func:`uniform_random`: ``n`` sequences drawn uniformly (no model at all);
- :func:`enumeration`: f̂ on every sequence of the space (only when ``C^L`` is small, e.g. the
  4⁸ = 65,536 8-mers of TFBind8), the top ``n`` outside the visible set;
- :func:`surrogate_gradient_ascent`: Design-Bench's "Grad." baseline (Trabucco et al., ICML 2022,
  ``design_baselines/gradient_ascent``) on the continuous relaxation, from the ``n`` best visible
  designs, decoded by argmax;
- :func:`evolution`: ``holo.optim.DiscreteEvolution`` of ``pytorch-holo`` (Stanton et al. 2024's
  genetic algorithm: survivors above the median recombine and mutate) maximising f̂ from the best
  visible designs; every sequence it evaluates is kept, the top ``n`` outside the visible set
  returned.

Sequences are int64 ``(N, L)`` over ``C`` states; f̂ takes the flattened logits of
:func:`optidiff.sequences.to_logits`. Every draw comes from a seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from .. import rng
from .rewards import gradient_ascent, offline_seed, pseudo_label

__all__ = [
    "MAX_ENUMERATION",
    "enumeration",
    "evolution",
    "relaxed",
    "seq_keys",
    "space",
    "surrogate_gradient_ascent",
    "top_new",
    "uniform_random",
]

#: the largest space :func:`enumeration` scores exhaustively
MAX_ENUMERATION = 2 ** 22


def relaxed(x: Tensor, num_classes: int) -> Tensor:
    """The flattened Design-Bench logits (N, L·(C−1)) of integer sequences (N, L)."""
    from ..sequences import to_logits

    return to_logits(x, num_classes=num_classes).flatten(1)


def seq_keys(x: Tensor) -> list[bytes]:
    """A hashable key per sequence (rows of an int tensor), for de-duplication and novelty."""
    x = torch.as_tensor(x).to(torch.int16).contiguous()
    return [row.numpy().tobytes() for row in x]


def top_new(x: Tensor, scores: Tensor, n: int, exclude: set[bytes]) -> Tensor:
    """The ``n`` highest-scoring distinct rows of ``x`` whose key is not in ``exclude``."""
    out, seen = [], set(exclude)
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        k = x[i].to(torch.int16).numpy().tobytes()
        if k not in seen:
            seen.add(k)
            out.append(i)
            if len(out) == n:
                break
    return x[out]


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got n={n!r}")
    return n


def uniform_random(n: int, length: int, num_classes: int, seed: int) -> Tensor:
    """``n`` sequences of ``length`` tokens uniform over ``num_classes`` states."""
    g = rng.generator(offline_seed(seed, "uniform-random"))
    return torch.randint(num_classes, (_check_n(n), length), generator=g)


def space(length: int, num_classes: int) -> Tensor:
    """All ``C^L`` sequences (C^L, L), in lexicographic order; a ValueError when the space
    exceeds :data:`MAX_ENUMERATION`."""
    size = num_classes ** length
    if size > MAX_ENUMERATION:
        raise ValueError(f"enumeration of {num_classes}^{length} = {size:.3g} sequences exceeds "
                         f"{MAX_ENUMERATION}")
    return torch.tensor(list(itertools.product(range(num_classes), repeat=length)))


def enumeration(reward: Callable[[Tensor], Tensor], length: int, num_classes: int, n: int,
                exclude: set[bytes], chunk_size: int = 16384) -> Tensor:
    """The top ``n`` of all ``C^L`` sequences (:func:`space`) by f̂ (on their logits), none of
    them in ``exclude``."""
    x = space(length, num_classes)
    scores = torch.cat([pseudo_label(reward, relaxed(x[i:i + chunk_size], num_classes))
                        for i in range(0, len(x), chunk_size)])
    return top_new(x, scores, _check_n(n), exclude)


def surrogate_gradient_ascent(reward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                              num_classes: int, n: int, *, steps: int = 200,
                              lr: float = 0.01) -> Tensor:
    """Design-Bench's Grad.: ``steps`` of z-scored gradient ascent on f̂
    (:func:`~optidiff.optimize.rewards.gradient_ascent`) from the ``n`` best visible logits,
    decoded by argmax."""
    from ..sequences import to_integers

    z = relaxed(x, num_classes)
    top = z[torch.argsort(y, descending=True, stable=True)[:_check_n(n)]]
    out = gradient_ascent(reward, top, steps=steps, lr=lr, x_std=z.std(0).clamp(min=1e-6),
                          y_std=float(y.std()))
    return to_integers(out, num_classes)


def evolution(reward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, num_classes: int,
              n: int, exclude: set[bytes], *, seed: int, generations: int = 64,
              particles: int = 256, mutation_prob: float | None = None) -> Tensor:
    """``pytorch-holo``'s ``DiscreteEvolution`` maximising f̂: ``particles`` start as the best
    visible designs (all of them when there are fewer); each generation keeps the particles at or above the median surrogate value,
    refills the rest by uniform crossover of survivors and mutates each token with probability
    ``mutation_prob`` (default ``1/L``). Returns the top ``n`` distinct sequences outside
    ``exclude`` among all evaluated ones. The optimizer draws from torch's global generator, so
    it runs under :func:`optidiff.rng.seeded`."""
    from holo.optim import DiscreteEvolution

    length = x.shape[1]
    p = mutation_prob if mutation_prob is not None else 1.0 / length
    particles = min(particles, len(x))
    start = x[torch.argsort(y, descending=True, stable=True)[:particles]].float()
    seen_x, seen_s = [], []

    def loss(buffers: list[Tensor]) -> Tensor:
        seqs = buffers[0].long()  # holo keeps particles as floats (it draws with rand_like)
        s = pseudo_label(reward, relaxed(seqs, num_classes))
        seen_x.append(seqs)
        seen_s.append(s)
        return -s

    with rng.seeded(offline_seed(seed, "evolution")):
        param = torch.nn.Parameter(start[0].clone(), requires_grad=False)
        opt = DiscreteEvolution([param], vocab=list(range(num_classes)), mutation_prob=p,
                                num_particles=particles)
        opt.state[param]["particles"] = start.clone()  # a population of distinct designs
        for _ in range(generations):
            opt.step(loss)
    return top_new(torch.cat(seen_x), torch.cat(seen_s), _check_n(n), exclude)
