"""Choosing the settings of an offline method without the oracle: the *held-out top* procedure.

Offline optimization must pick its knobs (a guidance scale, an uncertainty penalty) from the visible
data alone; tables that choose them by oracle scores overstate what a user could reach. The single
procedure used for every setting of every task here mimics the benchmark's own protocol one level
down (the idea of holding out the best designs is Design-Bench's visible/hidden split, Trabucco et
al., ICML 2022, applied inside the visible set):

1. **inner split**: sort the visible set by its labels and hide its top ``holdout`` fraction
   (default 20 %); the method sees only the rest (its own reward model and diffusion model are
   fitted on it);
2. **validation score**: every candidate setting produces its candidates on the inner split; they
   are de-duplicated, those in the inner training set dropped, and scored by a *validation reward
   model* fitted on the whole visible set (which has seen the hidden top); the setting's score is
   the median of those values (the 50th-percentile criterion of the tables);
3. the setting with the highest validation score is used on the full visible set (ties: the
   first in the given order, so list the most conservative setting first).

No oracle value enters. The validation model shares the surrogate's biases, so the procedure
cannot reward what the surrogate does not know; that limit is reported with the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .baselines import seq_keys
from .rewards import pseudo_label

__all__ = ["holdout_split", "select_setting", "validation_score"]


def holdout_split(x: Tensor, y: Tensor, holdout: float = 0.2) -> tuple[Tensor, Tensor]:
    """The inner training set: the visible ``(x, y)`` without its top ``holdout`` fraction by y."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got holdout={holdout}")
    keep = torch.argsort(y, stable=True)[: len(y) - max(1, round(holdout * len(y)))]
    if len(keep) < 2:
        raise ValueError(f"holdout={holdout} leaves fewer than 2 of {len(y)} points")
    return x[keep], y[keep]


def validation_score(candidates: Tensor, x_inner: Tensor, validator: Callable[[Tensor], Tensor],
                     featurize: Callable[[Tensor], Tensor]) -> float:
    """Median validation-model value of the distinct candidates outside the inner training set
    (−inf when none is left: a setting that only copies its data loses)."""
    inner = set(seq_keys(x_inner))
    keep, seen = [], set()
    for i, k in enumerate(seq_keys(candidates)):
        if k not in inner and k not in seen:
            seen.add(k)
            keep.append(i)
    if not keep:
        return float("-inf")
    return float(pseudo_label(validator, featurize(candidates[keep])).median())


def select_setting(settings: Sequence[Any], candidates_of: Callable[[Any], Tensor],
                   x_inner: Tensor, validator: Callable[[Tensor], Tensor],
                   featurize: Callable[[Tensor], Tensor]) -> tuple[Any, list[dict[str, Any]]]:
    """Step 3: the setting of ``settings`` whose inner-split candidates (``candidates_of(s)``) have
    the highest :func:`validation_score`; returns it and the table of scores."""
    if not settings:
        raise ValueError("select_setting needs at least one setting")
    table = [{"setting": s, "validation_p50": validation_score(candidates_of(s), x_inner,
                                                               validator, featurize)}
             for s in settings]
    best = max(range(len(table)), key=lambda i: (table[i]["validation_p50"], -i))
    return settings[best], table
