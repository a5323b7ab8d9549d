"""The task protocol and the cached score network of vector tasks.

A **task** bundles what a run needs about one problem, so that the run drivers, the configs and
the reports never special-case a task (a new task is a new module of ``optidiff.tasks`` and a line
in its registry):

- :class:`Task` (generative optimization and training): ``name``, ``input_shape``, the names of its
  ``objectives``, pre-training ``data(n)``, a counted ``objective(name)``, per-batch ``metrics(x)``,
  closed-form ``reference(objective, ...)`` values, and ``projection(objective, x)``, the 2-D view
  of samples that the reports plot; optionally ``figures(x, model) -> {name: Figure}``, the
  task's own report figures, which ``optidiff train`` and ``optidiff sample`` save;
- :class:`OfflineTask` (offline reward maximization): ``offline_data()`` (unlabeled designs and
  labeled pairs) and ``evaluate(x, target)``, the oracle's metrics of candidates.

A task is a dataclass whose fields are its parameters (the ``[task]`` section of a config).
:func:`pretrained_network` trains (once, then cached) the small score network of a vector task.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .. import rng
from ..cache import cached
from ..device import torch_threads
from ..optimize.objectives import Objective
from ..schedules import LogLinearSchedule

__all__ = ["NetworkSpec", "OfflineData", "OfflineTask", "SubspaceNetSpec", "Task",
           "check_objective", "pretrained_network"]


@runtime_checkable
class Task(Protocol):
    """A problem for training and generative optimization (see the module docstring)."""

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]]
    #: (metric key, label) pairs that optimization reports plot next to the reward
    plot_metrics: ClassVar[tuple[tuple[str, str], ...]]

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def data(self, n: int | None = None) -> Tensor:
        """``n`` pre-training points (default: the task's full set), shape (n, *input_shape)."""

    def objective(self, name: str) -> Objective:
        """A fresh counted objective ``name`` (one of ``objectives``; tasks without objectives,
        for training only, need not define it nor :meth:`reference`)."""

    def metrics(self, x: Tensor) -> dict[str, float]:
        """Batch statistics of samples ``x`` (e.g. the off-support distance)."""

    def reference(self, objective: str, *, increment: float | None = None,
                  noise_std: float = 0.1) -> dict[str, Any]:
        """Closed-form values of ``objective``: ``global_max`` and any optimum the theory gives."""

    def projection(self, objective: str, x: Tensor) -> tuple[Tensor, str, str]:
        """A 2-D view of samples for plots: ``(points (N, 2), x label, y label)``."""


class OfflineData(NamedTuple):
    """The data of an offline problem: ``unlabeled`` designs (or None), labeled pairs, and the
    designs' per-coordinate standard deviation (the scale of gradient ascent)."""

    unlabeled: Tensor | None
    x_labeled: Tensor
    y_labeled: Tensor
    x_std: Tensor


@runtime_checkable
class OfflineTask(Protocol):
    """An offline reward-maximization problem: data, and the oracle's verdict on candidates."""

    name: ClassVar[str]

    def offline_data(self) -> OfflineData: ...

    def evaluate(self, x: Tensor, target: float | None) -> dict[str, float]:
        """The oracle's metrics of candidates ``x`` generated at ``target`` (None: no target)."""

    def decode(self, x: Tensor) -> Tensor | None:
        """The discrete designs of continuous candidates (None when designs are continuous)."""


@dataclass(frozen=True)
class NetworkSpec:
    """Size and training recipe of a vector task's small score network (a
    :class:`~optidiff.models.TimeMLP` with σ_data = the task's data scale).

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

    def schedule(self) -> LogLinearSchedule:
        return LogLinearSchedule(self.sigma_min, self.sigma_max, self.n_sigmas)

    def network(self, task: Any) -> torch.nn.Module:
        """The untrained network for ``task`` (initialised from the global RNG)."""
        from ..models import TimeMLP

        (dim,) = task.input_shape
        return TimeMLP(dim, hidden=self.hidden, depth=self.depth, emb_dim=self.emb_dim,
                       sigma_data=task.data_scale)

    def recipe(self, task: Any) -> dict[str, Any]:
        """What the cache entry of this network depends on, besides the task."""
        return asdict(self)


@dataclass(frozen=True)
class SubspaceNetSpec(NetworkSpec):
    """A :class:`~optidiff.models.SubspaceNet` (x0_hat = V·φ(Vᵀx, σ)) for data near a linear
    subspace of dimension ``latent_dim`` (default: the task's ``latent_dim``), with latent scale
    s = data_scale·√(D/d) (the latent standard deviation when the data's variance is spread evenly
    over d directions: 1 for the subspace task).

    The defaults train it in ~3,000 AdamW steps (constant rate 1e-3, EMA 0.999) to a held-out DSM
    loss within 1 % of the exact floor on the subspace task: the EMA matters, since the raw
    weights' basis jitters at the rate's scale (see benchmarks/lowdim.py for the measurement).
    """

    hidden: int = 128
    depth: int = 2
    steps: int = 3000
    lr: float = 1e-3
    latent_dim: int | None = None

    def _latent_dim(self, task: Any) -> int:
        d = self.latent_dim if self.latent_dim is not None else getattr(task, "latent_dim", None)
        if d is None:
            raise ValueError(f"SubspaceNetSpec needs latent_dim: task {task.name!r} has no "
                             f"latent_dim, so pass SubspaceNetSpec(latent_dim=...)")
        return d

    def network(self, task: Any) -> torch.nn.Module:
        from ..models import SubspaceNet

        (dim,) = task.input_shape
        d = self._latent_dim(task)
        return SubspaceNet(dim, d, hidden=self.hidden, depth=self.depth, emb_dim=self.emb_dim,
                           sigma_data=task.data_scale * (dim / d) ** 0.5)

    def recipe(self, task: Any) -> dict[str, Any]:
        return {"network": "SubspaceNet", **asdict(self), "latent_dim": self._latent_dim(task)}


def _task_parameters(task: Any) -> dict[str, Any]:
    """The task's constructor parameters other than ``seed`` that differ from their defaults (so
    the cache entries made before a parameter existed keep their keys)."""
    if not is_dataclass(task):
        return {}
    return {f.name: getattr(task, f.name) for f in fields(task)
            if f.init and f.name != "seed" and getattr(task, f.name) != f.default}


def pretrained_network(task: Any, spec: NetworkSpec = NetworkSpec(), *, cache: bool = True,
                       progress: bool | None = None, threads: int | None = None,
                       device: torch.device | str | None = None) -> tuple[Any, dict]:
    """The task's trained score network (``spec.network(task)``: a TimeMLP for a
    :class:`NetworkSpec`, a SubspaceNet for a :class:`SubspaceNetSpec`): trained on
    ``task.data()`` on first use and cached (:func:`optidiff.cache.cached`, keyed by the task, its
    seed, its other parameters where they differ from the defaults, and ``spec``).

    Returns ``(model in eval mode, info)``; ``info`` holds the training time, the final loss, the
    parameter count and ``cached`` (whether it was loaded). ``threads`` sets
    ``torch.set_num_threads`` during training (restored afterwards); ``device`` is where to train
    when it must (the cache entry does not depend on it) and where the model is returned.
    """
    from ..training import train

    (dim,) = task.input_shape

    def build() -> tuple[Any, dict[str, Any]]:
        used = threads or torch.get_num_threads()
        with torch_threads(threads):
            with rng.seeded(spec.seed):
                net = spec.network(task)
            t0 = time.perf_counter()
            res = train(net, task.data(), steps=spec.steps, batch_size=spec.batch_size,
                        lr=spec.lr, schedule=spec.schedule(), ema_decay=spec.ema_decay,
                        seed=spec.seed, progress=progress, device=device)
            seconds = time.perf_counter() - t0
        tail = res.losses[-200:]
        return res.ema, {"pretrain_seconds": seconds, "threads": used,
                         "final_loss": sum(tail) / len(tail),
                         "parameters": sum(p.numel() for p in net.parameters())}

    recipe = {"task": task.name, "task_seed": task.seed, "dim": dim,
              **_task_parameters(task), **spec.recipe(task)}
    model = cached(f"networks/{task.name}", recipe, build, use_cache=cache)
    return model.to(device or "cpu"), dict(model.train_info)


def check_objective(task: Any, name: str) -> str:
    """``name`` if it is one of ``task.objectives``, else a ValueError listing them."""
    if name not in task.objectives:
        choices = (f"choose one of {', '.join(task.objectives)}" if task.objectives
                   else "it has no objectives")
        raise ValueError(f"unknown objective {name!r} for task {task.name!r}; {choices}")
    return name
