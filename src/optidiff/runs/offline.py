"""``optidiff optimize CONFIG`` for offline reward maximization (a config with ``[method]``).

With ``method.name = "suite"`` the run is :func:`run_suite`: every method and baseline of
:mod:`optidiff.optimize.suite` on each problem of the task (the TF factors of ``tfbind8``, the
lengths of ``ehrlich``); ``metrics.jsonl`` then holds one ``candidates`` record per (problem,
method, seed), the ``selection`` table and a ``table`` of means over seeds, ``summary.json`` the
score distributions, and ``plots/scores.png`` their box plots against the baselines.

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
from ..report import distribution_figure, metrics_figure
from .common import build_task, check_resume, config_plugins
from .rundir import RunDir, RunError

__all__ = ["offline_command", "run_offline", "run_suite", "suite_settings", "suite_table"]

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


def suite_settings(cfg: OfflineConfig) -> Any:
    """The :class:`~optidiff.optimize.suite.SuiteSettings` of a ``suite`` config."""
    from ..config import SuiteSection
    from ..optimize.suite import METHODS, SuiteSettings

    s, r = cfg.suite or SuiteSection(), cfg.reward
    return SuiteSettings(
        n=s.n, seeds=tuple(s.seeds), methods=tuple(s.methods or METHODS),
        ensemble=max(2, r.ensemble), reward_kwargs=r.kwargs(),
        diffusion_steps=s.diffusion_steps, batch_size=s.batch_size,
        model_kwargs={"hidden": s.hidden, "depth": s.depth}, sample_steps=s.sample_steps,
        pool=s.pool, reward_scales=tuple(s.reward_scales), penalties=tuple(s.penalties),
        prior_weights=tuple(s.prior_weights), likelihood_levels=s.likelihood_levels,
        reward_clip=s.reward_clip, holdout=s.holdout,
        evolution_generations=s.evolution_generations)


def suite_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per problem and method, the mean and std over seeds of p100, p50, novel, duplicates and
    feasible; then the mean over problems (rows with ``problem = "mean"``) of methods present on
    every problem."""
    import statistics

    def ms(v: list[float]) -> tuple[float, float]:
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    keys = ("p100", "p50", "novel", "duplicates", "feasible", "seconds")
    rows = []
    for res in results:
        for m in dict.fromkeys(r["method"] for r in res["records"]):
            recs = [r for r in res["records"] if r["method"] == m]
            row: dict[str, Any] = {"problem": res["problem"], "method": m, "seeds": len(recs)}
            for k in keys:
                row[k], row[k + "_std"] = ms([float(r[k]) for r in recs])
            rows.append(row)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)
               if all(any(r["method"] == m and r["problem"] == res["problem"] for r in rows)
                      for res in results)]
    if len(results) > 1:
        for m in methods:
            per = [r for r in rows if r["method"] == m]
            row = {"problem": "mean", "method": m, "seeds": per[0]["seeds"]}
            for k in keys:
                # spread of the mean over problems: std over seeds of the per-seed problem mean
                seeds = [[float(x[k]) for x in res["records"] if x["method"] == m]
                         for res in results]
                per_seed = [statistics.mean(col) for col in zip(*seeds)]
                row[k], row[k + "_std"] = ms(per_seed)
            rows.append(row)
    return rows


def run_suite(cfg: OfflineConfig, task: Any, run: RunDir, *, progress: bool | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method and baseline on every problem of ``task``; returns the summary."""
    from ..optimize.suite import run_problem

    st = suite_settings(cfg)
    t0 = time.perf_counter()
    results = []
    for problem in task.problems():
        res = run_problem(problem, st, progress=progress, log=echo)
        for rec in res["records"]:
            run.log(event="candidates", **{k: v for k, v in rec.items() if k != "scores"})
        for row in res["selection"]:
            run.log(event="selection", problem=problem.name, method=row["method"],
                    setting=str(row["setting"]), validation_p50=row["validation_p50"])
        results.append(res)
    table = suite_table(results)
    for row in table:
        run.log(event="table", **row)
    run.save_figure(distribution_figure(
        {res["problem"]: {m: [s for r in res["records"] if r["method"] == m for s in r["scores"]]
                          for m in dict.fromkeys(r["method"] for r in res["records"])}
         for res in results}), "scores")
    summary = {"name": cfg.name, "task": cfg.task.name, "method": "suite",
               "timings": {"total_s": time.perf_counter() - t0}, "table": table,
               "records": [r for res in results for r in res["records"]],
               "results": [{k: v for k, v in res.items() if k != "records"} for res in results]}
    write_text(run.path / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@config_plugins
def offline_command(config: str | Path, run_dir: str | Path | None = None, *,
                    resume: bool = False, progress: bool | None = None, device: str = "auto",
                    echo: Callable[[str], None] = print) -> tuple[dict[str, Any], RunDir]:
    """Run ``optidiff optimize`` on an offline config: validate the config and the run directory
    (nothing written before both pass), run, then the plot and the report."""
    cfg = load_config(config, "offline")
    if cfg.method.name == "suite" and resume:
        raise RunError("suite runs cannot be resumed; choose another --run-dir")
    dev = resolve_device(device)
    run = RunDir.prepare("offline", cfg.name, run_dir, resume=resume)
    check_resume(run, cfg, {})
    task = build_task(cfg, str(config))
    run.start(title=f"optidiff optimize (offline): {cfg.name}",
              command=f"optidiff optimize {config}")
    echo(f"run directory: {run.path}")
    if run.fresh:
        run.write_text("config.toml", Path(config).read_text(encoding="utf-8"))
    if cfg.method.name == "suite":
        summary = run_suite(cfg, task, run, progress=progress, echo=echo)
    else:
        summary = run_offline(cfg, task, run, resume=resume, progress=progress, device=dev)
        run.save_figure(metrics_figure(summary["records"]), "metrics")
    run.write_report()
    return summary, run
