"""``optidiff demo`` (naive vs look-ahead gradient guidance) and ``optidiff demo-samplers``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import build_schedule, dump_toml, parse_config
from ..device import resolve_device
from ..optimize import gradient_guided
from ..report import scatter_figure
from ..tasks.base import NetworkSpec, pretrained_network
from ..tasks.subspace import SubspaceTask
from ..tasks.toy2d import Toy2DTask, gaussian_mixture, gaussian_mixture_denoiser, quality
from .common import draw
from .optimize import references, write_optimize_report
from .rundir import RunDir
from .train import train_run

__all__ = ["DEMO", "DemoResult", "demo", "demo_samplers"]


@dataclass
class DemoResult:
    run_dir: Path
    report: Path
    table: list[dict[str, Any]]
    pretrain: dict[str, Any]
    seconds: float


#: the demo's embedded configuration: subspace f1 with θ off-subspace, the official δ's
DEMO = {"task": "subspace", "objective": "f1_off", "batch_size": 32, "steps": 50,
        "delta": {"naive": 0.9, "lookahead": 0.2}, "noise_std": 0.1, "beta": "official",
        "seed": 0}


def demo(run_dir: str | Path | None = None, rounds: int = 30, *, progress: bool | None = None,
         device: str = "auto", echo: Callable[[str], None] = print) -> DemoResult:
    """``optidiff demo``: Algorithm 1 of Guo et al. (NeurIPS 2024) on the ``subspace`` task with f1
    (θ off-subspace), naive gradient guidance (δ = 0.9) and look-ahead guidance G_loss (δ = 0.2;
    the official settings) side by side, per-sample gradients, B = 32, DDPM with 50 steps, on a
    small TimeMLP pre-trained on first use and cached. Prints a table (round, mean reward and
    off-subspace ratio for both) and the report's path."""
    run = RunDir.prepare("demo", "demo", run_dir)
    return _demo(run, rounds, progress=progress, device=resolve_device(device), echo=echo)


def _demo(run: RunDir, rounds: int, *, progress: bool | None, device: torch.device,
          echo: Callable[[str], None]) -> DemoResult:
    t0 = time.perf_counter()
    task = SubspaceTask(seed=0)
    spec = NetworkSpec()
    run.start(title="optidiff demo: naive vs look-ahead guidance", command="optidiff demo")
    echo(f"run directory: {run.path}")
    echo("optidiff demo: pre-trained score network for the subspace task (trained on first use, "
         "then cached) …")
    model, info = pretrained_network(task, spec, progress=progress, device=device)
    sigmas = spec.schedule().sample_sigmas(DEMO["steps"], final_zero=True)
    dirs, results = {}, {}
    for guid in ("naive", "lookahead"):
        dirs[guid] = run.path / guid
        results[guid] = gradient_guided(
            model, task.objective(DEMO["objective"]), sigmas, rounds=rounds,
            batch_size=DEMO["batch_size"], increment=DEMO["delta"][guid], guidance=guid,
            beta=DEMO["beta"], noise_std=DEMO["noise_std"], sampler="ddpm", metrics=task.metrics,
            run_dir=dirs[guid], seed=DEMO["seed"], progress=progress, device=device)
    table = []
    for hn, hl in zip(results["naive"].history, results["lookahead"].history):
        row = {"round": hn["round"], "reward_naive": hn["reward_mean"],
               "ratio_naive": hn["off_subspace_ratio"], "reward_lookahead": hl["reward_mean"],
               "ratio_lookahead": hl["off_subspace_ratio"]}
        table.append(row)
        run.log({"event": "naive vs lookahead", **row})
    refs = references(task, DEMO["objective"], DEMO["delta"]["lookahead"], DEMO["noise_std"])
    report = write_optimize_report(
        run, task, DEMO["objective"],
        {"naive (δ=0.9)": dirs["naive"], "lookahead (δ=0.2)": dirs["lookahead"]}, refs,
        "optidiff demo: naive gradient vs look-ahead guidance (subspace, f1)")
    seconds = time.perf_counter() - t0
    echo(f"\nsubspace task (D=64, d=16), f1 = 10 − (θᵀx − 3)², θ off-subspace (‖θ⊥‖/‖θ∥‖ = 9); "
         f"Algorithm 1, B = {DEMO['batch_size']}, DDPM {DEMO['steps']} steps")
    how = ("loaded from cache" if info["cached"]
           else f"trained in {info['pretrain_seconds']:.0f} s")
    echo(f"pre-trained network: {info['parameters']} parameters, {how}")
    echo(f"{'round':>5} | {'naive reward':>12} {'naive ratio':>11} | "
         f"{'look-ahead reward':>17} {'look-ahead ratio':>16}")
    step = max(1, rounds // 15)
    for row in table:
        if row["round"] % step == 0 or row["round"] == rounds:
            echo(f"{row['round']:>5} | {row['reward_naive']:>12.3f} {row['ratio_naive']:>11.4f}"
                 f" | {row['reward_lookahead']:>17.3f} {row['ratio_lookahead']:>16.4f}")
    echo(f"\nreferences: global max 10, regularized optimum f(x_λ*) = {refs['f(x_λ*)']:.3f} "
         f"(λ = σ_y²/δ, δ = 0.2)")
    echo(f"report: {report}  ({seconds:.0f} s)")
    return DemoResult(run_dir=run.path, report=report, table=table, pretrain=info,
                      seconds=seconds)


def demo_samplers_config(steps: int, n: int) -> Any:
    """The run of ``demo-samplers``: TimeMLP 128×3 on the 8-Gaussian mixture, log-linear
    σ ∈ [0.01, 10]."""
    return parse_config({"name": "demo",
                         "task": {"name": "toy2d", "dataset": "gaussian_mixture", "n": 50_000},
                         "model": {"kind": "timemlp", "hidden": 128, "depth": 3, "emb_dim": 64},
                         "schedule": {"kind": "loglinear", "sigma_min": 0.01, "sigma_max": 10.0},
                         "train": {"steps": steps, "batch_size": 512, "lr": 1e-3,
                                   "ema_decay": 0.995, "seed": 0,
                                   "log_every": max(1, min(100, steps // 10))},
                         "sampler": {"name": "ge", "steps": 10, "batch_size": n, "seed": 0}},
                        "demo-samplers", "train")


def demo_samplers(run_dir: str | Path | None = None, *, steps: int = 4000, n: int = 4000,
                  progress: bool | None = None, device: str = "auto",
                  echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train on a 2-D mixture whose exact denoiser is known; sample with DDIM and GE at 10 steps,
    and with the exact denoiser (10 steps, and DDIM at 200 as reference); return (and log) the
    MMD² and SW2² of each against exact mixture draws."""
    if steps < 1 or n < 2:
        raise ValueError(f"--steps must be >= 1 and --n >= 2, got --steps {steps}, --n {n}")
    cfg = demo_samplers_config(steps, n)
    dev = resolve_device(device)
    run = RunDir.prepare("demo-samplers", "demo", run_dir)
    run.start(title="optidiff demo: DDIM vs GE at 10 steps", command="optidiff demo-samplers")
    run.write_text("config.toml", dump_toml(cfg))
    echo(f"run directory: {run.path}")
    task = Toy2DTask(dataset="gaussian_mixture", n=50_000, seed=0)
    model = train_run(cfg, task, run, progress=progress, device=dev)
    schedule = build_schedule(cfg.schedule)
    g = torch.Generator().manual_seed(0)
    x_init = schedule.sigmas[-1].item() * torch.randn(n, 2, generator=g)  # shared by all
    exact = gaussian_mixture_denoiser()
    ref = gaussian_mixture(n, 1)
    runs = [("data: exact mixture draws", None, None, None),
            ("trained, DDIM", model, "ddim", 10), ("trained, GE (γ=2)", model, "ge", 10),
            ("exact denoiser, DDIM", exact, "ddim", 10),
            ("exact denoiser, GE (γ=2)", exact, "ge", 10),
            ("exact denoiser, DDIM (reference)", exact, "ddim", 200)]
    rows, xs = [], {}
    for label, m, sampler, k in runs:
        if m is None:
            x = gaussian_mixture(n, 2)
        else:
            x0 = x_init.double() if m is exact else x_init
            x = draw(m.to(dev), schedule.sample_sigmas(k, final_zero=True),
                     {"name": sampler, "seed": 0}, x_init=x0, device=dev).float()
            run.save_samples(f"{'exact' if m is exact else 'trained'}-{sampler}-{k}", x)
        xs[label] = x
        rows.append(run.log(event="sample", label=label, sampler=sampler, nfe=k,
                            **quality(x, ref)))
    run.save_figure(scatter_figure({"data": xs[runs[0][0]], "DDIM, 10 steps": xs[runs[1][0]],
                                    "GE, 10 steps": xs[runs[2][0]]}, title="trained model"),
                    "1_trained")
    run.save_figure(scatter_figure({"DDIM, 10 steps": xs[runs[3][0]],
                                    "GE, 10 steps": xs[runs[4][0]],
                                    "DDIM, 200 steps": xs[runs[5][0]]}, title="exact denoiser"),
                    "2_exact")
    run.write_report()
    return rows
