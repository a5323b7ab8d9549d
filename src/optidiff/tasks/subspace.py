"""The ``subspace`` task of seed 000 (DESIGN.md §4; the official settings in ``research/ggdm.md`` §6.1).

Data: ``x = A·u`` in R^D with D = 64, d = 16, ``u ~ N(0, I_16)``, A the first 16 columns of a
seeded Haar-random orthogonal 64×64 matrix (QR of a Gaussian matrix with the signs of R's diagonal
fixed, Mezzadri 2007, as ``scipy.stats.ortho_group``); 65,536 pre-training points.

Objectives (``research/ggdm.md`` §6.1):

- ``f1_off``: ``f1(x) = 10 − (θᵀx − 3)²`` with θ of unit norm and ‖θ⊥‖/‖θ∥‖ = 9 (the official
  ``theta_2``, the default): θ = (A·v/‖v‖ + 9·P⊥w/‖P⊥w‖)/√82;
- ``f1_in``: the same f1 with θ = A·β, β uniform on the unit sphere of R^16 (``theta_1``);
- ``f2_b1``: ``f2(x) = 5 − 0.5‖x − b‖`` with b = 4·1 (``b_1``);
- ``f2_b2``: f2 with b = 4 + 3·N(0, I_64) (``b_2``, the official default).

Seeding: one ``torch.Generator`` seeded with ``seed`` draws, in this order, the 64×64 Gaussian
matrix of A, then v (16), w (64), β (16) and the N(0, I_64) of b_2; the pre-training points are
drawn from a second generator seeded with ``seed + 1`` (u: 65,536 × 16).

Metrics: the off-subspace ratio ``‖(I − AAᵀ)x‖/‖AAᵀx‖`` per sample (batch mean), as the official
``off_support_ratio`` (:func:`optidiff.metrics.off_subspace_ratio`).

Closed-form references (:meth:`SubspaceTask.reference`): the global maximum, the in-subspace
optimum (λ → 0) and the regularized optimum x_λ* of seed 000's Theorem 2 with the pre-training
mean 0 and covariance AAᵀ (closed form for the quadratic f1, Newton for f2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..metrics import off_subspace_ratio
from ..models import SubspaceGaussianDenoiser
from ..optimize.objectives import Objective
from ..optimize.reference import increment_to_lambda, regularized_optimum

__all__ = [
    "OBJECTIVES",
    "NetworkSpec",
    "SubspaceTask",
    "cache_dir",
    "haar_orthogonal",
    "pretrained_network",
]

D, d, N_PRETRAIN = 64, 16, 65_536
OBJECTIVES = ("f1_off", "f1_in", "f2_b1", "f2_b2")


def haar_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random n×n orthogonal matrix: Q of the QR decomposition of an n×n standard Gaussian
    matrix, with the columns' signs fixed by sign(diag R) (Mezzadri 2007), float64."""
    z = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r))


@dataclass
class SubspaceTask:
    """Seeded instance of the subspace task (see the module docstring)."""

    seed: int = 0
    n_pretrain: int = N_PRETRAIN
    name: str = "subspace"
    A: Tensor = field(init=False)
    theta_off: Tensor = field(init=False)
    theta_in: Tensor = field(init=False)
    b1: Tensor = field(init=False)
    b2: Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.A = haar_orthogonal(D, g)[:, :d].contiguous()
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
    def dim(self) -> int:
        return D

    @property
    def data_scale(self) -> float:
        """Per-coordinate standard deviation of the data, √(d/D) = 0.5."""
        return math.sqrt(d / D)

    def data(self, n: int | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """The first ``n`` (default 65,536) pre-training points ``x = A·u`` (seed + 1)."""
        n = self.n_pretrain if n is None else n
        g = torch.Generator().manual_seed(self.seed + 1)
        u = torch.randn(n, d, generator=g, dtype=torch.float64)
        return (u @ self.A.T).to(dtype)

    def exact_model(self) -> SubspaceGaussianDenoiser:
        """The exact denoiser of the pre-training law N(0, AAᵀ)."""
        return SubspaceGaussianDenoiser(self.A)

    @property
    def mean(self) -> Tensor:
        return torch.zeros(D, dtype=torch.float64)

    @property
    def cov(self) -> Tensor:
        return self.A @ self.A.T

    # ------------------------------------------------------------------ objectives
    def _check(self, name: str) -> str:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r} for task 'subspace'; choose one of "
                             f"{', '.join(OBJECTIVES)}")
        return name

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


# ---------------------------------------------------------------------------------------------
# the trained score network of the subspace and sphere tasks


@dataclass(frozen=True)
class NetworkSpec:
    """Size and training recipe of the small score network (a :class:`~optidiff.models.TimeMLP`).

    Trained by ``od.train`` (DSM, AdamW, EMA) with σ uniform over the indices of a log-linear
    table ``[sigma_min, sigma_max]`` of ``n_sigmas`` levels; the same table's
    ``sample_sigmas(steps, final_zero=True)`` is the sampling grid of the optimization runs.
    """

    hidden: int = 256
    depth: int = 3
    emb_dim: int = 64
    steps: int = 6000
    batch_size: int = 256
    lr: float = 2e-3
    ema_decay: float = 0.999
    sigma_min: float = 0.002
    sigma_max: float = 20.0
    n_sigmas: int = 1000
    seed: int = 0

    def key(self) -> str:
        return (f"h{self.hidden}-d{self.depth}-e{self.emb_dim}-s{self.steps}-b{self.batch_size}"
                f"-lr{self.lr:g}-ema{self.ema_decay:g}-sig{self.sigma_min:g}-{self.sigma_max:g}"
                f"-n{self.n_sigmas}-seed{self.seed}")

    def schedule(self):
        from ..schedules import LogLinearSchedule
        return LogLinearSchedule(self.sigma_min, self.sigma_max, self.n_sigmas)


def cache_dir() -> Path:
    """``$OPTIDIFF_CACHE`` if set, else ``~/.cache/optidiff``."""
    return Path(os.environ.get("OPTIDIFF_CACHE") or Path.home() / ".cache" / "optidiff")


def pretrained_network(task: Any, spec: NetworkSpec = NetworkSpec(), *, cache: bool = True,
                       progress: bool = True, threads: int | None = None) -> tuple[Any, dict]:
    """The task's trained score network, trained on first use and cached.

    The cache entry ``cache_dir()/networks/<task.name>-seed<task.seed>-<spec.key()>`` is an
    ``od.save_model`` checkpoint (safetensors + JSON, EMA weights) plus ``info.json`` with the
    training time. Returns ``(model in eval mode, info)``; ``info["cached"]`` tells whether it was
    loaded. ``threads`` sets ``torch.set_num_threads`` during training (restored afterwards).
    """
    import json
    import time

    from ..models import TimeMLP
    from ..training import load_model, save_model, train

    path = cache_dir() / "networks" / f"{task.name}-seed{task.seed}-{spec.key()}"
    info_file = path / "info.json"
    if cache and info_file.exists():
        model = load_model(path / "model")
        info = json.loads(info_file.read_text())
        info["cached"] = True
        return model.requires_grad_(False), info
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(spec.seed)
            net = TimeMLP(task.dim, hidden=spec.hidden, depth=spec.depth, emb_dim=spec.emb_dim,
                          sigma_data=task.data_scale)
        t0 = time.perf_counter()
        res = train(net, task.data(), steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                    schedule=spec.schedule(), ema_decay=spec.ema_decay, seed=spec.seed,
                    progress=progress)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    model = res.ema.eval().requires_grad_(False)
    info = {"task": task.name, "task_seed": task.seed, "spec": spec.key(),
            "pretrain_seconds": seconds, "threads": threads or old_threads,
            "final_loss": sum(res.losses[-200:]) / len(res.losses[-200:]),
            "parameters": sum(p.numel() for p in model.parameters())}
    if cache:
        path.mkdir(parents=True, exist_ok=True)
        save_model(path / "model", model)
        info_file.write_text(json.dumps(info, indent=1))
    info["cached"] = False
    return model, info
