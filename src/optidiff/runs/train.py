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
from typing import Any

import torch

from ..checkpoint import has_checkpoint, load_checkpoint
from ..config import TrainConfig, build_schedule, load_config
from ..device import resolve_device
from ..report import loss_figure, scatter_figure
from ..training import train
from .common import build_network, build_task, check_resume, draw, save_task_figures
from .rundir import RunDir, RunError

__all__ = ["MODEL_DEFAULTS", "SAMPLER_DEFAULTS", "TRAIN_DEFAULTS", "train_command", "train_run"]

#: what a train config's unset keys mean
MODEL_DEFAULTS = {"timemlp": {"hidden": 128, "depth": 3, "emb_dim": 64}, "unet": {},
                  "conditional_mlp": {}, "transformer": {}, "unrolled": {}}
TRAIN_DEFAULTS = {"steps": 5000, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0,
                  "ema_decay": 0.999, "grad_clip": 1.0, "seed": 0, "checkpoint_every": None,
                  "log_every": 100}
SAMPLER_DEFAULTS = {"name": "ge", "steps": 10, "batch_size": 2000, "seed": 0, "final_zero": True,
                    "gamma": None, "mu": None}


def train_run(cfg: TrainConfig, task: Any, run: RunDir, *, resume: bool = False,
              progress: bool | None = None, device: torch.device | str = "cpu"):
    """Train the config's network on ``task.data()`` on ``device`` in ``run`` (checkpoint,
    metrics.jsonl, loss plot). Returns the EMA model in eval mode."""
    t = cfg.train.kwargs(**TRAIN_DEFAULTS)
    kind = cfg.model.resolved_kind("timemlp")
    model = build_network(cfg.model, kind, task, t["seed"], **MODEL_DEFAULTS[kind])
    result = train(model, task.data(), schedule=build_schedule(cfg.schedule), run_dir=run.path,
                   resume=resume, progress=progress, device=device, **t)
    run.save_figure(loss_figure(result.losses), "loss")
    return result.ema.eval()


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
    text = Path(config).read_text(encoding="utf-8")
    run.start(title=f"optidiff train: {cfg.name}", command=f"optidiff train {config}")
    if run.fresh:
        run.write_text("config.toml", text)
    echo(f"run directory: {run.path}")
    model = train_run(cfg, task, run, resume=resume, progress=progress, device=dev)
    run.write_text("config.toml", text)  # a resumed run may have changed train.steps
    s = cfg.sampler.resolved(**SAMPLER_DEFAULTS)
    sigmas = build_schedule(cfg.schedule).sample_sigmas(s["steps"], final_zero=s["final_zero"])
    x = draw(model, sigmas, s, progress=progress, device=dev)
    record = run.log(event="sample", sampler=s["name"], gamma=s["gamma"], mu=s["mu"],
                     steps=s["steps"], batch_size=s["batch_size"], seed=s["seed"],
                     **task.metrics(x))
    run.save_samples(f"{s['name']}-{s['steps']}", x)
    if x.ndim == 2 and x.shape[1] == 2:
        run.save_figure(scatter_figure({f"data ({task.name})": task.data(len(x)),
                                        f"{s['name']}, {s['steps']} steps": x}), "samples")
    save_task_figures(run, task, x, model)
    report = run.write_report()
    return {**record, "run_dir": run.path, "checkpoint": run.path / "checkpoint",
            "report": report}
