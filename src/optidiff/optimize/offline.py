"""Offline reward maximization with diffusion models: the pipelines.

Setting (the Wang & Chen tutorial, "Problem setup: offline reward maximization"): a large unlabeled set
``{x_j}`` and a few labeled pairs ``(x_i, y_i = f*(x_i) + ε_i)``; generate new ``x`` of high
reward. The meta algorithm (Yuan et al., NeurIPS 2023, "reward-directed conditional diffusion";
journal version Li et al. 2024, arXiv 2403.13219):

1. **reward learning**: fit ``f̂`` on the labeled pairs (:func:`~optidiff.optimize.rewards.fit_reward`: ridge regression
   ``θ̂ = (X_cᵀX_c + λI)⁻¹X_cᵀy_c`` on centred data, or a small MLP, optionally a bootstrap ensemble
   whose prediction is the members' mean);
2. **pseudo-labeling**: ``ŷ_j = f̂(x_j) (+ N(0, s²))`` for the unlabeled data
   (:func:`~optidiff.optimize.rewards.pseudo_label`);
3. **conditional diffusion training**: a model ``model(x, σ, cond=y)`` trained by denoising score
   matching on ``(x, ŷ)`` with condition dropout (rows replaced by the null condition with
   probability ``cond_drop``), so the same network is also unconditional;
4. **guided generation** at a target reward ``a``: sample ``p̂(x | y = a)``, optionally with
   classifier-free guidance ``eps = eps_u + w·(eps_c − eps_u)`` (``w = 1``: the tutorial's plain
   conditional sampling).

Quality measure (the tutorial): ``SubOpt(a) = a − mean f*(generated)`` (:func:`subopt`); the theory
bounds it by a reward-learning term ``~√(d log n_label / n_label)`` (falls with more labels) plus an
off-support term that grows with ``a`` once ``a`` leaves the data's support.

DDOM (Krishnamoorthy, Mashkaria & Grover, ICML 2023; code ``siddarthk97/ddom``) is the same model
trained on the *observed* labels of a fully labeled data set, with two additions available here as
options: the training distribution is reweighted toward high ``y``
(:func:`~optidiff.optimize.rewards.ddom_weights`), and generation conditions on the data
maximum (``target="max"``) with classifier-free guidance (DDOM's ``(1+γ)s_c − γs_u`` with γ = 2 is
``w = 3`` here).

The classifier-guidance variant (the official RCGDM image code, ``sd_pipeline.py``) keeps an
unconditional model and adds the gradient of a Gaussian log-likelihood of the target,
``G = ∇ₓ log N(a; f̂(x̂0(x)), 1/s) = −s·∇ₓ ½(a − f̂(x̂0(x)))²``
(:class:`optidiff.guidance.RewardGuidance`, :func:`reward_guided`); gradient ascent on ``f̂``
(:func:`~optidiff.optimize.rewards.gradient_ascent`, Design-Bench's "Grad." baseline) is the non-generative baseline.

The guidance weights are called ``cfg_scale`` (classifier-free) and ``reward_scale`` (reward
guidance, toward ``reward_target``, its move of x0_hat bounded by ``reward_clip``); the old names
``cfg_weight``, ``guidance_scale``, ``guidance_target`` and ``guidance_clip`` still work for one
release, with a DeprecationWarning.
"""


from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import rng
from ..guidance import ClassifierFree, RewardGuidance, guided_model
from ..guidance.base import renamed
from ..models.conditional import ConditionalMLP
from ..models.mlp import TimeMLP
from ..sampling import SAMPLERS, sample
from ..schedules import LogLinearSchedule, Schedule
from ..training import TrainResult, train
from .rewards import _as_2d, _as_labels, ddom_weights, fit_reward, offline_seed, pseudo_label

__all__ = ["PRIORS", "OfflineResult", "ddom_schedule", "reward_conditioned", "reward_guided",
           "subopt"]

_RENAMED = (("cfg_weight", "cfg_scale"), ("guidance_scale", "reward_scale"),
            ("guidance_target", "reward_target"), ("guidance_clip", "reward_clip"))


def _new_names(kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    for old, new in _RENAMED:
        renamed(kwargs, old, new, owner)
    return kwargs


def _generator(seed: int, stream: str) -> torch.Generator:
    return rng.generator(offline_seed(seed, stream))


PRIORS = ("ve", "vp")


def _prior(prior: str, sigma_max: Tensor, shape: tuple[int, ...],
           generator: torch.Generator) -> Tensor:
    """Initial state at σ_N: ``σ_N·w`` ("ve", the VE prior of :func:`optidiff.sample`) or
    ``√(1 + σ_N²)·w`` ("vp": the VP-SDE prior z_T ~ N(0, I) mapped to x = z·√(1+σ²), as DDOM's
    sampler starts; the two agree when σ_N ≫ 1)."""
    w = torch.randn(shape, generator=generator)
    s = float(sigma_max)
    return (s if prior == "ve" else math.sqrt(1 + s * s)) * w


def ddom_schedule(beta_min: float = 0.01, beta_max: float = 2.0, T: float = 1.0,
                  t_min: float = 1e-3, n: int = 1000) -> Schedule:
    """DDOM's VP-SDE noise levels as a σ table (its configs use β_min = 0.01, β_max = 2, T = 1):
    with linear ``β(t)``, ``ᾱ(t) = exp(−β_min·t − ½(β_max − β_min)·t²)`` and
    ``σ(t) = √(1/ᾱ(t) − 1)`` (the VP-to-VE conversion) at ``n`` times uniform in
    ``[t_min, T]``; uniform training indices then draw t uniformly, as DDOM's continuous-time
    loss does. σ_max = 1.32 for the defaults: DDOM does not diffuse to pure noise."""
    if not (0 < beta_min <= beta_max and 0 < t_min < T):
        raise ValueError(f"need 0 < beta_min <= beta_max and 0 < t_min < T, got beta_min="
                         f"{beta_min}, beta_max={beta_max}, t_min={t_min}, T={T}")
    t = torch.linspace(t_min, T, n, dtype=torch.float64)
    log_abar = -beta_min * t - 0.5 * (beta_max - beta_min) * t**2
    return Schedule(torch.expm1(-log_abar).sqrt())


@dataclass
class OfflineResult:
    """Outcome of :func:`reward_conditioned` / :func:`reward_guided`.

    ``model``: the trained diffusion model (EMA weights); ``reward_model``: f̂ (None for DDOM's
    observed-label setting); ``labels``: the (raw-unit) condition of every training row;
    ``y_mean``, ``y_std``: the z-scoring of conditions seen by the network; ``weights``: DDOM
    weights (None when not reweighted); ``cfg_scale``, ``reward_scale``, ``reward_target``,
    ``reward_clip``: the defaults of :meth:`generate`; ``train``: the training result;
    ``timings``: seconds per phase.
    """

    method: str
    model: nn.Module
    reward_model: nn.Module | None
    labels: Tensor
    y_mean: float
    y_std: float
    sigmas: Tensor
    sampler: str
    cfg_scale: float
    reward_scale: float
    train: TrainResult
    weights: Tensor | None = None
    prior: str = "ve"
    reward_target: float | str | None = None
    reward_clip: float | None = None
    target: float | None = None
    samples: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def resolve_target(self, target: float | str) -> float:
        """A number, ``"max"`` (the largest training condition, DDOM) or ``"qXX"`` (quantile XX
        of the training conditions, e.g. ``"q90"``)."""
        if isinstance(target, str):
            if target == "max":
                return float(self.labels.max())
            if target.startswith("q") and target[1:].replace(".", "", 1).isdigit():
                q = float(target[1:])
                if 0 <= q <= 100:
                    return float(torch.quantile(self.labels.double(), q / 100))
            raise ValueError(f"target must be a number, 'max' or 'qXX' (0 <= XX <= 100), got "
                             f"{target!r}")
        target = float(target)
        if not math.isfinite(target):
            raise ValueError(f"target must be finite, got {target}")
        return target

    def generate(self, target: float | str, batch_size: int | None = None, *, seed: int = 0,
                 cfg_scale: float | None = None, reward_scale: float | None = None,
                 reward_target: float | str | None = None, reward_clip: float | None = None,
                 chunk_size: int | None = None, **deprecated: Any) -> Tensor:
        """``batch_size`` samples at target reward ``target`` (raw units; see
        :meth:`resolve_target`).

        Reward-conditioned models sample ``p̂(x | y = a)``, with classifier-free guidance when
        ``cfg_scale ≠ 1``. A positive ``reward_scale`` adds :class:`~optidiff.guidance.RewardGuidance`
        of the reward model (classifier guidance; for a reward-conditioned model on top of CFG)
        toward ``reward_target`` (default ``target``; ``"ascent"``: plain ascent ``G = s·∇f̂``), the
        move of x0_hat bounded by ``reward_clip``. Defaults come from the fitted result.
        """
        kw = _new_names(renamed(dict(deprecated), "n", "batch_size", "OfflineResult.generate"),
                        "OfflineResult.generate")
        unknown = set(kw) - {"batch_size", "cfg_scale", "reward_scale", "reward_target",
                             "reward_clip"}
        if unknown:
            raise TypeError(f"OfflineResult.generate got unexpected keywords {sorted(unknown)}")
        batch_size = kw.get("batch_size", batch_size)
        cfg_scale, reward_scale = kw.get("cfg_scale", cfg_scale), kw.get("reward_scale", reward_scale)
        reward_target = kw.get("reward_target", reward_target)
        reward_clip = kw.get("reward_clip", reward_clip)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
        a = self.resolve_target(target)
        s = self.reward_scale if reward_scale is None else float(reward_scale)
        clip = self.reward_clip if reward_clip is None else reward_clip
        gt = self.reward_target if reward_target is None else reward_target
        gt = a if gt is None else (None if gt == "ascent" else self.resolve_target(gt))
        if s > 0 and self.reward_model is None:
            raise ValueError("reward_scale > 0 needs a reward model (fit one with reward='mlp' "
                             "or 'ridge')")
        g = _generator(seed, "sample")
        model = self.model
        device = next(model.parameters()).device
        x_init = _prior(self.prior, self.sigmas[0], (batch_size, *model.input_shape), g).to(device)
        reward = None if s == 0 else RewardGuidance(self.reward_model, gt, scale=s, max_move=clip)
        if self.method == "classifier_guidance":
            return sample(model, self.sigmas, x_init=x_init, sampler=self.sampler,
                          guidance=reward, generator=g)
        w = self.cfg_scale if cfg_scale is None else cfg_scale
        cond = torch.full((batch_size,), (a - self.y_mean) / self.y_std, device=device)
        if w != 1.0:  # the NaN null condition of ConditionalMLP
            cfg = ClassifierFree(w, null_cond=math.nan)
            model, guidance = (guided_model(model, cfg), reward) if reward else (model, cfg)
        else:
            guidance = reward
        return sample(model, self.sigmas, x_init=x_init, sampler=self.sampler, guidance=guidance,
                      cond=cond, generator=g, chunk_size=chunk_size if guidance is None else None)


# -------------------------------------------------------------------------------- pipelines

def _training_set(data: Tensor | None, x_labeled: Tensor | None, y_labeled: Tensor | None,
                  reward: Any, ensemble: int, reward_kwargs: dict[str, Any] | None,
                  relabel_labeled: bool, pseudo_label_noise: float, seed: int
                  ) -> tuple[Tensor, Tensor, nn.Module | None]:
    """Steps 1–2: (x, condition) of every training row and the reward model."""
    if x_labeled is not None:
        x_labeled = _as_2d(x_labeled, "x_labeled")
        y_labeled = _as_labels(y_labeled, len(x_labeled), "y_labeled")
    elif y_labeled is not None:
        raise ValueError("y_labeled given without x_labeled")
    if data is not None:
        data = _as_2d(data, "data")
        if x_labeled is not None and data.shape[1:] != x_labeled.shape[1:]:
            raise ValueError(f"data and x_labeled have different shapes per sample: "
                             f"{tuple(data.shape[1:])} vs {tuple(x_labeled.shape[1:])}")
    if reward is None:
        if data is not None:
            raise ValueError("reward=None (observed labels only) needs data=None; give a reward "
                             "model kind to pseudo-label unlabeled data")
        if x_labeled is None:
            raise ValueError("give labeled data (x_labeled, y_labeled)")
        return x_labeled, y_labeled.float(), None
    if isinstance(reward, str):
        if x_labeled is None:
            raise ValueError(f"reward={reward!r} must be fitted on labeled data; give x_labeled "
                             f"and y_labeled (or pass a fitted reward model)")
        f = fit_reward(x_labeled, y_labeled, kind=reward, ensemble=ensemble, seed=seed,
                       **(reward_kwargs or {}))
    elif callable(reward):
        f = reward
    else:
        raise TypeError(f"reward must be 'ridge', 'mlp', None or a callable, got {reward!r}")
    g = _generator(seed, "pseudo-label")
    xs, ys = [], []
    if data is not None:
        xs.append(data)
        ys.append(pseudo_label(f, data, noise_std=pseudo_label_noise, generator=g))
    if x_labeled is not None:
        xs.append(x_labeled)
        ys.append(pseudo_label(f, x_labeled, noise_std=pseudo_label_noise, generator=g)
                  if relabel_labeled else y_labeled.float())
    if not xs:
        raise ValueError("no training data: give data and/or x_labeled")
    return torch.cat(xs), torch.cat(ys), f


def _check_common(cond_drop: float, cfg_scale: float, sampler: str, sample_steps: int,
                  prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"unknown prior={prior!r}; choose one of {', '.join(PRIORS)}")
    if not 0 <= cond_drop < 1:
        raise ValueError(f"cond_drop must be in [0, 1), got cond_drop={cond_drop}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got cfg_scale={cfg_scale}")
    if cfg_scale != 1.0 and cond_drop == 0:
        raise ValueError(f"cfg_scale={cfg_scale} needs an unconditional model: set cond_drop > 0")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(sample_steps, bool) or not isinstance(sample_steps, int) or sample_steps < 1:
        raise ValueError(f"sample_steps must be a positive int, got sample_steps={sample_steps!r}")


def _default_schedule(schedule: Schedule | None) -> Schedule:
    return LogLinearSchedule(0.01, 20.0, 1000) if schedule is None else schedule


def _init_model(model: nn.Module | None, model_kwargs: dict[str, Any] | None, cls: type,
                x: Tensor, seed: int, **defaults: Any) -> nn.Module:
    """``model``, or a new ``cls(D, **defaults, sigma_data=std(x), **model_kwargs)`` initialised
    from ``seed``."""
    if model is not None:
        if model_kwargs:
            raise ValueError("model_kwargs only apply to the default model; got a model as well")
        return model
    kw = {**defaults, "sigma_data": max(float(x.float().std()), 1e-3), **(model_kwargs or {})}
    with rng.seeded(offline_seed(seed, "model-init")):
        return cls(x[0].numel(), **kw)


def _train(model: nn.Module, x: Tensor, schedule: Schedule, seed: int, train_kwargs: dict[str, Any],
           **extra: Any) -> tuple[TrainResult, float]:
    """:func:`optidiff.train` with the offline run's derived seed; returns (result, seconds)."""
    t0 = time.perf_counter()
    res = train(model, x.float(), schedule=schedule, seed=offline_seed(seed, "train") % (2**31),
                **train_kwargs, **extra)
    return res, time.perf_counter() - t0


def _generate_now(out: OfflineResult, deprecated: dict[str, Any], seed: int) -> OfflineResult:
    """The deprecated immediate generation (``target=``, ``n_samples=``)."""
    target, n = deprecated.pop("target", None), deprecated.pop("n_samples", 128)
    if deprecated:
        raise TypeError(f"unexpected keyword arguments {sorted(deprecated)}")
    if target is not None:
        warnings.warn("target=/n_samples= are deprecated; call result.generate(target, "
                      "batch_size) instead", DeprecationWarning, stacklevel=3)
        t0 = time.perf_counter()
        out.target = out.resolve_target(target)
        out.samples = out.generate(out.target, n, seed=seed)
        out.timings["sample_s"] = time.perf_counter() - t0
    return out


def reward_conditioned(data: Tensor | None, x_labeled: Tensor | None = None,
                       y_labeled: Tensor | None = None, *,
                       reward: str | Callable[[Tensor], Tensor] | None = "ridge",
                       ensemble: int = 1, reward_kwargs: dict[str, Any] | None = None,
                       relabel_labeled: bool = True, pseudo_label_noise: float = 0.0,
                       reweight: bool = False, reweight_kwargs: dict[str, Any] | None = None,
                       cond_drop: float = 0.15, model: nn.Module | None = None,
                       model_kwargs: dict[str, Any] | None = None,
                       schedule: Schedule | None = None, steps: int = 4000,
                       batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                       ema_decay: float = 0.999, grad_clip: float | None = 1.0,
                       lr_schedule: str = "constant",
                       cfg_scale: float = 1.0, reward_scale: float = 0.0,
                       reward_target: float | str | None = None,
                       reward_clip: float | None = None, sample_steps: int = 100,
                       sampler: str = "ddpm", prior: str = "ve", seed: int = 0,
                       run_dir: str | os.PathLike | None = None, resume: bool = False,
                       progress: bool | None = None, device: torch.device | str | None = None,
                       **deprecated: Any) -> OfflineResult:
    """Reward-directed conditional diffusion (the tutorial's meta algorithm; DDOM as options).

    Args:
        data: unlabeled designs ``(N, *dims)`` (or None: labeled data only).
        x_labeled, y_labeled: the labeled pairs.
        reward: ``"ridge"`` / ``"mlp"`` (fitted on the labeled pairs by
            :func:`~optidiff.optimize.rewards.fit_reward` with ``ensemble`` and ``reward_kwargs``),
            a fitted callable ``f̂(x) -> (B,)``, or None: train on the observed labels of
            ``(x_labeled, y_labeled)`` only (DDOM; ``data`` must be None).
        relabel_labeled: condition the labeled points on ``f̂`` too (default), not on their observed
            labels: with noisy labels the observed ``y`` dilutes the condition (regression to the
            mean: samples at ``y = a`` have true reward nearer the data mean).
        pseudo_label_noise: std of Gaussian noise added to pseudo-labels.
        reweight: DDOM's reweighting (:func:`~optidiff.optimize.rewards.ddom_weights` of the
            training conditions, with ``reweight_kwargs``), applied by importance resampling: the
            training rows are redrawn ``N`` times with replacement with probability ∝ weight (in
            expectation the weighted DSM loss ``Σ w_i·ℓ_i/Σ w_i`` of DDOM's ``dsm_weighted``).
        cond_drop: condition dropout probability (null condition: a NaN row, mapped to the
            model's learned null embedding). DDOM: 0.15.
        model: a conditional ε-model taking a float ``cond`` of shape ``(B,)`` with NaN as the null
            condition (default :class:`~optidiff.models.ConditionalMLP` with ``model_kwargs`` and
            ``sigma_data`` = the data's overall standard deviation).
        schedule: training σ table (default log-linear 0.01 … 20, 1000 levels); sampling uses
            ``schedule.sample_sigmas(sample_steps, final_zero=True)``.
        steps, batch_size, lr, weight_decay, ema_decay, grad_clip, lr_schedule:
            :func:`optidiff.train`.
        cfg_scale: classifier-free guidance scale w (1 = plain conditional sampling, the tutorial's
            method; DDOM's γ = 2 is w = 3).
        reward_scale, reward_target, reward_clip: optional reward-gradient guidance on top
            (see :meth:`OfflineResult.generate`); needs a reward model (with observed labels:
            ``reward="mlp", relabel_labeled=False``).
        sampler: any :func:`optidiff.sample` sampler name.
        prior: the initial state at σ_N, ``"ve"`` (``σ_N·w``) or ``"vp"`` (``√(1+σ_N²)·w``, DDOM's
            VP prior; matters when σ_N is small, e.g. with :func:`ddom_schedule`).
        seed: every random draw (reward fit, pseudo-label noise, resampling, training, sampling)
            derives from it.
        run_dir, resume: the training run directory (:func:`optidiff.train`'s exact resume).
        device: where to train and generate (the reward model is moved there too).

    Conditions are z-scored with the mean and std of the training conditions before they reach
    the network; targets are given in raw reward units. Generate with :meth:`OfflineResult.generate`.
    """
    kw = _new_names(dict(deprecated), "reward_conditioned")
    cfg_scale, reward_scale = kw.pop("cfg_scale", cfg_scale), kw.pop("reward_scale", reward_scale)
    reward_target = kw.pop("reward_target", reward_target)
    reward_clip = kw.pop("reward_clip", reward_clip)
    _check_common(cond_drop, cfg_scale, sampler, sample_steps, prior)
    t0 = time.perf_counter()
    x, y, f = _training_set(data, x_labeled, y_labeled, reward, ensemble, reward_kwargs,
                            relabel_labeled, pseudo_label_noise, seed)
    t_reward = time.perf_counter() - t0
    weights = None
    x_train, y_train = x, y
    if reweight:
        weights = ddom_weights(y, **(reweight_kwargs or {}))
        if not weights.sum() > 0:
            raise ValueError("the DDOM weights are all zero")
        idx = torch.multinomial(weights.double(), len(x), replacement=True,
                                generator=_generator(seed, "resample"))
        x_train, y_train = x[idx], y[idx]
    y_mean, y_std = float(y.mean()), float(y.std()) if len(y) > 1 else 1.0
    y_std = y_std if y_std > 0 else 1.0
    model = _init_model(model, model_kwargs, ConditionalMLP, x, seed)
    sched = _default_schedule(schedule)
    res, t_train = _train(model, x_train, sched, seed, dict(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        ema_decay=ema_decay, grad_clip=grad_clip, lr_schedule=lr_schedule, run_dir=run_dir,
        resume=resume, progress=progress, device=device),
        cond=((y_train - y_mean) / y_std).float(), cond_drop=cond_drop)
    f = f.to(device or "cpu") if isinstance(f, nn.Module) else f
    out = OfflineResult(method="reward_conditioned", model=res.ema.eval(), reward_model=f,
                        labels=y, y_mean=y_mean, y_std=y_std,
                        sigmas=sched.sample_sigmas(sample_steps, final_zero=True),
                        sampler=sampler, cfg_scale=float(cfg_scale),
                        reward_scale=float(reward_scale), reward_target=reward_target,
                        reward_clip=reward_clip, train=res, weights=weights, prior=prior,
                        timings={"reward_s": t_reward, "train_s": t_train})
    return _generate_now(out, kw, seed)


def reward_guided(data: Tensor | None, x_labeled: Tensor | None = None,
                  y_labeled: Tensor | None = None, *,
                  reward: str | Callable[[Tensor], Tensor] = "ridge", ensemble: int = 1,
                  reward_kwargs: dict[str, Any] | None = None, reward_scale: float = 1.0,
                  reward_target: float | str | None = None,
                  reward_clip: float | None = None, model: nn.Module | None = None,
                  model_kwargs: dict[str, Any] | None = None,
                  schedule: Schedule | None = None, steps: int = 4000, batch_size: int = 256,
                  lr: float = 1e-3, weight_decay: float = 0.0, ema_decay: float = 0.999,
                  grad_clip: float | None = 1.0, lr_schedule: str = "constant",
                  sample_steps: int = 100, sampler: str = "ddpm",
                  prior: str = "ve", seed: int = 0, run_dir: str | os.PathLike | None = None,
                  resume: bool = False, progress: bool | None = None,
                  device: torch.device | str | None = None, **deprecated: Any) -> OfflineResult:
    """The classifier-guidance variant: an unconditional model trained on all designs
    (``data`` and ``x_labeled``) plus :class:`~optidiff.guidance.RewardGuidance` of the fitted
    reward ``f̂`` toward the target ``a`` with strength ``reward_scale`` (the image code of Yuan et
    al. 2023). Arguments as in :func:`reward_conditioned`; ``"max"``/``"qXX"`` targets refer to
    ``f̂`` on the training designs.
    """
    kw = _new_names(dict(deprecated), "reward_guided")
    reward_scale, reward_target = (kw.pop("reward_scale", reward_scale),
                                   kw.pop("reward_target", reward_target))
    reward_clip = kw.pop("reward_clip", reward_clip)
    _check_common(0.0, 1.0, sampler, sample_steps, prior)
    if reward is None:
        raise ValueError("classifier guidance needs a reward model (reward='ridge', 'mlp' or a "
                         "callable)")
    t0 = time.perf_counter()
    x, y, f = _training_set(data, x_labeled, y_labeled, reward, ensemble, reward_kwargs, True,
                            0.0, seed)
    t_reward = time.perf_counter() - t0
    model = _init_model(model, model_kwargs, TimeMLP, x, seed, hidden=256)
    sched = _default_schedule(schedule)
    res, t_train = _train(model, x, sched, seed, dict(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        ema_decay=ema_decay, grad_clip=grad_clip, lr_schedule=lr_schedule, run_dir=run_dir,
        resume=resume, progress=progress, device=device))
    f = f.to(device or "cpu") if isinstance(f, nn.Module) else f
    out = OfflineResult(method="classifier_guidance", model=res.ema.eval(), reward_model=f,
                        labels=y, y_mean=0.0, y_std=1.0,
                        sigmas=sched.sample_sigmas(sample_steps, final_zero=True),
                        sampler=sampler, cfg_scale=1.0, reward_scale=float(reward_scale),
                        reward_target=reward_target, reward_clip=reward_clip,
                        train=res, prior=prior,
                        timings={"reward_s": t_reward, "train_s": t_train})
    return _generate_now(out, kw, seed)


# ------------------------------------------------------------------------------------ metrics

def subopt(target: float, true_rewards: Tensor) -> float:
    """The tutorial's suboptimality ``SubOpt(a) = a − mean f*(generated)``."""
    return float(target) - float(torch.as_tensor(true_rewards, dtype=torch.float64).mean())
