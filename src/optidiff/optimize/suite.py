"""The offline sequence-design suite: every method and baseline on one problem, scored alike.

A :class:`SequenceProblem` is a visible labeled set of integer sequences and an oracle (TFBind8
and the other transcription factors of :mod:`optidiff.tasks.tfbind8`; Ehrlich functions of
:mod:`optidiff.tasks.ehrlich`). :func:`run_problem` runs, per seed and with one reward model
(a bootstrap ensemble of MLPs on the Design-Bench logits, fitted on the visible set) and the same
budget of ``n`` candidates:

- the baselines of :mod:`optidiff.optimize.baselines` (uniform random, surrogate enumeration when
  the space is small, surrogate gradient ascent, ``pytorch-holo``'s discrete evolution);
- **RCD (tutorial)**: the Wang & Chen tutorial's reward-conditioned diffusion (Yuan et al.,
  NeurIPS 2023): the diffusion model conditioned on the reward model's pseudo-labels, sampled at
  the largest pseudo-label (plain conditional sampling, w = 1);
- **RCD, novel only**: the same model, a pool of samples from which the visible sequences and
  duplicates are dropped before the first ``n`` are kept (conditioning that does not copy);
- **RCD + reward guidance**: the same model with plain reward-gradient ascent guidance
  ``G = s·∇f̂(x̂0)`` (no target value, so no outside knowledge of the optimum), the move of x̂0
  bounded by ``reward_clip``;
- **RCD trust region**: the guided model as a trust region for the surrogate: a pool of guided
  samples, visible ones and duplicates dropped, ranked by the ensemble's mean minus ``λ`` times its
  spread (a lower confidence bound), the top ``n`` kept (guidance scale 0: the unguided prior
  is the region);
- **RCD trust region + evolution**: ``pytorch-holo``'s evolution of :func:`~optidiff.optimize.
  baselines.evolution` on that lower confidence bound, started from the distinct guided samples
  instead of the best visible designs (the prior proposes, the evolution refines; the trust
  region's selected scale and λ);
- **RCD prior-regularised**: the diffusion prior as a soft trust region for the surrogate, by the
  KL-regularised objective whose optimum Algorithm 2's fine-tuning on its own surrogate-scored
  samples approaches (Guo et al., NeurIPS 2024: ``p*(x) ∝ p̂(x)·exp(f̂(x)/τ)``) ranked exactly:
  ``J_β(x) = z(f̂(x)) + β·z(log p̂(x))``, with ``log p̂`` the unconditional model's denoising bound
  (:func:`~optidiff.optimize.likelihood.log_density`) and ``z`` the standardisation on the visible
  set; maximised by enumeration where the space is small, else by the evolution baseline's
  ``pytorch-holo`` evolution from the same start. β = 0 is exactly the enumeration / evolution
  baseline, so the row isolates what the prior adds; β < 0 seeks novelty (J penalises the density
  of a prior fitted on the visible set, which on Design-Bench splits is the bottom half);
- **RCD implicit classifier**: the same ranking with the model's implicit classifier in place of
  its density, ``J_β(x) = z(f̂(x)) + β·z(r(x))``, ``r(x) = log p̂(x | y_top) − log p̂(x | ∅)``
  (by Bayes ``log p̂(y_top | x)`` up to a constant: the classifier that classifier-free guidance
  follows, Ho & Salimans 2021), ``y_top`` the largest pseudo-label (the tutorial row's target): a
  second estimate of how good ``x`` is, learned by the diffusion model from f̂'s pseudo-labels;
- **DDOM** (Krishnamoorthy, Mashkaria & Grover, ICML 2023) with its published settings and no
  reward model: a conditional model trained on the *observed* labels, its training set
  reweighted toward high ``y`` (:func:`~optidiff.optimize.rewards.ddom_weights`, 20 bins,
  quantile 0.9, clip 5), DDOM's VP noise levels (:func:`~optidiff.optimize.offline.ddom_schedule`,
  VP prior), sampled at the largest visible label with classifier-free guidance γ = 2
  (``w = 3``) by Heun's method, as DDOM's code does.

The guidance scale, ``λ`` and both β are chosen by :mod:`optidiff.optimize.selection` (held-out top,
no oracle) on the first seed and used for every seed. Every method's candidates are de-duplicated
before scoring (:func:`evaluate`): 100th/50th percentile of the oracle's normalised score
(infeasible sequences score 0), share feasible, novel (not in the visible set), duplicates, and
the reward model's Spearman rank correlation with the oracle on the problem's held-out sequences.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..device import torch_threads
from ..sequences import to_integers
from . import baselines as B
from .offline import OfflineResult, ddom_schedule, reward_conditioned
from .rewards import EnsembleReward, fit_reward, pseudo_label
from .selection import holdout_split, select_setting

__all__ = ["BASELINES", "GENERATIVE", "METHODS", "PRIOR_ROWS", "RCD_ROWS", "PriorObjective",
           "SequenceProblem", "SuiteSettings", "ddom", "evaluate", "penalised",
           "prior_rank_correlation", "problem_result", "rank_correlation", "run_problem",
           "run_problems", "run_seed", "select_problem"]

BASELINES = ("uniform random", "enumeration", "gradient ascent", "evolution")
GENERATIVE = ("RCD (tutorial)", "RCD, novel only", "RCD + reward guidance", "RCD trust region",
              "RCD trust region + evolution", "RCD prior-regularised", "RCD implicit classifier",
              "DDOM")
METHODS = BASELINES + GENERATIVE
#: the rows of the reward-conditioned model (trained per seed, settings chosen by
#: :func:`select_problem`)
RCD_ROWS = tuple(m for m in GENERATIVE if m.startswith("RCD"))
#: the rows ranking by z(f̂) + β·z(term): their term of :class:`PriorObjective` and setting key
PRIOR_ROWS = {"RCD prior-regularised": ("density", "prior_weight"),
              "RCD implicit classifier": ("classifier", "classifier_weight")}


@dataclass
class SequenceProblem:
    """Visible designs ``x`` (N, L) int64 over ``num_classes`` states with labels ``y`` (N,);
    ``oracle`` gives the normalised score of any sequences (infeasible ones 0); ``feasible`` (or
    None: all feasible) marks sequences the oracle accepts; ``heldout`` are sequences outside the
    visible set on which the reward model's rank correlation is measured."""

    name: str
    x: Tensor
    y: Tensor
    num_classes: int
    oracle: Callable[[Tensor], Tensor]
    heldout: Tensor
    feasible: Callable[[Tensor], Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.x.shape[1])

    @property
    def enumerable(self) -> bool:
        return self.num_classes ** self.length <= B.MAX_ENUMERATION

    def features(self, x: Tensor) -> Tensor:
        return B.relaxed(x, self.num_classes)


@dataclass(frozen=True)
class SuiteSettings:
    """Sizes of a suite run (the defaults are the benchmark's); ``prior_weights`` is the β grid
    of both rows of ``PRIOR_ROWS``."""

    n: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    ensemble: int = 4
    reward_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "hidden": 128, "depth": 2, "steps": 800, "batch_size": 256, "lr": 1e-3})
    diffusion_steps: int = 1000
    batch_size: int = 256
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"hidden": 256, "depth": 3})
    sample_steps: int = 50
    pool: int = 4
    reward_scales: tuple[float, ...] = (30.0, 100.0, 300.0, 1000.0)
    penalties: tuple[float, ...] = (0.0, 1.0, 2.0)
    prior_weights: tuple[float, ...] = (0.0, -0.1, 0.1, -0.25, 0.25, -0.5, 0.5)
    likelihood_levels: int = 16
    reward_clip: float = 5.0
    holdout: float = 0.2
    evolution_generations: int = 64

    @property
    def runs_rcd(self) -> bool:
        """Whether a row of ``RCD_ROWS`` runs (then the reward-conditioned model is selected and
        trained)."""
        return any(m in RCD_ROWS for m in self.methods)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if not self.prior_weights:
            raise ValueError(f"prior_weights must hold at least one value, got "
                             f"prior_weights={self.prior_weights}")
        bad = [b for b in self.prior_weights if not math.isfinite(b)]
        if bad:
            raise ValueError(f"prior_weights must be finite, got {bad[0]} in "
                             f"prior_weights={self.prior_weights}")
        if self.n < 1 or self.pool < 1 or not self.seeds:
            raise ValueError(f"need n >= 1, pool >= 1 and at least one seed, got n={self.n}, "
                             f"pool={self.pool}, seeds={self.seeds}")


def penalised(ensemble: EnsembleReward, lam: float) -> Callable[[Tensor], Tensor]:
    """The lower confidence bound ``mean_m f̂_m(x) − λ·std_m f̂_m(x)`` of an ensemble."""
    def f(z: Tensor) -> Tensor:
        m = ensemble.members(z)
        return m.mean(0) - lam * m.std(0) if lam else m.mean(0)
    return f


def rank_correlation(problem: SequenceProblem, reward: Callable[[Tensor], Tensor]) -> float:
    """Spearman's ρ between f̂ (or any score of the relaxed features, e.g. the prior's
    log-density) and the oracle on ``problem.heldout``."""
    return _spearman(problem, pseudo_label(reward, problem.features(problem.heldout)))


def _spearman(problem: SequenceProblem, pred: Tensor) -> float:
    from scipy.stats import spearmanr

    true = problem.oracle(problem.heldout).double().numpy()
    return float(spearmanr(pred.double().numpy(), true).statistic)


def prior_rank_correlation(problem: SequenceProblem, prior: PriorObjective) -> float:
    """Spearman's ρ between the prior's log-density and the oracle on ``problem.heldout``; on an
    enumerable space read off :meth:`PriorObjective.space` (computed once for the row anyway)."""
    if not problem.enumerable:
        return rank_correlation(problem, prior.density)
    x, t = prior.space(problem.length)
    index = {k: i for i, k in enumerate(B.seq_keys(x))}
    return _spearman(problem, t["density"][[index[k] for k in B.seq_keys(problem.heldout)]])


def evaluate(problem: SequenceProblem, candidates: Tensor, visible: set[bytes]) -> dict[str, Any]:
    """Oracle metrics of the distinct candidates (first occurrences kept)."""
    keys = B.seq_keys(candidates)
    first = list({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    first.sort()
    u = candidates[first]
    s = problem.oracle(u).double().numpy()
    feas = (problem.feasible(u).double().mean().item() if problem.feasible is not None else 1.0)
    return {"p100": float(np.percentile(s, 100)), "p50": float(np.percentile(s, 50)),
            "mean": float(s.mean()), "generated": len(candidates), "unique": len(u),
            "duplicates": len(candidates) - len(u), "feasible": feas,
            "novel": sum(keys[i] not in visible for i in first) / len(first),
            "scores": s.tolist()}


def _fit(problem_x: Tensor, problem_y: Tensor, problem: SequenceProblem, st: SuiteSettings,
         seed: int) -> EnsembleReward:
    return fit_reward(problem.features(problem_x), problem_y.float(), kind="mlp",
                      ensemble=st.ensemble, seed=seed, **st.reward_kwargs)


def _diffusion(x: Tensor, y: Tensor, reward: EnsembleReward, problem: SequenceProblem,
               st: SuiteSettings, seed: int, progress: bool | None):
    """The reward-conditioned model of every generative row (conditions: f̂'s pseudo-labels)."""
    return reward_conditioned(None, problem.features(x), y.float(), reward=reward,
                              relabel_labeled=True, cond_drop=0.15, cfg_scale=1.0,
                              model_kwargs=st.model_kwargs, steps=st.diffusion_steps,
                              batch_size=st.batch_size, sample_steps=st.sample_steps,
                              sampler="ddpm", seed=seed, progress=progress)


def ddom(problem: SequenceProblem, st: SuiteSettings, seed: int,
         progress: bool | None = None) -> OfflineResult:
    """The DDOM row's model (its settings: the module docstring); its candidates are
    ``res.generate("max", st.n, seed=seed)``."""
    return reward_conditioned(None, problem.features(problem.x), problem.y.float(), reward=None,
                             reweight=True, cond_drop=0.15, cfg_scale=3.0,
                             schedule=ddom_schedule(), prior="vp", model_kwargs=st.model_kwargs,
                             steps=st.diffusion_steps, batch_size=st.batch_size,
                             sample_steps=st.sample_steps, sampler="heun", seed=seed,
                             progress=progress)


class PriorObjective:
    """``J_β(x) = z(f̂(x)) + β·z(g(x))`` of integer sequences: f̂ the reward model, g a term of the
    diffusion ``model`` by :func:`~optidiff.optimize.likelihood.log_density` (``levels`` noise
    levels, noise from ``seed`` and shared by every call):

    - ``"density"``: ``log p̂(x | ∅)``, the null-condition (unconditional) density;
    - ``"classifier"`` (when ``top`` is given): ``r(x) = log p̂(x | top) − log p̂(x | ∅)``, the
      implicit classifier (``log p̂(top | x)`` up to a constant, Bayes' rule; Ho & Salimans 2021,
      classifier-free guidance), ``top`` the condition as the network sees it (z-scored); both
      densities share the noise, so it cancels in the difference.

    Each term is standardised by its mean and std on ``x_ref`` (the data the models were fitted
    on). ``terms(x)`` gives the standardised terms by name (``"f"`` and the model's),
    ``of(β, term)`` the objective on relaxed features, as the optimizers of
    :mod:`~optidiff.optimize.baselines` take it."""

    def __init__(self, reward: Callable[[Tensor], Tensor], model: torch.nn.Module,
                 num_classes: int, x_ref: Tensor, *, levels: int, seed: int,
                 top: float | None = None):
        self.reward, self.model, self.num_classes = reward, model, num_classes
        self.levels, self.seed, self.top = levels, seed, top
        self.names = ("f", "density") + (() if top is None else ("classifier",))
        raw = self._raw(B.relaxed(x_ref, num_classes), self.names)
        self._stats = {k: (float(v.mean()), float(v.std()) or 1.0) for k, v in raw.items()}
        self._space: tuple[Tensor, dict[str, Tensor]] | None = None

    def log_p(self, z: Tensor, cond: float = math.nan) -> Tensor:
        """The unstandardised ``log p̂(z | cond)`` of relaxed features (float64; NaN: null)."""
        from .likelihood import log_density

        return log_density(self.model, z, levels=self.levels, seed=self.seed, cond=cond)

    def density(self, z: Tensor) -> Tensor:
        """The unstandardised ``log p̂(z | ∅)`` of relaxed features (float64)."""
        return self.log_p(z)

    def _raw(self, z: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
        out = {"f": pseudo_label(self.reward, z).double()}
        if len(names) > 1:
            lp = self.density(z)
            out["density"] = lp
            if "classifier" in names:
                out["classifier"] = self.log_p(z, self.top) - lp
        return {k: out[k] for k in names}

    def _z(self, z: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
        return {k: (v - self._stats[k][0]) / self._stats[k][1]
                for k, v in self._raw(z, names).items()}

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        return self._z(B.relaxed(x, self.num_classes), self.names)

    def of(self, beta: float, term: str = "density") -> Callable[[Tensor], Tensor]:
        if term not in self.names[1:]:
            raise ValueError(f"term must be one of {self.names[1:]} (\"classifier\" needs top), "
                             f"got term={term!r}")

        def J(z: Tensor) -> Tensor:
            if not beta:  # the surrogate alone: no density evaluations
                return self._z(z, ("f",))["f"]
            t = self._z(z, ("f", term))
            return t["f"] + beta * t[term]
        return J

    def space(self, length: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Every sequence of the space with its standardised terms (computed once)."""
        if self._space is None:
            x = B.space(length, self.num_classes)
            self._space = (x, self.terms(x))
        return self._space


class _Generator:
    """Samples of one trained model, cached per (guidance scale, size), on the data ``(x, y)``
    it was trained on."""

    def __init__(self, res, problem: SequenceProblem, st: SuiteSettings, seed: int, x: Tensor,
                 y: Tensor):
        self.res, self.problem, self.st, self.seed, self.x, self.y = res, problem, st, seed, x, y
        self._cache: dict[tuple[float, int], Tensor] = {}
        self._prior: PriorObjective | None = None

    def prior(self, reward: EnsembleReward) -> PriorObjective:
        """The :class:`PriorObjective` of the model, with its implicit classifier at the largest
        training condition when ``st.methods`` has "RCD implicit classifier"."""
        if self._prior is None:
            res = self.res
            top = ((float(res.labels.max()) - res.y_mean) / res.y_std
                   if "RCD implicit classifier" in self.st.methods else None)
            self._prior = PriorObjective(reward, res.model, self.problem.num_classes, self.x,
                                         levels=self.st.likelihood_levels, seed=self.seed,
                                         top=top)
        return self._prior

    def __call__(self, scale: float, size: int) -> Tensor:
        key = (scale, size)
        if key not in self._cache:
            kw = ({"reward_scale": scale, "reward_target": "ascent",
                   "reward_clip": self.st.reward_clip} if scale else {"reward_scale": 0.0})
            z = self.res.generate("max", size, seed=self.seed, **kw)
            self._cache[key] = to_integers(z.cpu(), self.problem.num_classes)
        return self._cache[key]


def _generative(name: str, gen: _Generator, reward: EnsembleReward, exclude: set[bytes],
                problem: SequenceProblem, st: SuiteSettings, setting: dict[str, float]) -> Tensor:
    n, pool = st.n, st.n * st.pool
    if name == "RCD (tutorial)":
        return gen(0.0, n)
    if name == "RCD, novel only":
        x = gen(0.0, pool)
        return B.top_new(x, -torch.arange(len(x), dtype=torch.float64), n, exclude)
    if name == "RCD + reward guidance":
        return gen(setting["reward_scale"], n)
    if name in PRIOR_ROWS:
        (term, key), prior = PRIOR_ROWS[name], gen.prior(reward)
        beta = setting[key]
        if problem.enumerable:
            x, t = prior.space(problem.length)
            return B.top_new(x, t["f"] + beta * t[term], n, exclude)
        return B.evolution(prior.of(beta, term), gen.x, gen.y, problem.num_classes, n, exclude,
                           seed=gen.seed, generations=st.evolution_generations)
    x = gen(setting["trust_scale"], pool)
    lcb = penalised(reward, setting["penalty"])
    score = pseudo_label(lcb, problem.features(x))
    if name == "RCD trust region":
        return B.top_new(x, score, n, exclude)
    start = B.top_new(x, score, pool, set())  # distinct, best first
    return B.evolution(lcb, start, pseudo_label(lcb, problem.features(start)),
                       problem.num_classes, n, exclude, seed=gen.seed,
                       generations=st.evolution_generations)


def _baseline(name: str, reward: EnsembleReward, problem: SequenceProblem, st: SuiteSettings,
              exclude: set[bytes], seed: int) -> Tensor | None:
    C, L = problem.num_classes, problem.length
    if name == "uniform random":
        return B.uniform_random(st.n, L, C, seed)
    if name == "enumeration":
        return B.enumeration(reward, L, C, st.n, exclude) if problem.enumerable else None
    if name == "gradient ascent":
        return B.surrogate_gradient_ascent(reward, problem.x, problem.y, C, st.n)
    return B.evolution(reward, problem.x, problem.y, C, st.n, exclude, seed=seed,
                       generations=st.evolution_generations)


def select(problem: SequenceProblem, st: SuiteSettings, validator: EnsembleReward,
           progress: bool | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The held-out-top selection of the guidance scale (RCD + reward guidance), of the
    trust region's (scale, λ) and of the prior weight β (and, with "RCD implicit classifier" in
    ``st.methods``, of its β from the same grid), on the first seed's inner split."""
    seed = st.seeds[0]
    x_in, y_in = holdout_split(problem.x, problem.y, st.holdout)
    f_in = _fit(x_in, y_in, problem, st, seed)
    gen = _Generator(_diffusion(x_in, y_in, f_in, problem, st, seed, progress), problem, st, seed,
                     x_in, y_in)
    inner = set(B.seq_keys(x_in))
    args = (x_in, validator, problem.features)
    scale, t1 = select_setting(list(st.reward_scales), lambda s: gen(s, st.n), *args)
    grid = [(s, lam) for lam in st.penalties for s in dict.fromkeys((0.0, *st.reward_scales))]
    (ts, lam), t2 = select_setting(grid, lambda sl: _generative(
        "RCD trust region", gen, f_in, inner, problem, st,
        {"trust_scale": sl[0], "penalty": sl[1]}), *args)
    table = [{"method": "RCD + reward guidance", **r} for r in t1] + \
             [{"method": "RCD trust region", **r} for r in t2]
    chosen = {"reward_scale": scale, "trust_scale": ts, "penalty": lam}
    for name, (_, key) in PRIOR_ROWS.items():
        if name in st.methods:
            chosen[key], t = select_setting(list(st.prior_weights), lambda b, m=name, k=key:
                _generative(m, gen, f_in, inner, problem, st, {k: b}), *args)
            table += [{"method": name, **r} for r in t]
    return chosen, table


def select_problem(problem: SequenceProblem, st: SuiteSettings,
                   progress: bool | None = None) -> dict[str, Any]:
    """The settings every seed's generative rows use: :func:`select` on the first seed, its
    validator the reward model of that seed fitted on the whole visible set; returns the chosen
    ``setting``, the ``selection`` table and its ``seconds`` (a deterministic function of the
    problem and ``st``, so it may run in any process)."""
    t0 = time.perf_counter()
    f = _fit(problem.x, problem.y, problem, st, st.seeds[0])
    setting, table = select(problem, st, f, progress)
    return {"setting": setting, "selection": table, "seconds": time.perf_counter() - t0}


def run_seed(problem: SequenceProblem, st: SuiteSettings, seed: int,
             chosen: dict[str, Any] | None, *, progress: bool | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every method of ``st.methods`` on ``problem`` for one ``seed``, the rows of ``RCD_ROWS``
    with the settings ``chosen`` by :func:`select_problem` (None: no RCD row); returns the
    records (metrics of :func:`evaluate`, seconds) and the rank correlations with the oracle of
    f̂ and (with "RCD prior-regularised") of the diffusion prior's log-density. Seconds of a
    row count what it needs: the reward fit, the diffusion training and a share
    ``1/len(st.seeds)`` of the selection for RCD rows, DDOM's own training, its own
    generation."""
    visible = set(B.seq_keys(problem.x))
    records, rho_prior = [], None
    t0 = time.perf_counter()
    f = _fit(problem.x, problem.y, problem, st, seed)
    t_reward = time.perf_counter() - t0
    rho = rank_correlation(problem, f)
    gen, t_train = None, 0.0
    if st.runs_rcd:
        if chosen is None:
            raise ValueError(f"chosen=None but st.methods has RCD rows: {st.methods}")
        t1 = time.perf_counter()
        gen = _Generator(_diffusion(problem.x, problem.y, f, problem, st, seed, progress),
                         problem, st, seed, problem.x, problem.y)
        t_train = time.perf_counter() - t1
        if "RCD prior-regularised" in st.methods:
            rho_prior = prior_rank_correlation(problem, gen.prior(f))
    for name in st.methods:
        t2 = time.perf_counter()
        if name == "DDOM":  # its own model, no reward model and no selection
            z, base = ddom(problem, st, seed, progress).generate("max", st.n, seed=seed), 0.0
            x = to_integers(z.cpu(), problem.num_classes)
        elif name in RCD_ROWS:
            x = _generative(name, gen, f, visible, problem, st, chosen["setting"])
            base = t_reward + t_train + chosen["seconds"] / len(st.seeds)
        else:
            x = _baseline(name, f, problem, st, visible, seed)
            base = 0.0 if name == "uniform random" else t_reward
        if x is None:
            continue
        rec = {"problem": problem.name, "method": name, "seed": seed,
               **evaluate(problem, x, visible), "seconds": base + time.perf_counter() - t2}
        records.append(rec)
        if log:
            log(f"{problem.name} seed {seed} {name}: p100 {rec['p100']:.3f} p50 "
                f"{rec['p50']:.3f} novel {rec['novel']:.2f} dup {rec['duplicates']} "
                f"feasible {rec['feasible']:.2f}")
    return {"seed": seed, "records": records, "rank_correlation": rho,
            "prior_rank_correlation": rho_prior}


def problem_result(problem: SequenceProblem, st: SuiteSettings, chosen: dict[str, Any] | None,
                   cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The result of :func:`run_problem` from its parts: the selection and the per-seed cells
    (in any order; assembled in the order of ``st.seeds``)."""
    by_seed = {c["seed"]: c for c in cells}
    if sorted(by_seed) != sorted(st.seeds):
        raise ValueError(f"cells must hold each seed of {st.seeds} once, got {list(by_seed)}")
    ordered = [by_seed[s] for s in st.seeds]
    return {"problem": problem.name, "info": problem.info,
            "setting": chosen["setting"] if chosen else {},
            "selection": chosen["selection"] if chosen else [],
            "rank_correlation": {c["seed"]: c["rank_correlation"] for c in ordered},
            "prior_rank_correlation": {c["seed"]: c["prior_rank_correlation"] for c in ordered
                                       if c["prior_rank_correlation"] is not None},
            "records": [r for c in ordered for r in c["records"]],
            "settings": dataclasses.asdict(st)}


def run_problem(problem: SequenceProblem, st: SuiteSettings = SuiteSettings(), *,
                progress: bool | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every method of ``st.methods`` on ``problem`` for every seed (:func:`select_problem`, then
    :func:`run_seed` per seed); returns the chosen settings, the selection table, one record per
    (method, seed) and the rank correlations of f̂ and of the prior per seed."""
    chosen = select_problem(problem, st, progress) if st.runs_rcd else None
    cells = [run_seed(problem, st, seed, chosen, progress=progress, log=log)
             for seed in st.seeds]
    return problem_result(problem, st, chosen, cells)


#: per worker process: the problems of each (task, parameters) built once
_PROBLEMS: dict[tuple[str, str], list[SequenceProblem]] = {}


def _problems(task: str, params: str) -> list[SequenceProblem]:
    from ..tasks import make_task

    if (task, params) not in _PROBLEMS:
        _PROBLEMS[task, params] = make_task(task, **json.loads(params)).problems()
    return _PROBLEMS[task, params]


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cell(task: str, params: str, st: SuiteSettings, i: int, seed: int | None,
          chosen: dict[str, Any] | None, log: bool) -> dict[str, Any]:
    """One unit of :func:`run_problems` in a worker: the selection of problem ``i`` (``seed``
    None) or its run for one seed."""
    problem = _problems(task, params)[i]
    if seed is None:
        return select_problem(problem, st, progress=False)
    return run_seed(problem, st, seed, chosen, progress=False,
                    log=_log_stderr if log else None)


def run_problems(task: str, params: dict[str, Any], st: SuiteSettings = SuiteSettings(), *,
                 workers: int = 1, threads: int = 1,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """:func:`run_problem` on every problem of ``make_task(task, **params)``; with ``workers``
    > 1 the selections and the (problem, seed) cells run in that many spawned processes of
    ``threads`` torch threads each (a problem's seeds start once its selection is done). Every
    random draw of a cell comes from its problem and seed, so the results equal the serial run's
    (``workers = 1``, in this process, also with ``threads`` torch threads) apart from the
    seconds; in workers, ``log`` (any value
    but None) turns on their progress lines on stderr."""
    from ..tasks import make_task

    for name, v in (("workers", workers), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {name}={v!r}")
    problems = make_task(task, **params).problems()
    if workers == 1:  # with the workers' thread count: a reduction's order depends on it
        with torch_threads(threads):
            return [run_problem(p, st, progress=False, log=log) for p in problems]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    key = json.dumps(params, sort_keys=True)
    chosen: dict[int, dict[str, Any] | None] = {i: None for i in range(len(problems))}
    cells: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(problems))}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as ex:
        def submit(i: int, seed: int | None) -> None:
            fut = ex.submit(_cell, task, key, st, i, seed, chosen[i], log is not None)
            pending[fut] = (i, seed)

        pending: dict[Any, tuple[int, int | None]] = {}
        for i in range(len(problems)):
            for seed in ((None,) if st.runs_rcd else st.seeds):
                submit(i, seed)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i, seed = pending.pop(fut)
                if seed is not None:
                    cells[i].append(fut.result())
                    continue
                chosen[i] = fut.result()
                for s in st.seeds:
                    submit(i, s)
    return [problem_result(p, st, chosen[i], cells[i]) for i, p in enumerate(problems)]
