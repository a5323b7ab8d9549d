"""``optidiff optimize CONFIG`` for generative optimization (Algorithms 1 and 2 of Guo, Yuan, Yang,
Chen & Wang, NeurIPS 2024), and the report of such runs.

The run directory holds ``run.json``, ``config.toml``, ``model.json`` (where the model came from),
what :func:`optidiff.optimize.gradient_guided` writes after every round (``config.json``,
``metrics.jsonl``, ``samples/round_XXXXX.safetensors``, the resumable ``state/``), the plots
(reward with the plateau implied by the delivered fraction, the delivered fraction r next to
the exact model's ρ, and the task's metrics per round, a 2-D projection of the samples over rounds) and
``report.html``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_tensors, read_jsonl
from ..config import ConfigError, FinetuneSection, OptimizeConfig, build_schedule, load_config
from ..device import resolve_device
from ..models import GaussianDenoiser
from ..models.registry import checkpoint_sigmas, load_model
from ..optimize import DSMFinetune, GaussianRefit, OptimizeResult, adaptive, gradient_guided
from ..optimize.objectives import Objective
from ..plugins import is_import_path
from ..report import curves_figure, projection_figure
from ..schedules import Schedule
from ..tasks.base import NetworkSpec, SubspaceNetSpec, pretrained_network
from .common import build_task, check_resume, config_plugins, plugin
from .rundir import RunDir

__all__ = ["build_model", "optimize_command", "references", "write_optimize_report"]

#: the reference values plotted next to the reward, by the key of ``task.reference``
_REFERENCE_LABELS = {"global_max": "global max", "in_subspace_max": "in-subspace max",
                     "regularized_value": "f(x_λ*)"}


def build_model(cfg: OptimizeConfig, task: Any, source: str, *, progress: bool | None = None,
                device: torch.device | str = "cpu") -> tuple[Any, Schedule, dict[str, Any]]:
    """(model, σ table, info) of a config's ``[model]`` (with ``[train]`` and ``[schedule]``)."""
    kind = cfg.model.resolved_kind("timemlp")
    default = NetworkSpec()
    if kind == "exact":
        if not hasattr(task, "exact_model"):
            raise ConfigError(f"{source}: model.kind = 'exact': task {task.name!r} has no exact "
                              "denoiser")
        sched = build_schedule(cfg.schedule) if cfg.schedule else default.schedule()
        return task.exact_model().to(device), sched, {"kind": "exact"}
    if kind == "load":
        path = cfg.model.checkpoint
        if not Path(path).exists():
            raise ConfigError(f"{source}: model.checkpoint: no checkpoint at {path!r}")
        model = load_model(path, device=device).requires_grad_(False)
        if tuple(getattr(model, "input_shape", ())) != tuple(task.input_shape):
            raise ConfigError(f"{source}: model.checkpoint: {path!r} holds a model of samples "
                              f"shaped {getattr(model, 'input_shape', None)}, but task "
                              f"{task.name!r} has samples shaped {tuple(task.input_shape)}")
        table = checkpoint_sigmas(path)
        sched = (build_schedule(cfg.schedule) if cfg.schedule
                 else Schedule(table) if table is not None else default.schedule())
        return model, sched, {"kind": "load", "checkpoint": path}
    if cfg.schedule is not None and cfg.schedule.kind != "loglinear":
        raise ConfigError(f"{source}: schedule.kind: the pre-trained network trains on a "
                          f"log-linear σ table, not {cfg.schedule.kind!r}")
    sch = cfg.schedule.params() if cfg.schedule else {}
    t = cfg.train.kwargs()  # only the recipe's keys (OptimizeConfig checks)
    spec_class = SubspaceNetSpec if kind == "subspace_net" else NetworkSpec
    spec = spec_class(**{**cfg.model.params(),
                         **t,
                         **{k: sch[k] for k in ("sigma_min", "sigma_max") if k in sch},
                         **({"n_sigmas": sch["n"]} if "n" in sch else {})})
    try:
        spec.recipe(task)  # a subspace_net needs a latent_dim (the task's or the config's)
    except ValueError as e:
        raise ConfigError(f"{source}: model: {e}") from None
    model, info = pretrained_network(task, spec, cache=cfg.train.cache, progress=progress,
                                     device=device)
    return model, spec.schedule(), {"kind": kind, **info}


def task_objective(cfg: OptimizeConfig, task: Any, source: str) -> Any:
    """``[task] objective``: one of the task's, or your own ``f(x) -> (B,)`` (or
    :class:`~optidiff.optimize.Objective`) named by import path."""
    name = cfg.task.objective
    if not is_import_path(name):
        return task.objective(name)
    f = plugin(name, "task.objective", source)
    if not callable(f):
        raise ConfigError(f"{source}: task.objective: {name} is a {type(f).__name__}, not a "
                          "function f(x) -> (B,)")
    return f if isinstance(f, Objective) else Objective(f, name=name)


def _view(task: Any, objective: str) -> str:
    """The objective whose 2-D projection the report plots: a plug-in objective is viewed as the
    task's first own objective, if it has one."""
    own = getattr(task, "objectives", ())
    return objective if objective in own or not own else own[0]


def _run(cfg: OptimizeConfig, task: Any, model: Any, sched: Schedule, run_dir: Path, *,
         resume: bool, progress: bool | None, device: torch.device,
         config: str | Path = "config") -> OptimizeResult:
    o = cfg.optimize
    s = cfg.sampler.resolved(name="ddpm", steps=50, batch_size=32)
    sigmas = sched.sample_sigmas(s["steps"], final_zero=True)
    skw = {k: s[k] for k in ("gamma", "mu") if s.get(k) is not None}
    common = {"rounds": o.rounds, "batch_size": s["batch_size"], "increment": o.increment,
              "target": o.target, "target_rule": o.target_rule,
              "max_correction": o.max_correction, "guidance": o.guidance, "gradient_at": o.gradient_at,
              "noise_std": o.noise_std, "beta": o.beta, "sampler": s["name"],
              "sampler_kwargs": skw, "top_k": o.top_k, "metrics": task.metrics,
              "run_dir": run_dir, "resume": resume, "seed": o.seed, "progress": progress,
              "device": device}
    objective = task_objective(cfg, task, str(config))
    if o.algorithm == "gradient_guided":
        return gradient_guided(model, objective, sigmas, **common)
    ft = cfg.finetune or FinetuneSection()
    if isinstance(model, GaussianDenoiser) or cfg.model.kind == "exact":
        # exact fine-tuning: refit a Gaussian to the samples
        model, finetune = GaussianDenoiser(task.mean, task.cov).to(device), GaussianRefit()
    else:  # fine-tune a copy: the cached pre-trained network stays as it is
        model = copy.deepcopy(model).requires_grad_(True)
        finetune = DSMFinetune(lr=ft.lr, steps=ft.steps_per_round, batch_size=ft.batch_size,
                               optimizer=ft.optimizer, sigmas=sched.sigmas)
    pre = task.data(8192) if ft.pretrain_weight > 0 else None
    return adaptive(model, objective, sigmas, finetune=finetune, start_round=ft.start_round,
                    replay_decay=ft.replay_decay, pretrain_data=pre,
                    pretrain_weight=ft.pretrain_weight, **common)


def references(task: Any, objective: str, increment: float | None, noise_std: float
               ) -> dict[str, float]:
    """The task's closed-form reference values of ``objective``, labelled for the plots (none
    for an objective of your own)."""
    if is_import_path(objective):
        return {}
    r = task.reference(objective, increment=increment, noise_std=noise_std)
    return {label: r[key] for key, label in _REFERENCE_LABELS.items() if key in r}


def write_optimize_report(run: RunDir, task: Any, objective: str, runs: dict[str, Path],
                          refs: dict[str, float], title: str, prefix: str = "") -> Path:
    """Curves of every optimization run in ``runs`` (name → its directory), the projection of
    five of its rounds' samples (figures ``{prefix}curves``, ``{prefix}projection``), and
    ``report.html`` of ``run``."""
    hists = {name: [{k: v for k, v in r.items() if k != "event"}
                    for r in read_jsonl(p / "metrics.jsonl")] for name, p in runs.items()}
    keys = [("reward_mean", "mean reward", "plateau", "implied plateau (δr/(1−r) ahead)"),
            ("delivered_fraction", "delivered fraction r", "exact_fraction",
             "exact model's fraction ρ"),
            ("reward_top_k", "top-k reward"), *getattr(task, "plot_metrics", ())]
    run.save_figure(curves_figure(hists, keys, refs), f"{prefix}curves")
    samples, rounds = {}, {}
    for name, p in runs.items():
        last = hists[name][-1]["round"]
        rounds[name] = sorted({0, last // 4, last // 2, (3 * last) // 4, last})
        samples[name] = [load_tensors(p / "samples" / f"round_{k:05d}.safetensors")["samples"]
                         for k in rounds[name]]
    run.save_figure(projection_figure(task, _view(task, objective), samples, rounds),
                    f"{prefix}projection")
    return run.write_report(title)


@config_plugins
def optimize_command(config: str | Path, run_dir: str | Path | None = None, *,
                     resume: bool = False, progress: bool | None = None, device: str = "auto",
                     echo: Callable[[str], None] = print) -> tuple[OptimizeResult, RunDir]:
    """Run ``optidiff optimize`` on a generative-optimization config: validate the config and the
    run directory (nothing written before both pass), build the task and the model, run the
    rounds (every one written and resumable), then the plots and the report."""
    cfg = load_config(config, "optimize")
    dev = resolve_device(device)
    run = RunDir.prepare("optimize", cfg.name, run_dir, resume=resume)
    check_resume(run, cfg, {"optimize": {"rounds"}})
    task = build_task(cfg, str(config))
    model, sched, info = build_model(cfg, task, str(config), progress=progress, device=dev)
    run.start(title=f"optidiff optimize: {cfg.name}", command=f"optidiff optimize {config}")
    echo(f"run directory: {run.path}")
    if run.fresh:
        run.write_text("config.toml", Path(config).read_text(encoding="utf-8"))
        run.write_text("model.json", json.dumps(info, indent=1, default=str))
    result = _run(cfg, task, model, sched, run.path, resume=resume, progress=progress,
                  device=dev, config=config)
    refs = references(task, cfg.task.objective, cfg.optimize.increment, cfg.optimize.noise_std)
    write_optimize_report(run, task, cfg.task.objective, {cfg.optimize.guidance: run.path}, refs,
                          f"optidiff optimize: {cfg.name}")
    return result, run
