"""Config-driven generative optimization (``optidiff optimize CONFIG.toml``) and the demo.

This module sits at the top of the dependency order (it uses ``tasks``, ``report`` and the
configuration style of ``optidiff.config``), so :mod:`optidiff.optimize` does not import it.

A configuration file (every key optional except where noted; unknown keys are errors)::

    name = "subspace-f1"                # run directory runs/<name>-<time>

    [task]
    name = "subspace"                   # "subspace" or "sphere"
    objective = "f1_off"                # subspace: f1_off, f1_in, f2_b1, f2_b2; sphere: linear
    seed = 0

    [model]
    kind = "train"                      # "train" (pre-train, cached), "load" (checkpoint) or
                                        # "exact" (the task's exact Gaussian denoiser; subspace only)
    checkpoint = "path/to/model"        # kind = "load": an od.save_model / od.train checkpoint
    hidden = 256                        # kind = "train": TimeMLP size and recipe (NetworkSpec)
    depth = 3
    steps = 6000
    lr = 0.002
    cache = true

    [sampler]
    name = "ddpm"                       # any od.sample sampler
    steps = 50                          # on the model's σ table, trailing spacing, final σ = 0

    [optimize]
    algorithm = "gradient_guided"       # or "adaptive" (Algorithm 2)
    guidance = "lookahead"              # or "naive"
    beta = "official"                   # the guidance's step size: "official", "lemma1" or a number
    gradient_at = "sample"              # or "mean"
    rounds = 100
    batch_size = 32
    increment = 0.2                     # δ; or target = y* (fixed-target rule)
    noise_std = 0.1
    top_k = 4
    seed = 0

    [finetune]                          # algorithm = "adaptive" only
    lr = 1e-5
    steps_per_round = 1
    optimizer = "adamw"
    start_round = 0
    replay_decay = 0.0
    pretrain_weight = 0.0
    batch_size = 32

Output (a :class:`~optidiff.report.RunDir`): ``config.toml``, ``metrics.jsonl`` (one record per
round), ``samples/round_XXXXX.safetensors``, the resumable state, ``plots/*.png`` (reward and
off-support curves per round, a 2-D projection of the samples over rounds) and ``report.html``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from .sampling import SAMPLERS, resolve_sampler
from .schema import RunName, choice, one_of, read_toml, validate
from .schema import Section as _Section

__all__ = [
    "TASKS",
    "DemoResult",
    "OptimizeConfig",
    "demo",
    "load_optimize_config",
    "make_task",
    "projection",
    "run_optimize",
    "write_optimize_report",
]

TASKS = ("subspace", "sphere")


def make_task(name: str, seed: int = 0):
    """The task object ``name`` (``"subspace"`` or ``"sphere"``) with ``seed``."""
    if one_of(name, TASKS, "task") == "subspace":
        from .tasks.subspace import SubspaceTask
        return SubspaceTask(seed=seed)
    from .tasks.sphere import SphereTask
    return SphereTask(seed=seed)


def _objectives(task: str) -> tuple[str, ...]:
    if task == "subspace":
        from .tasks.subspace import OBJECTIVES
    else:
        from .tasks.sphere import OBJECTIVES
    return OBJECTIVES


# --------------------------------------------------------------------------------------- config

class TaskConfig(_Section):
    name: choice(TASKS, "task") = "subspace"
    objective: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _objective(self) -> TaskConfig:
        allowed = _objectives(self.name)
        if self.objective is None:
            self.objective = allowed[0]
        elif self.objective not in allowed:
            raise ValueError(f"objective {self.objective!r} is not an objective of task "
                             f"{self.name!r}; choose one of {', '.join(allowed)}")
        return self


class ModelSection(_Section):
    kind: Literal["train", "load", "exact"] = "train"
    checkpoint: str | None = None
    hidden: int = Field(256, gt=0)
    depth: int = Field(3, gt=0)
    emb_dim: int = Field(64, gt=0, multiple_of=2)
    steps: int = Field(6000, gt=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    sigma_min: float = Field(0.002, gt=0, allow_inf_nan=False)
    sigma_max: float = Field(20.0, gt=0, allow_inf_nan=False)
    seed: int = 0
    cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.kind == "load" and not self.checkpoint:
            raise ValueError("kind = 'load' needs checkpoint = 'path'")
        if self.kind != "load" and self.checkpoint:
            raise ValueError(f"checkpoint is only used with kind = 'load' (kind = {self.kind!r})")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        return self


class SamplerSection(_Section):
    name: choice(SAMPLERS, "sampler") = "ddpm"
    steps: int = Field(50, gt=0, le=1000)
    gamma: float | None = Field(None, gt=0, allow_inf_nan=False)
    mu: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> SamplerSection:
        resolve_sampler(self.name, self.gamma, self.mu)
        return self


class OptimizeSection(_Section):
    algorithm: Literal["gradient_guided", "adaptive"] = "gradient_guided"
    guidance: Literal["lookahead", "naive"] = "lookahead"
    beta: str | float | None = "official"
    gradient_at: Literal["sample", "mean"] = "sample"
    rounds: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    increment: float | None = Field(None, gt=0, allow_inf_nan=False)
    target: float | None = Field(None, allow_inf_nan=False)
    noise_std: float = Field(0.1, gt=0, allow_inf_nan=False)
    top_k: int = Field(4, ge=1)
    seed: int = 0

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("official", "lemma1"):
            raise ValueError("beta must be 'official', 'lemma1' or a number >= 0")
        if isinstance(v, float) and not (math.isfinite(v) and v >= 0):
            raise ValueError("beta must be a finite number >= 0")
        return v

    @model_validator(mode="after")
    def _rule(self) -> OptimizeSection:
        if self.increment is None and self.target is None:
            self.increment = 0.2
        if self.increment is not None and self.target is not None:
            raise ValueError("give increment or target, not both")
        return self


class FinetuneSection(_Section):
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False)
    steps_per_round: int = Field(1, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    start_round: int = Field(0, ge=0)
    replay_decay: float = Field(0.0, ge=0, le=1)
    pretrain_weight: float = Field(0.0, ge=0, lt=1)
    batch_size: int | None = Field(None, ge=1)


class OptimizeConfig(_Section):
    """A whole ``optidiff optimize`` run (see the module docstring)."""

    name: RunName = "optimize"
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    optimize: OptimizeSection = Field(default_factory=OptimizeSection)
    finetune: FinetuneSection | None = None

    @model_validator(mode="after")
    def _check(self) -> OptimizeConfig:
        if self.model.kind == "exact" and self.task.name != "subspace":
            raise ValueError("model.kind = 'exact' exists for task 'subspace' only")
        if self.finetune is not None and self.optimize.algorithm != "adaptive":
            raise ValueError("[finetune] is used only with optimize.algorithm = 'adaptive'")
        return self


def parse_optimize_config(data: dict[str, Any], source: str = "<config>") -> OptimizeConfig:
    """Validate a parsed mapping; every problem becomes one ``ConfigError`` naming ``source``."""
    return validate(OptimizeConfig, data, source)


def load_optimize_config(path: str | Path) -> OptimizeConfig:
    """Read and validate an ``optidiff optimize`` TOML file."""
    return parse_optimize_config(read_toml(path), str(path))


# --------------------------------------------------------------------------------------- model

def build_model(cfg: OptimizeConfig, task: Any, *, progress: bool = True):
    """(model, σ table, info) of a config's ``[model]`` section."""
    from .schedules import LogLinearSchedule
    m = cfg.model
    if m.kind == "exact":
        sched = LogLinearSchedule(m.sigma_min, m.sigma_max, 1000)
        return task.exact_model(), sched, {"kind": "exact"}
    if m.kind == "load":
        from .training import load_model
        model = load_model(m.checkpoint).requires_grad_(False)
        sched = LogLinearSchedule(m.sigma_min, m.sigma_max, 1000)
        return model, sched, {"kind": "load", "checkpoint": m.checkpoint}
    from .tasks.subspace import NetworkSpec, pretrained_network
    spec = NetworkSpec(hidden=m.hidden, depth=m.depth, emb_dim=m.emb_dim, steps=m.steps,
                       batch_size=m.batch_size, lr=m.lr, sigma_min=m.sigma_min,
                       sigma_max=m.sigma_max, seed=m.seed)
    model, info = pretrained_network(task, spec, cache=m.cache, progress=progress)
    return model, spec.schedule(), {"kind": "train", **info}


# --------------------------------------------------------------------------------------- report

def projection(task: Any, objective: str, x: Tensor) -> tuple[Tensor, str, str]:
    """A 2-D view of samples: (coordinate along the objective's in-support direction, distance
    from the support), with axis labels. subspace: u = AAᵀθ/‖AAᵀθ‖ (f1) or AAᵀb/‖AAᵀb‖ (f2);
    (uᵀx, ‖(I − AAᵀ)x‖). sphere: (θᵀx, ‖x‖)."""
    x = x.detach().double().flatten(1)
    if task.name == "sphere":
        return torch.stack([x @ task.theta, x.norm(dim=1)], 1), "θᵀx", "‖x‖"
    A = task.A
    direction = {"f1_off": task.theta_off, "f1_in": task.theta_in, "f2_b1": task.b1,
                 "f2_b2": task.b2}[objective]
    u = A @ (A.T @ direction)
    u = u / u.norm()
    off = (x - (x @ A) @ A.T).norm(dim=1)
    return torch.stack([x @ u, off], 1), "in-subspace coordinate uᵀx", "‖(I − AAᵀ)x‖"


def _curves_figure(runs: dict[str, list[dict]], keys: list[tuple[str, str]], refs: dict[str, float]):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (key, label) in zip(axes, keys):
        for name, hist in runs.items():
            ax.plot([h["round"] for h in hist], [h.get(key, math.nan) for h in hist], label=name)
        for rname, val in refs.items():
            if key.startswith("reward") and val is not None and math.isfinite(val):
                ax.axhline(val, ls="--", lw=0.8, color="gray")
                ax.annotate(rname, (0, val), fontsize=7, color="gray", va="bottom")
        ax.set(xlabel="round", ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _projection_figure(task: Any, objective: str, runs: dict[str, list[Tensor]],
                       rounds: dict[str, list[int]]):
    from matplotlib import cm
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.4 * len(runs), 3.8))
    axes = fig.subplots(1, len(runs), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (name, samples) in zip(axes, runs.items()):
        ks = rounds[name]
        for i, (k, x) in enumerate(zip(ks, samples)):
            p, xl, yl = projection(task, objective, x)
            ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.7, color=cm.viridis(i / max(1, len(ks) - 1)),
                       label=f"round {k}", linewidths=0)
        ax.set(xlabel=xl, ylabel=yl, title=name)
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


def _load_round(run_dir: Path, k: int) -> Tensor:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "samples" / f"round_{k:05d}.safetensors"))["samples"]


def _metric_keys(task: Any) -> list[tuple[str, str]]:
    if task.name == "sphere":
        return [("reward_mean", "mean reward"), ("reward_top_k", "top-4 reward"),
                ("norm_deviation", "|‖x‖ − 1|")]
    return [("reward_mean", "mean reward"), ("reward_top_k", "top-4 reward"),
            ("off_subspace_ratio", "off-subspace ratio ‖x⊥‖/‖x∥‖")]


def _history(path: Path) -> list[dict]:
    from .optimize._state import read_jsonl
    return [{k: v for k, v in r.items() if k != "event"} for r in read_jsonl(path / "metrics.jsonl")]


def _write_report(run, task: Any, objective: str, runs: dict[str, Path], refs: dict[str, float],
                  title: str) -> Path:
    hists = {name: _history(p) for name, p in runs.items()}
    fig = _curves_figure(hists, _metric_keys(task), refs)
    run.save_figure(fig, "curves")
    samples, rounds = {}, {}
    for name, p in runs.items():
        last = hists[name][-1]["round"]
        ks = sorted({0, last // 4, last // 2, (3 * last) // 4, last})
        rounds[name] = ks
        samples[name] = [_load_round(p, k) for k in ks]
    run.save_figure(_projection_figure(task, objective, samples, rounds), "projection")
    return run.write_report(title)


write_optimize_report = _write_report


# --------------------------------------------------------------------------------------- runs

def _refs(task: Any, objective: str, increment: float | None, noise_std: float) -> dict:
    r = task.reference(objective, increment=increment, noise_std=noise_std)
    out = {"global max": r["global_max"]}
    if "in_subspace_max" in r:
        out["in-subspace max"] = r["in_subspace_max"]
    if "regularized_value" in r:
        out["f(x_λ*)"] = r["regularized_value"]
    return out


def _run_one(cfg: OptimizeConfig, task: Any, model: Any, sched: Any, run_dir: Path, *,
             resume: bool, progress: bool):
    import copy

    from .models import GaussianDenoiser
    from .optimize.adaptive import DSMFinetune, GaussianRefit, adaptive
    from .optimize.gradient_guided import gradient_guided
    o, s = cfg.optimize, cfg.sampler
    sigmas = sched.sample_sigmas(s.steps, final_zero=True)
    skw = {k: v for k, v in (("gamma", s.gamma), ("mu", s.mu)) if v is not None}
    common = {"rounds": o.rounds, "batch_size": o.batch_size, "increment": o.increment,
              "target": o.target, "guidance": o.guidance, "gradient_at": o.gradient_at,
              "noise_std": o.noise_std, "beta": o.beta, "sampler": s.name,
              "sampler_kwargs": skw, "top_k": o.top_k, "metrics": task.metrics,
              "run_dir": run_dir, "resume": resume, "seed": o.seed, "progress": progress}
    objective = task.objective(cfg.task.objective)
    if o.algorithm == "gradient_guided":
        return gradient_guided(model, objective, sigmas, **common)
    ft = cfg.finetune or FinetuneSection()
    if cfg.model.kind == "exact":  # exact fine-tuning: refit a Gaussian to the samples
        model, finetune = GaussianDenoiser(task.mean, task.cov), GaussianRefit()
    else:  # fine-tune a copy: the cached pre-trained network stays as it is
        model = copy.deepcopy(model).requires_grad_(True)
        finetune = DSMFinetune(lr=ft.lr, steps=ft.steps_per_round, batch_size=ft.batch_size,
                               optimizer=ft.optimizer, sigmas=sched.sigmas)
    pre = task.data(8192) if ft.pretrain_weight > 0 else None
    return adaptive(model, objective, sigmas, finetune=finetune, start_round=ft.start_round,
                    replay_decay=ft.replay_decay, pretrain_data=pre,
                    pretrain_weight=ft.pretrain_weight, **common)


def run_optimize(config_path: str | Path, run_dir: str | Path | None = None, *,
                 resume: bool = False, progress: bool = True):
    """Run ``optidiff optimize CONFIG.toml``: validate the config, build the task and model, run
    Algorithm 1 or 2 writing every round to the run directory, then write the plots and the
    report. Returns ``(OptimizeResult, RunDir)``."""
    from .report import RunDir
    cfg = load_optimize_config(config_path)
    task = make_task(cfg.task.name, cfg.task.seed)
    run = RunDir.create(cfg.name, path=run_dir, title=f"optidiff optimize: {cfg.name}",
                        command=f"optidiff optimize {config_path}")
    run.copy_config(config_path)
    model, sched, info = build_model(cfg, task, progress=progress)
    run.write_text("model.json", json.dumps(info, indent=1, default=str))
    result = _run_one(cfg, task, model, sched, run.path, resume=resume, progress=progress)
    refs = _refs(task, cfg.task.objective, cfg.optimize.increment, cfg.optimize.noise_std)
    _write_report(run, task, cfg.task.objective, {cfg.optimize.guidance: run.path}, refs,
                  f"optidiff optimize: {cfg.name}")
    return result, run


# --------------------------------------------------------------------------------------- demo

class DemoResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    run_dir: Path
    report: Path
    table: list[dict[str, Any]]
    pretrain: dict[str, Any]
    seconds: float


#: the demo's embedded configuration: subspace f1 with θ off-subspace, the official δ's
DEMO = {"task": "subspace", "objective": "f1_off", "batch_size": 32, "steps": 50,
        "delta": {"naive": 0.9, "lookahead": 0.2}, "noise_std": 0.1, "beta": "official",
        "seed": 0}


def demo(run_dir: str | Path | None = None, rounds: int = 30, *, progress: bool = True,
         print_table: bool = True) -> DemoResult:
    """``optidiff demo``: Algorithm 1 on the ``subspace`` task with f1 (θ off-subspace), naive
    gradient guidance (δ = 0.9) and look-ahead guidance G_loss (δ = 0.2; the official
    settings, ggdm.md §6.1) side by side, per-sample gradients, B = 32, DDPM with 50 steps, on a
    small TimeMLP pre-trained on first use and cached (``$OPTIDIFF_CACHE`` or
    ``~/.cache/optidiff``). Prints a table (round, mean reward and off-subspace ratio for both)
    and the report's path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 32-256 rows: one thread is fastest, also on a busy machine
    try:
        return _demo(run_dir, rounds, progress=progress, print_table=print_table)
    finally:
        torch.set_num_threads(threads)


def _demo(run_dir: str | Path | None, rounds: int, *, progress: bool, print_table: bool
          ) -> DemoResult:
    from .report import RunDir
    from .tasks.subspace import NetworkSpec, pretrained_network
    from .optimize.gradient_guided import gradient_guided
    t0 = time.perf_counter()
    task = make_task("subspace", 0)
    spec = NetworkSpec()
    if progress:
        print("optidiff demo: pre-trained score network for the subspace task "
              "(trained on first use, then cached) …")
    model, info = pretrained_network(task, spec, progress=progress)
    run = RunDir.create("demo", path=run_dir, title="optidiff demo: naive vs look-ahead guidance",
                        command="optidiff demo")
    sigmas = spec.schedule().sample_sigmas(DEMO["steps"], final_zero=True)
    dirs, results = {}, {}
    for guid in ("naive", "lookahead"):
        dirs[guid] = run.path / guid
        if (dirs[guid] / "state.json").exists():  # a rerun into the same directory starts afresh
            import shutil
            shutil.rmtree(dirs[guid])
        results[guid] = gradient_guided(
            model, task.objective(DEMO["objective"]), sigmas, rounds=rounds,
            batch_size=DEMO["batch_size"], increment=DEMO["delta"][guid], guidance=guid,
            beta=DEMO["beta"], noise_std=DEMO["noise_std"], sampler="ddpm", metrics=task.metrics,
            run_dir=dirs[guid], seed=DEMO["seed"], progress=progress)
    table = []
    for hn, hl in zip(results["naive"].history, results["lookahead"].history):
        row = {"round": hn["round"], "reward_naive": hn["reward_mean"],
               "ratio_naive": hn["off_subspace_ratio"], "reward_lookahead": hl["reward_mean"],
               "ratio_lookahead": hl["off_subspace_ratio"]}
        table.append(row)
        run.log({"event": "naive vs lookahead", **row})
    refs = _refs(task, DEMO["objective"], DEMO["delta"]["lookahead"], DEMO["noise_std"])
    report = _write_report(run, task, DEMO["objective"],
                           {"naive (δ=0.9)": dirs["naive"], "lookahead (δ=0.2)": dirs["lookahead"]},
                           refs, "optidiff demo: naive gradient vs look-ahead guidance (subspace, f1)")
    seconds = time.perf_counter() - t0
    if print_table:
        print(f"\nsubspace task (D=64, d=16), f1 = 10 − (θᵀx − 3)², θ off-subspace "
              f"(‖θ⊥‖/‖θ∥‖ = 9); Algorithm 1, B = {DEMO['batch_size']}, DDPM {DEMO['steps']} steps")
        how = ("loaded from cache" if info["cached"]
               else f"trained in {info['pretrain_seconds']:.0f} s")
        print(f"pre-trained network: {info['parameters']} parameters, {how}")
        print(f"{'round':>5} | {'naive reward':>12} {'naive ratio':>11} | "
              f"{'look-ahead reward':>17} {'look-ahead ratio':>16}")
        step = max(1, rounds // 15)
        for row in table:
            if row["round"] % step == 0 or row["round"] == rounds:
                print(f"{row['round']:>5} | {row['reward_naive']:>12.3f} {row['ratio_naive']:>11.4f}"
                      f" | {row['reward_lookahead']:>17.3f} {row['ratio_lookahead']:>16.4f}")
        print(f"\nreferences: global max 10, regularized optimum f(x_λ*) = "
              f"{refs['f(x_λ*)']:.3f} (λ = σ_y²/δ, δ = 0.2)")
        print(f"report: {report}  ({seconds:.0f} s)")
    return DemoResult(run_dir=run.path, report=report, table=table, pretrain=info,
                      seconds=seconds)
