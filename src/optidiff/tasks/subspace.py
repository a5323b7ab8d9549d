"""The ``subspace`` tasks: data on a low-dimensional linear subspace.

``subspace`` is the task of Guo, Yuan, Yang, Chen & Wang (NeurIPS 2024, "Gradient guidance for
diffusion models: an optimization perspective", §6 and their official code's settings);
``linear_subspace`` is the offline reward-maximization simulation of Yuan et al. (NeurIPS 2023,
"Reward-directed conditional diffusion"; see :class:`LinearSubspaceTask`).

Data: ``x = A·u`` in R^D with D = ``dim`` (default 64), d = ``latent_dim`` (default 16, 1 <= d < D),
``u ~ N(0, I_d)``, A the first d columns of a seeded Haar-random orthogonal D×D matrix (QR of a
Gaussian matrix with the signs of R's diagonal fixed, Mezzadri 2007, as
``scipy.stats.ortho_group``); 65,536 pre-training points. The defaults are the paper's sizes; other
sizes keep every construction below (with 16 → d, 64 → D).

Objectives (the official code's ``theta_1``, ``theta_2``, ``b_1``, ``b_2``):

- ``f1_off``: ``f1(x) = 10 − (θᵀx − 3)²`` with θ of unit norm and ‖θ⊥‖/‖θ∥‖ = 9 (the official
  ``theta_2``, the default): θ = (A·v/‖v‖ + 9·P⊥w/‖P⊥w‖)/√82;
- ``f1_in``: the same f1 with θ = A·β, β uniform on the unit sphere of R^d (``theta_1``);
- ``f2_b1``: ``f2(x) = 5 − 0.5‖x − b‖`` with b = 4·1 (``b_1``);
- ``f2_b2``: f2 with b = 4 + 3·N(0, I_D) (``b_2``, the official default).

Seeding: one ``torch.Generator`` seeded with ``seed`` draws, in this order, the D×D Gaussian
matrix of A, then v (d), w (D), β (d) and the N(0, I_D) of b_2; the pre-training points are
drawn from a second generator seeded with ``seed + 1`` (u: 65,536 × d).

Metrics: the off-subspace ratio ``‖(I − AAᵀ)x‖/‖AAᵀx‖`` per sample (batch mean), as the official
``off_support_ratio`` (:func:`optidiff.metrics.off_subspace_ratio`).

Closed-form references (:meth:`SubspaceTask.reference`): the global maximum, the in-subspace
optimum (λ → 0) and the regularized optimum x_λ* of Guo et al.'s Theorem 2 with the pre-training
mean 0 and covariance AAᵀ (closed form for the quadratic f1, Newton for f2).

The small pre-trained score network of the subspace and sphere tasks is
:func:`optidiff.tasks.base.pretrained_network` (re-exported here): a TimeMLP by default, or with
``SUBSPACE_NET`` the low-dimensional SubspaceNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import rng
from ..metrics import off_subspace_distance, off_subspace_ratio
from ..models import SubspaceGaussianDenoiser
from ..optimize.objectives import Objective
from ..optimize.reference import increment_to_lambda, regularized_optimum
from .base import NetworkSpec, OfflineData, SubspaceNetSpec, check_objective, pretrained_network

__all__ = ["OBJECTIVES", "SUBSPACE_NET", "LinearSubspaceTask", "NetworkSpec", "SubspaceTask",
           "pretrained_network"]

N_PRETRAIN = 65_536
OBJECTIVES = ("f1_off", "f1_in", "f2_b1", "f2_b2")
#: the low-dimensional score network of the subspace task (Chen, Huang, Zhao & Wang, ICML 2023):
#: a 48k-parameter :class:`~optidiff.models.SubspaceNet`, about 35 s of training on one core
SUBSPACE_NET = SubspaceNetSpec(hidden=128, depth=2, steps=2000, lr=3e-3)


@dataclass
class SubspaceTask:
    """Seeded instance of the subspace task (see the module docstring)."""

    name: ClassVar[str] = "subspace"
    objectives: ClassVar[tuple[str, ...]] = OBJECTIVES
    #: the metrics the optimization reports plot next to the reward: (key, label)
    plot_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        ("off_subspace_ratio", "off-subspace ratio ‖x⊥‖/‖x∥‖"),)
    seed: int = 0
    n_pretrain: int = N_PRETRAIN
    dim: int = 64
    latent_dim: int = 16
    A: Tensor = field(init=False, repr=False)
    theta_off: Tensor = field(init=False)
    theta_in: Tensor = field(init=False)
    b1: Tensor = field(init=False)
    b2: Tensor = field(init=False)

    def __post_init__(self) -> None:
        for name in ("n_pretrain", "dim", "latent_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={v!r}")
        if self.latent_dim >= self.dim:
            raise ValueError(f"latent_dim must be < dim (θ_off needs a direction off the "
                             f"subspace), got dim={self.dim}, latent_dim={self.latent_dim}")
        D, d = self.dim, self.latent_dim
        g = rng.generator(self.seed)
        self.A = rng.haar_orthogonal(D, g)[:, :d].contiguous()
        v = torch.randn(d, generator=g, dtype=torch.float64)
        w = torch.randn(D, generator=g, dtype=torch.float64)
        par = self.A @ (v / v.norm())
        perp = w - self.A @ (self.A.T @ w)
        self.theta_off = (par + 9.0 * perp / perp.norm()) / math.sqrt(82.0)
        beta = torch.randn(d, generator=g, dtype=torch.float64)
        self.theta_in = self.A @ (beta / beta.norm())
        self.b1 = torch.full((D,), 4.0, dtype=torch.float64)
        self.b2 = 4.0 + 3.0 * torch.randn(D, generator=g, dtype=torch.float64)

    # ------------------------------------------------------------------ data and model
    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def data_scale(self) -> float:
        """Root-mean-square per-coordinate standard deviation of the data, √(d/D) (0.5 at the
        default sizes)."""
        return math.sqrt(self.latent_dim / self.dim)

    def data(self, n: int | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """The first ``n`` (default ``n_pretrain``) pre-training points ``x = A·u`` (seed + 1)."""
        n = self.n_pretrain if n is None else n
        g = torch.Generator().manual_seed(self.seed + 1)
        u = torch.randn(n, self.latent_dim, generator=g, dtype=torch.float64)
        return (u @ self.A.T).to(dtype)

    def exact_model(self) -> SubspaceGaussianDenoiser:
        """The exact denoiser of the pre-training law N(0, AAᵀ)."""
        return SubspaceGaussianDenoiser(self.A)

    @property
    def mean(self) -> Tensor:
        return torch.zeros(self.dim, dtype=torch.float64)

    @property
    def cov(self) -> Tensor:
        return self.A @ self.A.T

    # ------------------------------------------------------------------ objectives
    def _check(self, name: str) -> str:
        return check_objective(self, name)

    def objective_fn(self, name: str):
        """The plain function ``f(x) -> (B,)`` of objective ``name``."""
        name = self._check(name)
        if name.startswith("f1"):
            theta = self.theta_off if name == "f1_off" else self.theta_in

            def f1(x: Tensor) -> Tensor:
                return 10.0 - (x @ theta.to(x) - 3.0) ** 2
            return f1
        b = self.b1 if name == "f2_b1" else self.b2

        def f2(x: Tensor) -> Tensor:
            return 5.0 - 0.5 * (x - b.to(x)).norm(dim=-1)
        return f2

    def objective(self, name: str = "f1_off") -> Objective:
        """A fresh counted :class:`~optidiff.optimize.Objective` (autograd gradient)."""
        return Objective(self.objective_fn(name), name=f"subspace/{name}",
                         maximum=self.global_max(name))

    def global_max(self, name: str) -> float:
        self._check(name)
        return 10.0 if name.startswith("f1") else 5.0

    # ------------------------------------------------------------------ metrics
    def projection(self, objective: str, x: Tensor) -> tuple[Tensor, str, str]:
        """(coordinate along the objective's in-subspace direction u, distance from the
        subspace): u = AAᵀθ/‖AAᵀθ‖ (f1) or AAᵀb/‖AAᵀb‖ (f2)."""
        direction = {"f1_off": self.theta_off, "f1_in": self.theta_in, "f2_b1": self.b1,
                     "f2_b2": self.b2}[self._check(objective)]
        u = self.A @ (self.A.T @ direction)
        x = x.detach().double().flatten(1)
        return (torch.stack([x @ (u / u.norm()), off_subspace_distance(x, self.A)], 1),
                "in-subspace coordinate uᵀx", "‖(I − AAᵀ)x‖")

    def metrics(self, x: Tensor) -> dict[str, float]:
        """``off_subspace_ratio`` (batch mean of ‖x⊥‖/‖x∥‖) and ``norm`` (mean ‖x‖)."""
        x = x.detach().flatten(1)
        return {"off_subspace_ratio": off_subspace_ratio(x, self.A).item(),
                "norm": x.double().norm(dim=1).mean().item()}

    # ------------------------------------------------------------------ references
    def regularized_optimum(self, name: str, lam: float) -> Tensor:
        """x_λ* = argmax_{x ∈ span(A)} f(x) − (λ/2)‖Aᵀx‖² (pre-training mean 0, covariance AAᵀ).

        f1 (closed form): x = s·θ∥ with θ∥ = AAᵀθ; stationarity 2(3 − s‖θ∥‖²)‖θ∥‖² = λ s gives
        s = 6/(2‖θ∥‖² + λ), so θᵀx* = 6‖θ∥‖²/(2‖θ∥‖² + λ). f2: damped Newton
        (:func:`optidiff.optimize.reference.regularized_optimum`).
        """
        self._check(name)
        if name.startswith("f1"):
            theta = self.theta_off if name == "f1_off" else self.theta_in
            tpar = self.A @ (self.A.T @ theta)
            p = (tpar @ tpar).item()
            return tpar * (6.0 / (2 * p + lam))
        return regularized_optimum(self.objective_fn(name), self.mean, self.cov, lam)

    def reference(self, name: str, *, increment: float | None = None, noise_std: float = 0.1
                  ) -> dict[str, Any]:
        """Reference values of objective ``name``: ``global_max``, ``in_subspace_max`` (and its
        off-subspace ratio 0), ``pretrain_mean_value`` (f at the data mean 0) and, with
        ``increment`` δ, ``lambda`` = σ_y²/δ and ``regularized_value`` = f(x_λ*)."""
        f = self.objective_fn(name)
        x_in = self.regularized_optimum(name, 0.0)
        out: dict[str, Any] = {
            "objective": name, "global_max": self.global_max(name),
            "in_subspace_max": f(x_in[None]).item(), "in_subspace_argmax_norm": x_in.norm().item(),
            "pretrain_mean_value": f(self.mean[None]).item()}
        if increment is not None:
            lam = increment_to_lambda(increment, noise_std)
            x_lam = self.regularized_optimum(name, lam)
            out.update(increment=increment, noise_std=noise_std, **{"lambda": lam},
                       regularized_value=f(x_lam[None]).item(),
                       regularized_argmax_norm=x_lam.norm().item())
        return out


@dataclass
class LinearSubspaceTask:
    """The offline simulation of Yuan et al. (NeurIPS 2023; journal version Li et al. 2024, §7):
    ``x = A·u``, ``u ~ N(0, I_d)``, A the first ``d`` columns of a seeded Haar-random orthogonal
    ``D×D`` matrix; reward ``f*(x) = θᵀx`` with unit ``θ = cos(φ)·Aβ + sin(φ)·θ⊥`` (``φ = 0``: θ in
    the subspace, so ``f*`` ~ N(0, 1) on the data); labels ``y = f*(x) + N(0, noise²)``.

    The basis, θ and the unlabeled pool depend on ``seed`` only; the labeled points and their noise
    on ``label_seed`` (default ``seed``), so label budgets can be compared on the same pool.
    float32 data, float64 basis. (Its draws are its own: A is not :class:`SubspaceTask`'s A.)
    """

    name: ClassVar[str] = "linear_subspace"
    D: int = 64
    d: int = 16
    n_unlabeled: int = 65_536
    n_labeled: int = 1_024
    noise: float = 0.5
    off_angle: float = 0.0
    seed: int = 0
    label_seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.d <= self.D:
            raise ValueError(f"need 1 <= d <= D, got d={self.d}, D={self.D}")
        if self.off_angle != 0.0 and self.d == self.D:
            raise ValueError("off_angle needs d < D")
        if not (self.n_labeled >= 2 and self.n_unlabeled >= 0 and self.noise >= 0):
            raise ValueError(f"need n_labeled >= 2, n_unlabeled >= 0, noise >= 0; got "
                             f"{self.n_labeled}, {self.n_unlabeled}, {self.noise}")
        g = rng.generator(rng.derive_seed("optidiff.offline", self.seed, "subspace"))
        q = rng.haar_orthogonal(self.D, g)
        self.A = q[:, :self.d]
        beta = torch.randn(self.d, generator=g, dtype=torch.float64)
        theta = self.A @ (beta / beta.norm())
        if self.off_angle != 0.0:
            perp = q[:, self.d:] @ torch.randn(self.D - self.d, generator=g, dtype=torch.float64)
            theta = math.cos(self.off_angle) * theta + math.sin(self.off_angle) * perp / perp.norm()
        self.theta = theta
        self.unlabeled = (torch.randn(self.n_unlabeled, self.d, generator=g, dtype=torch.float64)
                          @ self.A.T).float()
        gl = rng.generator(rng.derive_seed("optidiff.offline", self.seed if self.label_seed is None
                                           else self.label_seed, "labels"))
        self.x_labeled = (torch.randn(self.n_labeled, self.d, generator=gl, dtype=torch.float64)
                          @ self.A.T).float()
        self.y_labeled = (self.x_labeled.double() @ theta + self.noise * torch.randn(
            self.n_labeled, generator=gl, dtype=torch.float64)).float()

    def reward(self, x: Tensor) -> Tensor:
        """The true reward f*(x) = θᵀx, float64 (B,)."""
        return x.flatten(1).to(self.theta.dtype) @ self.theta

    def offline_data(self) -> OfflineData:
        return OfflineData(self.unlabeled if self.n_unlabeled > 0 else None, self.x_labeled,
                           self.y_labeled, self.x_labeled.std(0))

    def evaluate(self, x: Tensor, target: float | None) -> dict[str, float]:
        """Mean, spread and max of the true reward, the mean off-support distance and, at a
        target a, the suboptimality ``SubOpt(a) = a − mean f*(x)``."""
        f = self.reward(x)
        out = {"reward_mean": float(f.mean()), "reward_std": float(f.std()),
               "reward_max": float(f.max()),
               "off_support": float(off_subspace_distance(x, self.A).mean())}
        if target is not None:
            out["subopt"] = float(target) - float(f.mean())
        return out

    def decode(self, x: Tensor) -> None:
        return None
