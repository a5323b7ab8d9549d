"""``optidiff optimize CONFIG`` for offline reward maximization (a config with ``[method]``).

The run directory holds ``run.json``, ``config.toml``, ``train/`` (the diffusion model's training
run: checkpoint and losses, resumable), ``metrics.jsonl`` (one record per target and sampling
seed: the target, the task's oracle metrics, seconds), ``samples/<target>_seed<k>.safetensors``
(the candidates, and their discrete designs for sequence tasks), ``summary.json`` (timings and
records), ``plots/metrics.png`` and ``report.html``. ``--resume`` continues the training from its
checkpoint and generates only the (target, seed) pairs not yet recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import save_tensors, write_text
from ..config import OfflineConfig, build_schedule, load_config
from ..device import resolve_device
from ..optimize import fit_reward, gradient_ascent, reward_conditioned, reward_guided
from ..report import metrics_figure
from .common import build_task, check_resume, config_plugins
from .rundir import RunDir

__all__ = ["offline_command", "run_offline"]

MODEL_DEFAULTS = {"hidden": 256, "depth": 3, "emb_dim": 64, "cond_emb_dim": 64}
TRAIN_DEFAULTS = {"steps": 4000, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0,
                  "ema_decay": 0.999, "grad_clip": 1.0}


def run_offline(cfg: OfflineConfig, task: Any, run: RunDir, *, resume: bool = False,
                progress: bool | None = None, device: Any = "cpu") -> dict[str, Any]:
    """Fit, train and generate for every target and seed of ``cfg`` in ``run``; returns the
    summary (timings and records)."""
    m, g, r = cfg.method, cfg.generate, cfg.reward
    s = cfg.sampler.resolved(name="ddpm", steps=100, batch_size=128)
    t = cfg.train.kwargs(**TRAIN_DEFAULTS, seed=0)
    seed = t.pop("seed")
    t0 = time.perf_counter()
    data = task.offline_data()
    done = {(rec.get("target"), rec.get("seed")) for rec in run.metrics()}
    records = [rec for rec in run.metrics() if "target" in rec]
    timings: dict[str, float] = {"data_s": time.perf_counter() - t0}

    def record(name: str, target: float | None, k: int, x: Tensor, seconds: float) -> None:
        rec = run.log(target=name, target_value=target, seed=k, seconds=seconds,
                      **task.evaluate(x, target))
        records.append(rec)
        tensors = {"samples": x}
        decoded = task.decode(x)
        if decoded is not None:
            tensors["sequences"] = decoded
        save_tensors(run.path / "samples" / f"{name}_seed{k}.safetensors", tensors)

    if m.name == "gradient_ascent":
        t1 = time.perf_counter()
        f = fit_reward(data.x_labeled, data.y_labeled, kind=r.kind, ensemble=r.ensemble,
                       seed=seed, **r.kwargs())
        timings["reward_s"] = time.perf_counter() - t1
        if ("ascent", 0) not in done:
            t2 = time.perf_counter()
            top = data.x_labeled[data.y_labeled.argsort(descending=True)[:s["batch_size"]]]
            x = gradient_ascent(f, top, steps=m.ascent_steps, lr=m.ascent_lr, x_std=data.x_std,
                                y_std=float(data.y_labeled.std()))
            record("ascent", None, 0, x, time.perf_counter() - t2)
    else:
        model_kwargs = {**MODEL_DEFAULTS, **cfg.model.params()}
        common = {"reward": None if r.kind == "none" else r.kind, "ensemble": r.ensemble,
                  "reward_kwargs": r.kwargs(),
                  "schedule": build_schedule(cfg.schedule) if cfg.schedule else None,
                  **t, "sample_steps": s["steps"], "sampler": s["name"], "prior": g.prior,
                  "seed": seed, "progress": progress, "reward_scale": g.reward_scale,
                  "reward_target": g.reward_target, "reward_clip": g.reward_clip,
                  "run_dir": run.path / "train", "resume": resume, "device": device}
        if m.name == "reward_conditioned":
            res = reward_conditioned(
                data.unlabeled, data.x_labeled, data.y_labeled, model_kwargs=model_kwargs,
                relabel_labeled=m.relabel_labeled, pseudo_label_noise=m.pseudo_label_noise,
                reweight=m.reweight, reweight_kwargs={"bins": m.reweight_bins,
                                                      "quantile": m.reweight_quantile,
                                                      "clip": m.reweight_clip},
                cond_drop=m.cond_drop, cfg_scale=g.cfg_scale, **common)
        else:
            model_kwargs.pop("cond_emb_dim")
            res = reward_guided(data.unlabeled, data.x_labeled, data.y_labeled,
                                model_kwargs=model_kwargs, **common)
        timings.update(res.timings)
        for target in g.targets:
            a = res.resolve_target(target)
            for k in g.seeds:
                if (str(target), k) in done:
                    continue
                t2 = time.perf_counter()
                x = res.generate(a, s["batch_size"], seed=k).cpu()
                record(str(target), a, k, x, time.perf_counter() - t2)
    timings["total_s"] = time.perf_counter() - t0
    summary = {"name": cfg.name, "task": cfg.task.name, "method": m.name, "timings": timings,
               "records": records}
    write_text(run.path / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@config_plugins
def offline_command(config: str | Path, run_dir: str | Path | None = None, *,
                    resume: bool = False, progress: bool | None = None, device: str = "auto",
                    echo: Callable[[str], None] = print) -> tuple[dict[str, Any], RunDir]:
    """Run ``optidiff optimize`` on an offline config: validate the config and the run directory
    (nothing written before both pass), run, then the plot and the report."""
    cfg = load_config(config, "offline")
    dev = resolve_device(device)
    run = RunDir.prepare("offline", cfg.name, run_dir, resume=resume)
    check_resume(run, cfg, {})
    task = build_task(cfg, str(config))
    run.start(title=f"optidiff optimize (offline): {cfg.name}",
              command=f"optidiff optimize {config}")
    echo(f"run directory: {run.path}")
    if run.fresh:
        run.write_text("config.toml", Path(config).read_text(encoding="utf-8"))
    summary = run_offline(cfg, task, run, resume=resume, progress=progress, device=dev)
    run.save_figure(metrics_figure(summary["records"]), "metrics")
    run.write_report()
    return summary, run
