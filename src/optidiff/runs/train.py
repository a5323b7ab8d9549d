"""``optidiff train CONFIG``: train a network on a task's data, then sample it.

Writes into the run directory: ``run.json``, ``config.toml`` (the file as given), ``checkpoint/``
(model, EMA, optimizer, generators, σ table: :func:`optidiff.train`'s exact-resume checkpoint),
``metrics.jsonl`` (training losses, then one ``sample`` record with the task's metrics),
``samples/<sampler>-<steps>.safetensors``, ``plots/`` (loss; samples and data for 2-D tasks; the
task's own figures when it has a ``figures`` hook, e.g. the ``gp`` task's sample paths,
autocovariance and attention maps) and ``report.html``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..checkpoint import has_checkpoint, load_checkpoint
from ..config import ConfigError, TrainConfig, build_schedule, load_config
from ..data import sample_shape
from ..device import resolve_device
from ..plugins import is_import_path
from ..report import loss_figure, scatter_figure
from ..training import train
from .common import (
    build_network,
    build_plugin_network,
    build_task,
    check_resume,
    config_plugins,
    draw,
    plugin,
    save_task_figures,
)
from .rundir import RunDir, RunError

__all__ = ["MODEL_DEFAULTS", "SAMPLER_DEFAULTS", "TRAIN_DEFAULTS", "train_command", "train_data",
           "train_network", "train_run"]

#: what a train config's unset keys mean
MODEL_DEFAULTS = {"timemlp": {"hidden": 128, "depth": 3, "emb_dim": 64}, "unet": {},
                  "conditional_mlp": {}, "subspace_net": {}, "transformer": {}, "unrolled": {}}
TRAIN_DEFAULTS = {"steps": 5000, "batch_size": 256, "lr": 1e-3, "lr_schedule": "constant",
                  "weight_decay": 0.0,
                  "ema_decay": 0.999, "grad_clip": 1.0, "seed": 0, "checkpoint_every": None,
                  "log_every": 100}
SAMPLER_DEFAULTS = {"name": "ge", "steps": 10, "batch_size": 2000, "seed": 0, "final_zero": True,
                    "gamma": None, "mu": None}


def train_data(cfg: TrainConfig, task: Any, source: str) -> Any:
    """What the run trains on: ``[train] data`` (your function, called with ``data_args``,
    returning anything :func:`optidiff.train` takes) or the task's data."""
    if cfg.train.data is None:
        return task.data()
    return plugin(cfg.train.data, "train.data", source, call=True, **(cfg.train.data_args or {}))


def train_network(cfg: TrainConfig, task: Any, data: Any, source: str) -> torch.nn.Module:
    """The freshly initialised network of ``[model]``: your own class (``kind`` an import path),
    or a built-in kind sized for the task (or, without one, for the data's sample shape)."""
    seed = cfg.train.kwargs(**TRAIN_DEFAULTS)["seed"]
    kind = cfg.model.resolved_kind("timemlp")
    if is_import_path(kind):
        return build_plugin_network(cfg.model, seed, source)
    if task is None:
        shape = sample_shape(data)
        if shape is None:
            raise ConfigError(f"{source}: model.kind = {kind!r} needs the shape of a sample, "
                              f"which train.data's {type(data).__name__} does not tell; add a "
                              "[task] or name your own network as kind = 'package.module:Class'")
        task = SimpleNamespace(name="train.data", input_shape=shape)
    return build_network(cfg.model, kind, task, seed, **MODEL_DEFAULTS.get(kind, {}))


def train_run(cfg: TrainConfig, task: Any, run: RunDir, *, resume: bool = False,
              progress: bool | None = None, device: torch.device | str = "cpu",
              source: str = "config", data: Any = None, model: torch.nn.Module | None = None):
    """Train the config's network (or ``model``) on its data (or ``data``) on ``device`` in
    ``run`` (checkpoint, metrics.jsonl, loss plot). Returns the EMA model in eval mode."""
    data = train_data(cfg, task, source) if data is None else data
    model = train_network(cfg, task, data, source) if model is None else model
    result = train(model, data, schedule=build_schedule(cfg.schedule), run_dir=run.path,
                   resume=resume, progress=progress, device=device,
                   **cfg.train.kwargs(**TRAIN_DEFAULTS))
    run.save_figure(loss_figure(result.losses), "loss")
    return result.ema.eval()


@config_plugins
def train_command(config: str | Path, run_dir: str | Path | None = None, *,
                  resume: bool = False, progress: bool | None = None, device: str = "auto",
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``optidiff train``: validate the config and the run directory (nothing is written
    before both pass), train, sample with ``[sampler]``, write the report. Returns the sample
    record (the task's metrics) with the paths."""
    cfg = load_config(config, "train")
    dev = resolve_device(device)
    run = RunDir.prepare("train", cfg.name, run_dir, resume=resume)
    check_resume(run, cfg, {"train": {"steps"}})
    ckpt = run.path / "checkpoint"
    steps = cfg.train.kwargs(**TRAIN_DEFAULTS)["steps"]
    if not run.fresh and has_checkpoint(ckpt) and load_checkpoint(ckpt)[1].get("step", 0) > steps:
        raise RunError(f"cannot --resume {run.path}: its checkpoint is at step "
                       f"{load_checkpoint(ckpt)[1]['step']}, beyond train.steps = {steps}")
    task = build_task(cfg, str(config))
    data = train_data(cfg, task, str(config))  # the user's code runs before anything is written
    model = train_network(cfg, task, data, str(config))
    text = Path(config).read_text(encoding="utf-8")
    run.start(title=f"optidiff train: {cfg.name}", command=f"optidiff train {config}")
    if run.fresh:
        run.write_text("config.toml", text)
    echo(f"run directory: {run.path}")
    model = train_run(cfg, task, run, resume=resume, progress=progress, device=dev,
                      source=str(config), data=data, model=model)
    run.write_text("config.toml", text)  # a resumed run may have changed train.steps
    s = cfg.sampler.resolved(**SAMPLER_DEFAULTS)
    sigmas = build_schedule(cfg.schedule).sample_sigmas(s["steps"], final_zero=s["final_zero"])
    x = draw(model, sigmas, s, progress=progress, device=dev)
    record = run.log(event="sample", sampler=s["name"], gamma=s["gamma"], mu=s["mu"],
                     steps=s["steps"], batch_size=s["batch_size"], seed=s["seed"],
                     **(task.metrics(x) if task is not None else {}))
    run.save_samples(f"{s['name']}-{s['steps']}", x)
    if x.ndim == 2 and x.shape[1] == 2:
        panels = {} if task is None else {f"data ({task.name})": task.data(len(x))}
        run.save_figure(scatter_figure({**panels, f"{s['name']}, {s['steps']} steps": x}),
                        "samples")
    if task is not None:
        save_task_figures(run, task, x, model)
    report = run.write_report()
    return {**record, "run_dir": run.path, "checkpoint": run.path / "checkpoint",
            "report": report}
