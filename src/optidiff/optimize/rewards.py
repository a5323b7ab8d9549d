"""Reward models of offline reward maximization, and the data weighting of DDOM.

Step 1 of reward-directed conditional diffusion (Yuan et al., NeurIPS 2023; the Wang & Chen
tutorial's offline reward maximization) fits a reward model ``f̂`` on labeled pairs; step 2
pseudo-labels unlabeled designs with it:

- :class:`RidgeReward` (ridge regression on centred data), :class:`MLPReward` (a small network on
  standardised data), :class:`EnsembleReward` (bootstrap members, mean prediction), built by
  :func:`fit_reward`;
- :func:`pseudo_label`: ``ŷ = f̂(x) (+ noise)``;
- :func:`gradient_ascent`: gradient ascent on a reward model (Design-Bench's "Grad." baseline);
- :func:`ddom_weights`: DDOM's reweighting of the training data toward high y (Krishnamoorthy,
  Mashkaria & Grover, ICML 2023).

Every random draw derives from a seed (:func:`offline_seed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import rng

__all__ = ["REWARD_KINDS", "EnsembleReward", "MLPReward", "RidgeReward", "ddom_weights",
           "fit_reward", "gradient_ascent", "offline_seed", "pseudo_label"]


def offline_seed(seed: int, stream: str) -> int:
    """The seed of the named random stream of an offline run (:func:`optidiff.rng.derive_seed`)."""
    return rng.derive_seed("optidiff.offline", seed, stream)


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


class RidgeReward(nn.Module):
    """Linear reward ``f̂(x) = θ̂ᵀx + b`` (x flattened), fitted by ridge regression:
    ``θ̂ = (X_cᵀX_c + λI)⁻¹X_cᵀ(y − ȳ)``, ``b = ȳ − x̄ᵀθ̂`` with ``X_c = X − x̄`` (the intercept is
    not penalised; the Wang & Chen tutorial's reward-learning step for linear rewards, ``Σ̂_λ = (XᵀX + λI)/n``)."""

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
        with rng.seeded(offline_seed(seed, "mlp-init")):
            m = cls(X.shape[1], hidden, depth)
        m.x_mean.copy_(X.mean(0))
        m.x_std.copy_(X.std(0).clamp(min=1e-6) if len(X) > 1 else torch.ones(X.shape[1]))
        m.y_mean.copy_(y.mean())
        m.y_std.copy_(y.std().clamp(min=1e-6) if len(y) > 1 else torch.ones(()))
        g = rng.generator(offline_seed(seed, "mlp-batches"))
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
        return MLPReward.fit(xs, ys, seed=offline_seed(seed, f"member{m}"), **mlp_kwargs)

    if ensemble == 1:
        return one(x, y, 0)
    members = []
    for m in range(ensemble):
        idx = torch.randint(len(x), (len(x),), generator=rng.generator(offline_seed(seed, f"bootstrap{m}")))
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
