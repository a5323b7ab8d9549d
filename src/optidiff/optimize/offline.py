"""Offline reward maximization with diffusion models (seed 002; DESIGN.md §3.6).

Setting (seed 002, "Problem setup: offline reward maximization"): a large unlabeled set
``{x_j}`` and a few labeled pairs ``(x_i, y_i = f*(x_i) + ε_i)``; generate new ``x`` of high
reward. The meta algorithm (Yuan et al., NeurIPS 2023, "reward-directed conditional diffusion";
journal version Li et al. 2024, arXiv 2403.13219):

1. **reward learning**: fit ``f̂`` on the labeled pairs (:func:`fit_reward`: ridge regression
   ``θ̂ = (X_cᵀX_c + λI)⁻¹X_cᵀy_c`` on centred data, or a small MLP, optionally a bootstrap ensemble
   whose prediction is the members' mean);
2. **pseudo-labeling**: ``ŷ_j = f̂(x_j) (+ N(0, s²))`` for the unlabeled data (:func:`pseudo_label`);
3. **conditional diffusion training**: a model ``model(x, σ, cond=y)`` trained by denoising score
   matching on ``(x, ŷ)`` with condition dropout (rows replaced by the null condition with
   probability ``cond_drop``), so the same network is also unconditional;
4. **guided generation** at a target reward ``a``: sample ``p̂(x | y = a)``, optionally with
   classifier-free guidance ``eps = eps_u + w·(eps_c − eps_u)`` (``w = 1``: the seed's plain
   conditional sampling).

Quality measure (seed 002): ``SubOpt(a) = a − mean f*(generated)`` (:func:`subopt`); the theory
bounds it by a reward-learning term ``~√(d log n_label / n_label)`` (falls with more labels) plus an
off-support term that grows with ``a`` once ``a`` leaves the data's support.

DDOM (Krishnamoorthy, Mashkaria & Grover, ICML 2023; code ``siddarthk97/ddom``,
``research/offline_mbo.md`` §2.1) is the same model trained on the *observed* labels of a fully
labeled data set, with two additions available here as options: the training distribution is
reweighted toward high ``y`` (:func:`ddom_weights`), and generation conditions on the data
maximum (``target="max"``) with classifier-free guidance (DDOM's ``(1+γ)s_c − γs_u`` with γ = 2 is
``w = 3`` here).

The classifier-guidance variant (the official RCGDM image code, ``sd_pipeline.py``) keeps an
unconditional model and adds the gradient of a Gaussian log-likelihood of the target,
``G = ∇ₓ log N(a; f̂(x̂0(x)), 1/s) = −s·∇ₓ ½(a − f̂(x̂0(x)))²`` (:class:`RewardGuidance`,
:func:`reward_guided`); gradient ascent on ``f̂`` (:func:`gradient_ascent`, Design-Bench's "Grad."
baseline) is the non-generative baseline.

:func:`run_offline` runs a whole experiment from a configuration (dict or TOML file) for the CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..models.base import sigma_like
from ..models.conditional import ConditionalMLP
from ..models.mlp import TimeMLP
from ..sampling import SAMPLERS, sample
from ..schedules import LogLinearSchedule, Schedule
from ..schema import ConfigError, RunName, choice, read_toml, validate
from ..schema import Section as _Section
from ..training import TrainResult, train

__all__ = [
    "EnsembleReward",
    "LinearSubspaceProblem",
    "MLPReward",
    "OfflineConfig",
    "OfflineConfigError",
    "OfflineResult",
    "RewardGuidance",
    "RidgeReward",
    "ddom_schedule",
    "ddom_weights",
    "fit_reward",
    "gradient_ascent",
    "linear_subspace_problem",
    "load_offline_config",
    "off_support_distance",
    "pseudo_label",
    "reward_conditioned",
    "reward_guided",
    "run_offline",
    "subopt",
]

def _sub_seed(seed: int, stream: str) -> int:
    """Independent 63-bit seeds for each (seed, stream) (same construction as ``training``)."""
    digest = hashlib.sha256(f"optidiff.offline:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(seed: int, stream: str, device: Any = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(_sub_seed(seed, stream))


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2 or len(x) == 0 or not x.is_floating_point():
        raise ValueError(f"{name} must be a non-empty float tensor of shape (N, *dims), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return x


def _as_labels(y: Tensor, n: int, name: str) -> Tensor:
    y = torch.as_tensor(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or not y.is_floating_point() or not torch.isfinite(y).all():
        raise ValueError(f"{name} must be a finite float tensor of shape ({n},), got "
                         f"{y.dtype} {tuple(y.shape)}")
    return y


# ------------------------------------------------------------------------------ reward models

class RidgeReward(nn.Module):
    """Linear reward ``f̂(x) = θ̂ᵀx + b`` (x flattened), fitted by ridge regression:
    ``θ̂ = (X_cᵀX_c + λI)⁻¹X_cᵀ(y − ȳ)``, ``b = ȳ − x̄ᵀθ̂`` with ``X_c = X − x̄`` (the intercept is
    not penalised; seed 002's reward-learning step for linear rewards, ``Σ̂_λ = (XᵀX + λI)/n``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("theta", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros((), dtype=torch.float64))

    @classmethod
    def fit(cls, x: Tensor, y: Tensor, alpha: float = 1.0) -> RidgeReward:
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be >= 0, got alpha={alpha}")
        X = x.flatten(1).to(torch.float64)
        y = y.to(torch.float64)
        xm, ym = X.mean(0), y.mean()
        Xc = X - xm
        gram = Xc.T @ Xc + alpha * torch.eye(X.shape[1], dtype=X.dtype)
        theta = torch.linalg.lstsq(gram, Xc.T @ (y - ym)).solution
        m = cls(X.shape[1])
        m.theta.copy_(theta)
        m.bias.copy_(ym - xm @ theta)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.theta.to(x.dtype) + self.bias.to(x.dtype)


class MLPReward(nn.Module):
    """A small SiLU MLP ``f̂(x) = μ_y + s_y·net((x − μ_x)/s_x)`` (inputs and labels standardised
    with the training statistics, which are stored as buffers)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        if min(dim, hidden, depth) < 1:
            raise ValueError(f"dim, hidden, depth must be >= 1, got {dim}, {hidden}, {depth}")
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("x_mean", torch.zeros(dim))
        self.register_buffer("x_std", torch.ones(dim))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    @classmethod
    def fit(cls, x: Tensor, y: Tensor, *, hidden: int = 128, depth: int = 2, steps: int = 2000,
            batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
            seed: int = 0) -> MLPReward:
        """AdamW on the mean squared error of standardised labels, ``steps`` minibatches drawn
        with replacement; initialisation and batches come from ``seed``."""
        X = x.flatten(1).float()
        y = y.float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sub_seed(seed, "mlp-init"))
            m = cls(X.shape[1], hidden, depth)
        m.x_mean.copy_(X.mean(0))
        m.x_std.copy_(X.std(0).clamp(min=1e-6) if len(X) > 1 else torch.ones(X.shape[1]))
        m.y_mean.copy_(y.mean())
        m.y_std.copy_(y.std().clamp(min=1e-6) if len(y) > 1 else torch.ones(()))
        g = _generator(seed, "mlp-batches")
        opt = torch.optim.AdamW(m.net.parameters(), lr=lr, weight_decay=weight_decay)
        xs, ys = (X - m.x_mean) / m.x_std, (y - m.y_mean) / m.y_std
        bs = min(batch_size, len(X))
        for _ in range(steps):
            idx = torch.randint(len(X), (bs,), generator=g)
            loss = torch.nn.functional.mse_loss(m.net(xs[idx])[:, 0], ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return m.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = (x.flatten(1) - self.x_mean.to(x.dtype)) / self.x_std.to(x.dtype)
        return self.y_mean.to(x.dtype) + self.y_std.to(x.dtype) * self.net.to(x.dtype)(h)[:, 0]


class EnsembleReward(nn.Module):
    """Mean of member rewards ``f̂(x) = (1/M) Σ_m f̂_m(x)``; :meth:`members` gives all (M, B)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.models = nn.ModuleList(members)

    def members(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.models])

    def forward(self, x: Tensor) -> Tensor:
        return self.members(x).mean(0)


REWARD_KINDS = ("ridge", "mlp")


def fit_reward(x: Tensor, y: Tensor, *, kind: str = "ridge", ensemble: int = 1,
               alpha: float = 1.0, seed: int = 0, **mlp_kwargs: Any) -> nn.Module:
    """Step 1: fit a reward model on labeled pairs ``(x, y)``.

    ``kind="ridge"`` (:class:`RidgeReward`, penalty ``alpha``) or ``"mlp"`` (:class:`MLPReward`,
    ``mlp_kwargs``: hidden, depth, steps, batch_size, lr, weight_decay). With ``ensemble = M > 1``
    each member is fitted on a bootstrap resample (and, for MLPs, its own initialisation) and the
    prediction is the members' mean (:class:`EnsembleReward`).
    """
    x = _as_2d(x, "x")
    y = _as_labels(y, len(x), "y")
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind={kind!r}; choose one of {', '.join(REWARD_KINDS)}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be a positive int, got ensemble={ensemble!r}")
    if kind == "ridge" and mlp_kwargs:
        raise ValueError(f"kind='ridge' takes alpha only; got {sorted(mlp_kwargs)}")

    def one(xs: Tensor, ys: Tensor, m: int) -> nn.Module:
        if kind == "ridge":
            return RidgeReward.fit(xs, ys, alpha)
        return MLPReward.fit(xs, ys, seed=_sub_seed(seed, f"member{m}"), **mlp_kwargs)

    if ensemble == 1:
        return one(x, y, 0)
    members = []
    for m in range(ensemble):
        idx = torch.randint(len(x), (len(x),), generator=_generator(seed, f"bootstrap{m}"))
        members.append(one(x[idx], y[idx], m))
    return EnsembleReward(members)


@torch.no_grad()
def pseudo_label(reward: Callable[[Tensor], Tensor], x: Tensor, *, noise_std: float = 0.0,
                 generator: torch.Generator | None = None, chunk_size: int = 8192) -> Tensor:
    """Step 2: ``ŷ = f̂(x) + ξ``, ``ξ ~ N(0, noise_std²)`` (noise keeps p(x | ŷ) non-degenerate),
    evaluated in chunks; float32 (N,)."""
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    out = torch.cat([torch.as_tensor(reward(x[i:i + chunk_size])).reshape(-1).float()
                     for i in range(0, len(x), chunk_size)])
    if out.shape != (len(x),) or not torch.isfinite(out).all():
        raise FloatingPointError(f"the reward model returned {tuple(out.shape)} values with "
                                 f"non-finite entries or a wrong shape for {len(x)} inputs")
    if noise_std > 0:
        out = out + noise_std * torch.randn(len(x), generator=generator)
    return out


def ddom_weights(y: Tensor, *, bins: int = 20, quantile: float = 0.9, clip: float = 5.0) -> Tensor:
    """DDOM's reweighting toward high y (``design_baselines/diff/util.py::get_weights``, exactly):

    histogram y into ``bins`` equal bins with frequencies ``h_b``; temperature
    ``τ = max(|quantile_q(y − y_max)|, 10⁻³)``; bin probabilities
    ``p_b ∝ softmax_b(e_b/τ)·h_b/(h_b + 10⁻³)`` (``e_b`` the bin's upper edge), normalised by
    ``Σp + 10⁻⁷``; per-sample weight ``p_b/(h_b + 10⁻⁷)`` clipped to ``[0, clip]``. float32 (N,).
    """
    s = np.asarray(torch.as_tensor(y, dtype=torch.float64).reshape(-1))
    if len(s) == 0 or not np.isfinite(s).all():
        raise ValueError("y must be a non-empty finite vector")
    hist, edges = np.histogram(s, bins=bins)
    hist = hist / hist.sum()
    tau = max(abs(float(np.quantile(s - s.max(), q=quantile))), 1e-3)
    z = edges[1:] - edges[1:].max()
    soft = np.exp(z / tau) / np.exp(z / tau).sum()
    dist = soft * (hist / (hist + 1e-3))
    dist = dist / (dist.sum() + 1e-7)
    b = np.minimum(np.digitize(s, edges[1:]), bins - 1)
    w = np.clip(dist[b] / (hist[b] + 1e-7), 0.0, clip)
    return torch.from_numpy(w.astype(np.float32))


# ------------------------------------------------------------------------------- guidance

class RewardGuidance:
    """Reward-model gradient as guidance on an unconditional model (classifier guidance).

    With ``x̂0 = x − σ·eps(x, σ)`` (Tweedie) the score correction is
    ``G = −s·∇ₓ ½(a − f̂(x̂0))²`` (a Gaussian likelihood ``N(a; f̂, 1/s)``, the RCGDM image code's
    ``noise_pred += √(1−ᾱ)·guidance·∇½‖a − μ(x_t)‖²`` in VE form), or ``G = s·∇ₓ f̂(x̂0)`` when
    ``target`` is None (pure ascent); the guided ε is ``eps − σ·G`` (DESIGN.md §1). With
    ``grad_through_model=False`` (default) x̂0 is treated as constant in x, so ∇ₓ is the gradient
    of f̂ at x̂0 (no backward pass through the network); ``True`` differentiates through it.
    ``clip``: the per-sample norm of ``σ²·G`` (the move of x̂0) is capped at ``clip`` when given
    (at large σ, x̂0 is poor and σ² large, so an unclipped G can throw samples far off).
    ``base``: a guidance that gives the ε to correct (e.g. ``ClassifierFree(w)`` on a
    reward-conditioned model, combining both guidances); default the plain model call.
    """

    def __init__(self, reward: Callable[[Tensor], Tensor], target: float | None = None, *,
                 scale: float = 1.0, grad_through_model: bool = False, clip: float | None = None,
                 base: Callable[..., Tensor] | None = None):
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be finite and >= 0, got scale={scale}")
        if target is not None and not math.isfinite(target):
            raise ValueError(f"target must be finite, got target={target}")
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be positive or None, got clip={clip}")
        self.reward, self.target, self.scale = reward, target, float(scale)
        self.grad_through_model, self.clip, self.base = grad_through_model, clip, base

    def __call__(self, model: Callable[..., Tensor], x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        sig = sigma_like(sigma, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(self.grad_through_model)
            eps = model(xg, sigma, cond) if self.base is None else self.base(model, xg, sigma, cond)
            x0 = xg - sig * eps
            if not self.grad_through_model:
                x0 = x0.detach().requires_grad_(True)
            f = self.reward(x0).reshape(-1)
            obj = f if self.target is None else -0.5 * (self.target - f) ** 2
            grad, = torch.autograd.grad(obj.sum(), xg if self.grad_through_model else x0)
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"the reward gradient is not finite at sigma="
                                     f"{float(torch.as_tensor(sigma).max()):.4g}")
        G = self.scale * grad
        if self.clip is not None:
            move = (sig**2 * G).flatten(1).norm(dim=1).clamp(min=1e-12)
            G = G * (self.clip / move).clamp(max=1.0).view(-1, *([1] * (x.ndim - 1)))
        return (eps - sig * G).detach()


def _cfg(w: float):
    """Classifier-free guidance from ``optidiff.guidance`` (``eps_u + w·(eps_c − eps_u)``) with the
    NaN null condition of :class:`~optidiff.models.conditional.ConditionalMLP`."""
    from ..guidance import ClassifierFree
    return ClassifierFree(w, null_cond=math.nan)


# ---------------------------------------------------------------------------------- results

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
    """DDOM's VP-SDE noise levels as a σ table (``research/offline_mbo.md`` §2.1; the configs use
    β_min = 0.01, β_max = 2, T = 1): with linear ``β(t)``, ``ᾱ(t) = exp(−β_min·t − ½(β_max −
    β_min)·t²)`` and ``σ(t) = √(1/ᾱ(t) − 1)`` (DESIGN.md §1) at ``n`` times uniform in
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
    weights (None when not reweighted); ``samples``: generated at ``target`` (None if no target
    was given); ``train``: the training result; ``timings``: seconds per phase.
    """

    method: str
    model: nn.Module
    reward_model: nn.Module | None
    labels: Tensor
    y_mean: float
    y_std: float
    sigmas: Tensor
    sampler: str
    cfg_weight: float
    guidance_scale: float
    train: TrainResult
    weights: Tensor | None = None
    prior: str = "ve"
    guidance_target: float | str | None = None
    guidance_clip: float | None = None
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

    def generate(self, target: float | str, n: int, *, seed: int = 0,
                 cfg_weight: float | None = None, guidance_scale: float | None = None,
                 guidance_target: float | str | None = None,
                 guidance_clip: float | None = None, chunk_size: int | None = None) -> Tensor:
        """``n`` samples at target reward ``target`` (raw units; see :meth:`resolve_target`).

        Reward-conditioned models sample ``p̂(x | y = a)``, with classifier-free guidance when
        ``cfg_weight ≠ 1``. A positive ``guidance_scale`` adds :class:`RewardGuidance` of the
        reward model (classifier guidance; for a reward-conditioned model on top of CFG) toward
        ``guidance_target`` (default ``target``; ``"ascent"``: plain ascent ``G = s·∇f̂``), its move
        capped at ``guidance_clip``. Defaults come from the fitted result.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got n={n!r}")
        a = self.resolve_target(target)
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        clip = self.guidance_clip if guidance_clip is None else guidance_clip
        gt = self.guidance_target if guidance_target is None else guidance_target
        gt = a if gt is None else (None if gt == "ascent" else self.resolve_target(gt))
        if s > 0 and self.reward_model is None:
            raise ValueError("guidance_scale > 0 needs a reward model (fit one with reward='mlp' "
                             "or 'ridge')")
        g = _generator(seed, "sample")
        model = self.model
        x_init = _prior(self.prior, self.sigmas[0], (n, *model.input_shape), g)
        if self.method == "classifier_guidance":
            return sample(model, self.sigmas, x_init=x_init, sampler=self.sampler,
                          guidance=RewardGuidance(self.reward_model, gt, scale=s, clip=clip),
                          generator=g)
        w = self.cfg_weight if cfg_weight is None else cfg_weight
        cond = torch.full((n,), (a - self.y_mean) / self.y_std)
        guidance = None if w == 1.0 else _cfg(w)
        if s > 0:
            guidance = RewardGuidance(self.reward_model, gt, scale=s, clip=clip, base=guidance)
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


def _check_common(cond_drop: float, cfg_weight: float, sampler: str, sample_steps: int,
                  n_samples: int, prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"unknown prior={prior!r}; choose one of {', '.join(PRIORS)}")
    if not 0 <= cond_drop < 1:
        raise ValueError(f"cond_drop must be in [0, 1), got cond_drop={cond_drop}")
    if not math.isfinite(cfg_weight):
        raise ValueError(f"cfg_weight must be finite, got cfg_weight={cfg_weight}")
    if cfg_weight != 1.0 and cond_drop == 0:
        raise ValueError(f"cfg_weight={cfg_weight} needs an unconditional model: set cond_drop > 0")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    for name, v in (("sample_steps", sample_steps), ("n_samples", n_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_sub_seed(seed, "model-init"))
        return cls(x[0].numel(), **kw)


def _generate_now(out: OfflineResult, target: float | str | None, n_samples: int,
                  seed: int) -> OfflineResult:
    """``out`` with ``n_samples`` generated at ``target`` (timed), if a target is given."""
    if target is not None:
        t0 = time.perf_counter()
        out.target = out.resolve_target(target)
        out.samples = out.generate(out.target, n_samples, seed=seed)
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
                       target: float | str | None = None, cfg_weight: float = 1.0,
                       guidance_scale: float = 0.0,
                       guidance_target: float | str | None = None,
                       guidance_clip: float | None = None,
                       n_samples: int = 128, sample_steps: int = 100, sampler: str = "ddpm",
                       prior: str = "ve", seed: int = 0,
                       run_dir: str | os.PathLike | None = None,
                       progress: bool = False) -> OfflineResult:
    """Reward-directed conditional diffusion (seed 002's meta algorithm; DDOM as options).

    Args:
        data: unlabeled designs ``(N, *dims)`` (or None: labeled data only).
        x_labeled, y_labeled: the labeled pairs.
        reward: ``"ridge"`` / ``"mlp"`` (fitted on the labeled pairs by :func:`fit_reward` with
            ``ensemble`` and ``reward_kwargs``), a fitted callable ``f̂(x) -> (B,)``, or None: train
            on the observed labels of ``(x_labeled, y_labeled)`` only (DDOM; ``data`` must be None).
        relabel_labeled: condition the labeled points on ``f̂`` too (default), not on their observed
            labels: with noisy labels the observed ``y`` dilutes the condition (regression to the
            mean: samples at ``y = a`` have true reward nearer the data mean).
        pseudo_label_noise: std of Gaussian noise added to pseudo-labels.
        reweight: DDOM's reweighting (:func:`ddom_weights` of the training conditions, with
            ``reweight_kwargs``), applied by importance resampling: the training rows are
            redrawn ``N`` times with replacement with probability ∝ weight (in expectation the
            weighted DSM loss ``Σ w_i·ℓ_i/Σ w_i`` of DDOM's ``dsm_weighted``).
        cond_drop: condition dropout probability (null condition: a NaN row, mapped to the
            model's learned null embedding). DDOM: 0.15.
        model: a conditional ε-model taking a float ``cond`` of shape ``(B,)`` with NaN as the null
            condition (default :class:`~optidiff.models.conditional.ConditionalMLP` with
            ``model_kwargs`` and ``sigma_data`` = the data's overall standard deviation).
        schedule: training σ table (default log-linear 0.01 … 20, 1000 levels); sampling uses
            ``schedule.sample_sigmas(sample_steps, final_zero=True)``.
        steps, batch_size, lr, weight_decay, ema_decay, grad_clip: :func:`optidiff.train`.
        target: generate ``n_samples`` at this reward right away (a number, ``"max"`` = the data
            maximum of the conditions as in DDOM, or ``"qXX"``); None: call
            ``result.generate`` later.
        cfg_weight: classifier-free guidance weight w (1 = plain conditional sampling, the seed's
            method; DDOM's γ = 2 is w = 3).
        guidance_scale, guidance_target, guidance_clip: optional reward-gradient guidance on top
            (see :meth:`OfflineResult.generate`); needs a reward model (with observed labels:
            ``reward="mlp", relabel_labeled=False``).
        sampler: any :func:`optidiff.sample` sampler name.
        prior: the initial state at σ_N, ``"ve"`` (``σ_N·w``) or ``"vp"`` (``√(1+σ_N²)·w``, DDOM's
            VP prior; matters when σ_N is small, e.g. with :func:`ddom_schedule`).
        seed: every random draw (reward fit, pseudo-label noise, resampling, training, sampling)
            derives from it.

    Conditions are z-scored with the mean and std of the training conditions before they reach
    the network; targets are given in raw reward units.
    """
    _check_common(cond_drop, cfg_weight, sampler, sample_steps, n_samples, prior)
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
    t1 = time.perf_counter()
    res = train(model, x_train.float(), steps=steps, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, schedule=sched, ema_decay=ema_decay,
                grad_clip=grad_clip, seed=_sub_seed(seed, "train") % (2**31),
                cond=((y_train - y_mean) / y_std).float(), cond_drop=cond_drop, run_dir=run_dir,
                progress=progress)
    t_train = time.perf_counter() - t1
    out = OfflineResult(method="reward_conditioned", model=res.ema.eval(), reward_model=f,
                        labels=y, y_mean=y_mean, y_std=y_std,
                        sigmas=sched.sample_sigmas(sample_steps, final_zero=True),
                        sampler=sampler, cfg_weight=float(cfg_weight),
                        guidance_scale=float(guidance_scale), guidance_target=guidance_target,
                        guidance_clip=guidance_clip, train=res, weights=weights, prior=prior,
                        timings={"reward_s": t_reward, "train_s": t_train})
    return _generate_now(out, target, n_samples, seed)


def reward_guided(data: Tensor | None, x_labeled: Tensor | None = None,
                  y_labeled: Tensor | None = None, *,
                  reward: str | Callable[[Tensor], Tensor] = "ridge", ensemble: int = 1,
                  reward_kwargs: dict[str, Any] | None = None, guidance_scale: float = 1.0,
                  guidance_target: float | str | None = None,
                  guidance_clip: float | None = None, model: nn.Module | None = None,
                  model_kwargs: dict[str, Any] | None = None,
                  schedule: Schedule | None = None, steps: int = 4000, batch_size: int = 256,
                  lr: float = 1e-3, weight_decay: float = 0.0, ema_decay: float = 0.999,
                  grad_clip: float | None = 1.0, target: float | str | None = None,
                  n_samples: int = 128, sample_steps: int = 100, sampler: str = "ddpm",
                  prior: str = "ve", seed: int = 0, run_dir: str | os.PathLike | None = None,
                  progress: bool = False) -> OfflineResult:
    """The classifier-guidance variant: an unconditional model trained on all designs
    (``data`` and ``x_labeled``) plus :class:`RewardGuidance` of the fitted reward ``f̂`` toward the
    target ``a`` with strength ``guidance_scale`` (RCGDM's image code). Arguments as in
    :func:`reward_conditioned`; ``"max"``/``"qXX"`` targets refer to ``f̂`` on the training designs.
    """
    _check_common(0.0, 1.0, sampler, sample_steps, n_samples, prior)
    if reward is None:
        raise ValueError("classifier guidance needs a reward model (reward='ridge', 'mlp' or a "
                         "callable)")
    t0 = time.perf_counter()
    x, y, f = _training_set(data, x_labeled, y_labeled, reward, ensemble, reward_kwargs, True,
                            0.0, seed)
    t_reward = time.perf_counter() - t0
    model = _init_model(model, model_kwargs, TimeMLP, x, seed, hidden=256)
    sched = _default_schedule(schedule)
    t1 = time.perf_counter()
    res = train(model, x.float(), steps=steps, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, schedule=sched, ema_decay=ema_decay,
                grad_clip=grad_clip, seed=_sub_seed(seed, "train") % (2**31), run_dir=run_dir,
                progress=progress)
    t_train = time.perf_counter() - t1
    out = OfflineResult(method="classifier_guidance", model=res.ema.eval(), reward_model=f,
                        labels=y, y_mean=0.0, y_std=1.0,
                        sigmas=sched.sample_sigmas(sample_steps, final_zero=True),
                        sampler=sampler, cfg_weight=1.0, guidance_scale=float(guidance_scale),
                        guidance_target=guidance_target, guidance_clip=guidance_clip,
                        train=res, prior=prior,
                        timings={"reward_s": t_reward, "train_s": t_train})
    return _generate_now(out, target, n_samples, seed)


def gradient_ascent(reward: Callable[[Tensor], Tensor], x_init: Tensor, *, steps: int = 200,
                    lr: float = 0.01, scale_lr: bool = True, x_std: Tensor | float = 1.0,
                    y_std: float = 1.0) -> Tensor:
    """Gradient ascent on a learned reward (Design-Bench's "Grad." baseline,
    ``design_baselines/gradient_ascent``), run in z-scored coordinates as Design-Bench does:
    with ``x = μ_x + s_x·u`` and ``f̂_u = f̂/s_y``, ``u ← u + η·∇_u f̂_u(u)``, i.e.
    ``x ← x + η·s_x²·∇ₓ f̂(x)/s_y``, for ``steps`` steps from ``x_init`` (e.g. the top designs of the
    data), with ``η = lr·√dim`` when ``scale_lr`` (Design-Bench scales the step by the square root
    of the design dimension). ``x_std`` (a number or per-coordinate (*dims) tensor) and ``y_std``
    are the data's standard deviations (1: no scaling)."""
    x = _as_2d(x_init, "x_init").detach().clone()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got steps={steps!r}")
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(y_std) and y_std > 0):
        raise ValueError(f"lr and y_std must be positive, got lr={lr}, y_std={y_std}")
    eta = lr * math.sqrt(x[0].numel()) if scale_lr else lr
    precond = eta * torch.as_tensor(x_std, dtype=x.dtype) ** 2 / y_std
    for _ in range(steps):
        with torch.enable_grad():
            xg = x.requires_grad_(True)
            grad, = torch.autograd.grad(reward(xg).sum(), xg)
        if not torch.isfinite(grad).all():
            raise FloatingPointError("the reward gradient is not finite during gradient ascent")
        x = (x + precond * grad).detach()
    return x


# ------------------------------------------------------------------------------------ metrics

def subopt(target: float, true_rewards: Tensor) -> float:
    """Seed 002: ``SubOpt(a) = a − mean f*(generated)``."""
    return float(target) - float(torch.as_tensor(true_rewards, dtype=torch.float64).mean())


def off_support_distance(x: Tensor, A: Tensor) -> Tensor:
    """Distance of each sample to the subspace span(A): ``‖(I − AAᵀ)x‖`` (A orthonormal (D, d));
    float64 (B,)."""
    x = x.flatten(1).to(torch.float64)
    A = torch.as_tensor(A, dtype=torch.float64)
    return (x - (x @ A) @ A.T).norm(dim=1)


# ------------------------------------------------------------------- synthetic linear problem

@dataclass
class LinearSubspaceProblem:
    """Seed 002's simulation (Yuan et al. 2023, Li et al. 2024 §7): ``x = A·u``, ``u ~ N(0, I_d)``,
    ``A`` the first ``d`` columns of a seeded Haar-random orthogonal ``D×D`` matrix; reward
    ``f*(x) = θᵀx`` with unit ``θ = cos(φ)·Aβ + sin(φ)·θ⊥`` (``φ = 0``: θ in the subspace, so
    ``f*`` ~ N(0, 1) on the data); labels ``y = f*(x) + N(0, noise²)``."""

    A: Tensor
    theta: Tensor
    unlabeled: Tensor
    x_labeled: Tensor
    y_labeled: Tensor
    noise: float

    def reward(self, x: Tensor) -> Tensor:
        return x.flatten(1).to(self.theta.dtype) @ self.theta

    def off_support(self, x: Tensor) -> Tensor:
        return off_support_distance(x, self.A)


def linear_subspace_problem(D: int = 64, d: int = 16, n_unlabeled: int = 65_536,
                            n_labeled: int = 8_192, noise: float = 0.5, off_angle: float = 0.0,
                            seed: int = 0, label_seed: int | None = None
                            ) -> LinearSubspaceProblem:
    """Build a :class:`LinearSubspaceProblem`. The basis, θ and the unlabeled pool depend on
    ``seed`` only; the labeled points and their noise on ``label_seed`` (default ``seed``), so label
    budgets can be compared on the same pool. float32 data, float64 basis."""
    if not 1 <= d <= D:
        raise ValueError(f"need 1 <= d <= D, got d={d}, D={D}")
    g = _generator(seed, "subspace")
    q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar (Mezzadri 2007)
    A = q[:, :d]
    beta = torch.randn(d, generator=g, dtype=torch.float64)
    theta_par = A @ (beta / beta.norm())
    if off_angle != 0.0:
        if d == D:
            raise ValueError("off_angle needs d < D")
        perp = q[:, d:] @ torch.randn(D - d, generator=g, dtype=torch.float64)
        theta = math.cos(off_angle) * theta_par + math.sin(off_angle) * perp / perp.norm()
    else:
        theta = theta_par
    unl = (torch.randn(n_unlabeled, d, generator=g, dtype=torch.float64) @ A.T).float()
    gl = _generator(seed if label_seed is None else label_seed, "labels")
    xl = (torch.randn(n_labeled, d, generator=gl, dtype=torch.float64) @ A.T).float()
    yl = (xl.double() @ theta + noise * torch.randn(n_labeled, generator=gl,
                                                     dtype=torch.float64)).float()
    return LinearSubspaceProblem(A=A, theta=theta, unlabeled=unl, x_labeled=xl, y_labeled=yl,
                                 noise=noise)


# ------------------------------------------------------------------------ configured runs



class OfflineConfigError(ConfigError):
    """An offline-run configuration that cannot be read or does not validate."""


class TaskSection(_Section):
    """``[task]``: ``subspace`` (seed 002's linear simulation, :func:`linear_subspace_problem`)
    or ``tfbind8`` (:mod:`optidiff.tasks.tfbind8`; every visible point is labeled)."""

    name: Literal["subspace", "tfbind8"] = "subspace"
    D: int = Field(64, ge=1)
    d: int = Field(16, ge=1)
    n_unlabeled: int = Field(65_536, ge=0)
    n_labeled: int = Field(1_024, ge=2)
    noise: float = Field(0.5, ge=0, allow_inf_nan=False)
    off_angle: float = Field(0.0, allow_inf_nan=False)
    seed: int = 0
    label_seed: int | None = None
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TaskSection:
        if self.d > self.D:
            raise ValueError(f"d={self.d} must be <= D={self.D}")
        return self


class RewardSection(_Section):
    """``[reward]``: the reward model of step 1 (``none``: observed labels only, DDOM)."""

    kind: Literal["ridge", "mlp", "none"] = "ridge"
    ensemble: int = Field(1, ge=1)
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False)
    hidden: int = Field(128, ge=1)
    depth: int = Field(2, ge=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)

    def kwargs(self) -> dict[str, Any]:
        if self.kind == "ridge":
            return {"alpha": self.alpha}
        return {k: getattr(self, k) for k in ("hidden", "depth", "steps", "batch_size", "lr",
                                              "weight_decay")}


class MethodSection(_Section):
    """``[method]``: ``reward_conditioned`` (seed 002 / DDOM), ``classifier_guidance`` (RCGDM's
    image-code variant) or ``gradient_ascent`` (Design-Bench's Grad. baseline)."""

    name: Literal["reward_conditioned", "classifier_guidance", "gradient_ascent"] = \
        "reward_conditioned"
    relabel_labeled: bool = True
    pseudo_label_noise: float = Field(0.0, ge=0, allow_inf_nan=False)
    reweight: bool = False
    reweight_bins: int = Field(20, ge=1)
    reweight_quantile: float = Field(0.9, ge=0, le=1)
    reweight_clip: float = Field(5.0, gt=0, allow_inf_nan=False)
    cond_drop: float = Field(0.15, ge=0, lt=1)
    ascent_steps: int = Field(200, ge=0)
    ascent_lr: float = Field(0.01, gt=0, allow_inf_nan=False)


class ModelSection(_Section):
    """``[model]``: :class:`~optidiff.models.conditional.ConditionalMLP` (or ``TimeMLP`` for the
    unconditional model of classifier guidance)."""

    hidden: int = Field(256, ge=1)
    depth: int = Field(3, ge=1)
    emb_dim: int = Field(64, ge=2, multiple_of=2)
    cond_emb_dim: int = Field(64, ge=1)


class ScheduleSection(_Section):
    """``[schedule]``: ``loglinear`` (σ_min … σ_max, n levels) or ``ddom``
    (:func:`ddom_schedule`)."""

    kind: Literal["loglinear", "ddom"] = "loglinear"
    sigma_min: float = Field(0.01, gt=0, allow_inf_nan=False)
    sigma_max: float = Field(20.0, gt=0, allow_inf_nan=False)
    n: int = Field(1000, ge=2)

    def build(self) -> Schedule:
        if self.kind == "ddom":
            return ddom_schedule(n=self.n)
        return LogLinearSchedule(self.sigma_min, self.sigma_max, self.n)

    @model_validator(mode="after")
    def _check(self) -> ScheduleSection:
        if self.kind == "loglinear" and not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} must be < sigma_max={self.sigma_max}")
        return self


class TrainSection(_Section):
    """``[train]``: :func:`optidiff.train` arguments for the diffusion model."""

    steps: int = Field(4000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    seed: int = 0


Target = float | str


class SampleSection(_Section):
    """``[sample]``: targets (numbers, ``"max"`` or ``"qXX"``) and sampler settings; one batch of
    ``n`` per target and per seed in ``seeds``."""

    targets: list[Target] = Field(default_factory=lambda: ["max"], min_length=1)
    n: int = Field(128, ge=1)
    steps: int = Field(100, ge=1)
    sampler: choice(SAMPLERS, "sampler") = "ddpm"
    prior: Literal["ve", "vp"] = "ve"
    cfg_weight: float = Field(1.0, allow_inf_nan=False)
    guidance_scale: float = Field(0.0, ge=0, allow_inf_nan=False)
    guidance_target: Target | None = None
    guidance_clip: float | None = Field(None, gt=0, allow_inf_nan=False)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> SampleSection:
        for t in [*self.targets, self.guidance_target]:
            if isinstance(t, str) and t not in ("max", "ascent") and not (
                    t.startswith("q") and t[1:].replace(".", "", 1).isdigit()
                    and 0 <= float(t[1:]) <= 100):
                raise ValueError(f"target {t!r} must be a number, 'max' or 'qXX'")
        if "ascent" in self.targets:
            raise ValueError("'ascent' is only a guidance_target")
        return self


class OfflineConfig(_Section):
    """A whole offline reward-maximization run (``optidiff optimize CONFIG``)."""

    name: RunName = "offline"
    task: TaskSection = Field(default_factory=TaskSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    method: MethodSection = Field(default_factory=MethodSection)
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    sample: SampleSection = Field(default_factory=SampleSection)

    @model_validator(mode="after")
    def _check(self) -> OfflineConfig:
        m, r = self.method.name, self.reward.kind
        if m in ("classifier_guidance", "gradient_ascent") and r == "none":
            raise ValueError(f"method {m!r} needs a reward model: reward.kind 'ridge' or 'mlp'")
        if m == "reward_conditioned" and r == "none" and self.task.name == "subspace" \
                and self.task.n_unlabeled > 0:
            raise ValueError("reward.kind='none' trains on observed labels only; set "
                             "task.n_unlabeled = 0 or choose a reward model to pseudo-label")
        if self.sample.guidance_scale > 0 and r == "none":
            raise ValueError("sample.guidance_scale > 0 needs a reward model (reward.kind)")
        if self.sample.cfg_weight != 1.0 and self.method.cond_drop == 0:
            raise ValueError("sample.cfg_weight != 1 needs method.cond_drop > 0")
        return self


def load_offline_config(config: dict[str, Any] | str | os.PathLike | OfflineConfig
                        ) -> OfflineConfig:
    """Validate a mapping, a TOML file path or an :class:`OfflineConfig`; every problem becomes one
    :class:`OfflineConfigError` naming the source and the field path."""
    if isinstance(config, OfflineConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return validate(OfflineConfig, read_toml(config, OfflineConfigError), str(config),
                        OfflineConfigError)
    return validate(OfflineConfig, config, error=OfflineConfigError)


def _problem(cfg: OfflineConfig) -> dict[str, Any]:
    """Data, objective and metrics of the configured task (the tasks package is imported here,
    lazily: ``optimize`` sits below ``tasks`` in DESIGN.md §2)."""
    t = cfg.task
    if t.name == "subspace":
        p = linear_subspace_problem(t.D, t.d, t.n_unlabeled, t.n_labeled, t.noise, t.off_angle,
                                    t.seed, t.label_seed)

        def metrics(x: Tensor, target: float | None) -> dict[str, float]:
            f = p.reward(x)
            out = {"reward_mean": float(f.mean()), "reward_std": float(f.std()),
                   "reward_max": float(f.max()),
                   "off_support": float(p.off_support(x).mean())}
            if target is not None:
                out["subopt"] = subopt(target, f)
            return out

        return {"data": p.unlabeled if t.n_unlabeled > 0 else None, "x_labeled": p.x_labeled,
                "y_labeled": p.y_labeled, "metrics": metrics, "decode": None,
                "x_std": p.x_labeled.std(0)}
    from ..tasks import tfbind8 as tf8  # lazy (see the docstring)
    task = tf8.load(t.cache_dir)
    x = task.logits()
    visible = set(tf8.index_of(task.x).tolist())

    def metrics(z: Tensor, target: float | None) -> dict[str, float]:
        seqs = tf8.to_integers(z)
        score = task.normalize(task.oracle(seqs))
        idx = tf8.index_of(seqs).tolist()
        return {**tf8.normalized_percentiles(score), "score_mean": float(score.mean()),
                "novel": sum(i not in visible for i in idx) / len(idx),
                "unique": len(set(idx)) / len(idx)}

    return {"data": None, "x_labeled": x, "y_labeled": task.y.float(), "metrics": metrics,
            "decode": lambda z: tf8.to_integers(z), "x_std": x.std(0)}


def run_offline(config: dict[str, Any] | str | os.PathLike | OfflineConfig,
                run_dir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    """Run a configured offline experiment and write it to ``run_dir``.

    Writes ``config.json`` (the validated configuration), ``metrics.jsonl`` (one record per target
    and sampling seed: the target, the task's metrics, seconds), ``samples/<target>_seed<k>/``
    (safetensors checkpoints of the samples) and ``summary.json`` (timings and the records).
    Returns the summary. Raises :class:`OfflineConfigError` before any work for a bad config.
    """
    from ..checkpoint import save_checkpoint

    cfg = load_offline_config(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
    t0 = time.perf_counter()
    prob = _problem(cfg)
    t_data = time.perf_counter() - t0
    m, s, r = cfg.method, cfg.sample, cfg.reward
    reward = None if r.kind == "none" else r.kind
    common = {"ensemble": r.ensemble, "reward_kwargs": r.kwargs(), "schedule": cfg.schedule.build(),
                  "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                  "weight_decay": cfg.train.weight_decay, "ema_decay": cfg.train.ema_decay,
                  "grad_clip": cfg.train.grad_clip, "sample_steps": s.steps, "sampler": s.sampler,
                  "prior": s.prior, "seed": cfg.train.seed, "progress": progress,
                  "model_kwargs": cfg.model.model_dump(), "guidance_target": s.guidance_target,
                  "guidance_clip": s.guidance_clip}
    records: list[dict[str, Any]] = []
    timings: dict[str, float] = {"data_s": t_data}

    def record(name: str, target: float | None, seed: int, x: Tensor, seconds: float) -> None:
        rec = {"target": name, "target_value": target, "seed": seed, "seconds": seconds,
               **prob["metrics"](x, target)}
        records.append(rec)
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        tensors = {"samples": x.detach().cpu().contiguous()}
        if prob["decode"] is not None:
            tensors["sequences"] = prob["decode"](x).contiguous()
        save_checkpoint(run_dir / "samples" / f"{name}_seed{seed}", tensors,
                        {"kind": "samples", "target": name, "target_value": target, "seed": seed})

    (run_dir / "metrics.jsonl").write_text("")
    if m.name == "gradient_ascent":
        t1 = time.perf_counter()
        xl, yl = prob["x_labeled"], prob["y_labeled"]
        f = fit_reward(xl, yl, kind=r.kind, ensemble=r.ensemble, seed=cfg.train.seed,
                       **r.kwargs())
        timings["reward_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        top = xl[yl.argsort(descending=True)[:s.n]]
        x = gradient_ascent(f, top, steps=m.ascent_steps, lr=m.ascent_lr, x_std=prob["x_std"],
                            y_std=float(yl.std()))
        record("ascent", None, 0, x, time.perf_counter() - t2)
    else:
        if m.name == "reward_conditioned":
            res = reward_conditioned(
                prob["data"], prob["x_labeled"], prob["y_labeled"], reward=reward,
                relabel_labeled=m.relabel_labeled, pseudo_label_noise=m.pseudo_label_noise,
                reweight=m.reweight, reweight_kwargs={"bins": m.reweight_bins,
                                                      "quantile": m.reweight_quantile,
                                                      "clip": m.reweight_clip},
                cond_drop=m.cond_drop, cfg_weight=s.cfg_weight,
                guidance_scale=s.guidance_scale, run_dir=run_dir / "train", **common)
        else:
            common["model_kwargs"] = {k: v for k, v in common["model_kwargs"].items()
                                      if k != "cond_emb_dim"}
            res = reward_guided(prob["data"], prob["x_labeled"], prob["y_labeled"],
                                reward=reward, guidance_scale=s.guidance_scale,
                                run_dir=run_dir / "train", **common)
        timings.update(res.timings)
        for target in s.targets:
            a = res.resolve_target(target)
            for seed in s.seeds:
                t2 = time.perf_counter()
                x = res.generate(a, s.n, seed=seed)
                record(str(target), a, seed, x, time.perf_counter() - t2)
    timings["total_s"] = time.perf_counter() - t0
    summary = {"name": cfg.name, "task": cfg.task.name, "method": m.name, "timings": timings,
               "records": records}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "summary.json")
    return summary
