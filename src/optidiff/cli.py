"""The ``optidiff`` command (typer): train, sample, report, demo, bench.

Every command that does work writes a run directory (see :mod:`optidiff.report`) and prints where
it is. Bad input (an invalid config, an unknown sampler, a missing checkpoint, ...) is reported as
one ``error: ...`` line on stderr with exit code 2, never a traceback. Library modules are
imported inside the commands (matplotlib, safetensors and the training code only when needed).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from torch import Tensor

    from .config import RunConfig
    from .report import RunDir

app = typer.Typer(help="optidiff: diffusion models seen through optimization. Train and sample "
                  "toy models, run the demo and the benchmarks, rebuild run reports.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

#: RBF bandwidth of the sample-quality MMD² (the toy mixture's component standard deviation)
MMD_BANDWIDTH = 0.1

RunDirOpt = Annotated[Path | None, typer.Option(
    "--run-dir", help="Run directory (default runs/<name>-<YYYYmmdd-HHMMSS>).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Library errors (ValueError and its subclasses ConfigError, CheckpointError; missing or
    unwritable files; a diverging loss) become one line and exit code 2."""
    try:
        yield
    except (ValueError, OSError, FloatingPointError) as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch CPU threads inside the block (restored afterwards, so commands invoked
    in-process, e.g. by tests, leave no trace)."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"optidiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          ) -> None:
    """optidiff: diffusion models seen through optimization."""


# ---------------------------------------------------------------------------------- helpers

def quality(x: Tensor, ref: Tensor, seed: int = 0) -> dict[str, float]:
    """Sample quality against reference samples: unbiased MMD² (RBF kernel, bandwidth
    :data:`MMD_BANDWIDTH`) and sliced W2² (256 directions); both 0 for equal laws."""
    import torch

    from .metrics import mmd_rbf, sliced_wasserstein

    g = torch.Generator().manual_seed(seed)
    return {"mmd2": mmd_rbf(x, ref, MMD_BANDWIDTH).item(),
            "sw2": sliced_wasserstein(x, ref, n_proj=256, generator=g).item()}


def _build_model(cfg: RunConfig, dim: int):
    """A TimeMLP initialised from ``train.seed`` (the global RNG state is restored afterwards)."""
    import torch

    from .models import TimeMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return TimeMLP(dim, hidden=cfg.model.hidden, depth=cfg.model.depth,
                       emb_dim=cfg.model.emb_dim)


def train_run(cfg: RunConfig, run: RunDir, *, resume: bool = False, progress: bool = True):
    """Train the config's TimeMLP on its toy data in ``run`` (checkpoint, metrics.jsonl, loss
    plot). Returns the EMA model."""
    from .config import build_schedule
    from .report import loss_figure
    from .tasks.toy2d import make_data
    from .training import train

    data = make_data(cfg.data.name, cfg.data.n, cfg.data.seed)
    t = cfg.train
    result = train(_build_model(cfg, data.shape[1]), data, steps=t.steps,
                   batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                   schedule=build_schedule(cfg.schedule), ema_decay=t.ema_decay,
                   grad_clip=t.grad_clip, seed=t.seed, run_dir=run.path,
                   checkpoint_every=t.checkpoint_every, resume=resume, progress=progress,
                   log_every=t.log_every)
    run.save_figure(loss_figure(result.losses), "loss")
    return result.ema.eval()


def _sample(model: Any, sigmas: Tensor, sampler: str, *, x_init: Tensor | None = None,
            n: int | None = None, gamma: float | None = None, mu: float | None = None,
            seed: int = 0, progress: bool = False) -> Tensor:
    import torch

    from .sampling import sample

    return sample(model, sigmas, x_init=x_init, batch_size=None if x_init is not None else n,
                  sampler=sampler, gamma=gamma, mu=mu,
                  generator=torch.Generator().manual_seed(seed), progress=progress)


def _print_table(rows: list[dict[str, Any]]) -> None:
    typer.echo(f"{'samples':<34}{'NFE':>5}{'MMD² (h=0.1)':>15}{'SW2²':>11}")
    for r in rows:
        typer.echo(f"{r['label']:<34}{r.get('nfe') or '-':>5}{r['mmd2']:>15.5f}{r['sw2']:>11.5f}")


# ---------------------------------------------------------------------------------- train

def _check_run_dir(run_dir: Path | None, cfg: RunConfig, resume: bool) -> None:
    """Refuse, before anything is written, to overwrite a trained run or to resume a run with a
    different configuration (only ``train.steps`` may change)."""
    from .checkpoint import has_checkpoint
    from .config import ConfigError, load_config

    if run_dir is None:
        if resume:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        return
    if not has_checkpoint(run_dir / "checkpoint"):
        return
    if not resume:
        raise ValueError(f"{run_dir} already holds a checkpoint; pass --resume to continue it "
                         f"or choose another --run-dir")
    if (run_dir / "config.toml").is_file():
        old = load_config(run_dir / "config.toml")
        old_d, new_d = old.model_dump(), cfg.model_dump()
        old_d["train"].pop("steps"), new_d["train"].pop("steps")
        diff = [k for k in new_d if old_d[k] != new_d[k]]
        if diff:
            raise ConfigError(f"cannot resume {run_dir}: its config.toml differs in "
                              f"{', '.join(diff)} (only train.steps may change)")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="TOML run configuration "
                                           "(see examples/train_toy.toml).")],
    run_dir: RunDirOpt = None,
    resume: Annotated[bool, typer.Option("--resume",
                                         help="Continue the checkpoint in --run-dir.")] = False,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Train a model from a TOML config.

    Validates CONFIG, trains a TimeMLP on its toy 2-D data, samples it with the [sample] sampler,
    and writes the checkpoint, metrics.jsonl, plots and report.html into the run directory."""
    from .config import build_schedule, load_config
    from .report import RunDir, scatter_figure
    from .tasks.toy2d import make_data

    with _clean_errors(), _threads(threads):
        cfg = load_config(config)
        _check_run_dir(run_dir, cfg, resume)
        run = RunDir.create(cfg.name, path=run_dir, title=f"optidiff train: {cfg.name}",
                            command=" ".join(["optidiff", *sys.argv[1:]]))
        run.copy_config(config)
        typer.echo(f"run directory: {run.path}")
        model = train_run(cfg, run, resume=resume, progress=progress)
        s = cfg.sample
        x = _sample(model, build_schedule(cfg.schedule).sample_sigmas(s.steps,
                                                                      final_zero=s.final_zero),
                    s.sampler, n=s.n, gamma=s.gamma, mu=s.mu, seed=s.seed, progress=progress)
        ref = make_data(cfg.data.name, s.n, cfg.data.seed + 1)
        q = quality(x, ref)
        run.log(event="sample", sampler=s.sampler, gamma=s.gamma, mu=s.mu, steps=s.steps, n=s.n,
                seed=s.seed, **q)
        run.save_samples(f"{s.sampler}-{s.steps}", x)
        run.save_figure(scatter_figure({f"data ({cfg.data.name})": ref,
                                        f"{s.sampler}, {s.steps} steps": x}), "samples")
        report = run.write_report()
    typer.echo(f"{s.sampler}-{s.steps}: MMD² {q['mmd2']:.5f}, SW2² {q['sw2']:.5f}")
    typer.echo(f"checkpoint: {run.path / 'checkpoint'}")
    typer.echo(f"report: {report}")


# ---------------------------------------------------------------------------------- sample

def _find_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint directory, config.toml of its run or None); accepts a run directory too."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    cfg = path.parent / "config.toml"
    return path, cfg if cfg.is_file() else None


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="Checkpoint directory (or a run directory holding one).")],
    sampler: Annotated[str, typer.Option(help="gamma_mu, ddim, ddpm, ge, dpmpp_2m, heun or "
                                         "reverse_sde.")] = "ge",
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 10,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 1000,
    gamma: Annotated[float | None, typer.Option(help="γ of the (γ, μ) family.")] = None,
    mu: Annotated[float | None, typer.Option(help="μ of the (γ, μ) family.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler's noise.")] = 0,
    out: Annotated[Path | None, typer.Option(
        help="Output run directory (default runs/sample-<time>).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="Config whose [schedule] (and [data], for metrics) to use; default: the run's "
             "config.toml, else a log-linear schedule 0.01–10.")] = None,
    final_zero: Annotated[bool, typer.Option(
        "--final-zero/--no-final-zero", help="End at σ=0 (the denoised estimate).")] = True,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Draw samples from a trained model.

    Loads the checkpoint (load_model), samples, and writes the samples, a scatter plot for 2-D
    data, metrics against the training data when the run's config is known, and report.html."""
    from .config import RunConfig, build_schedule, load_config
    from .report import RunDir, scatter_figure
    from .tasks.toy2d import make_data
    from .training import load_model

    with _clean_errors(), _threads(threads):
        if steps < 1 or n < 1:
            raise ValueError(f"--steps and --n must be >= 1, got --steps {steps}, --n {n}")
        ckpt, found = _find_checkpoint(checkpoint)
        cfg_path = config or found
        cfg = load_config(cfg_path) if cfg_path else RunConfig()
        model = load_model(ckpt)
        schedule = build_schedule(cfg.schedule)
        typer.echo(f"schedule: {schedule}" + (f" (from {cfg_path})" if cfg_path else " (default)"))
        x = _sample(model, schedule.sample_sigmas(steps, final_zero=final_zero), sampler, n=n,
                    gamma=gamma, mu=mu, seed=seed, progress=progress)
        record = {"event": "sample", "checkpoint": str(ckpt), "sampler": sampler, "gamma": gamma,
                  "mu": mu, "steps": steps, "n": n, "seed": seed}
        if cfg_path and x.ndim == 2 and x.shape[1] == 2:
            record.update(quality(x, make_data(cfg.data.name, n, cfg.data.seed + 1)))
        # the run directory is made only now: a bad option leaves nothing behind
        run = RunDir.create("sample", path=out, title=f"optidiff sample: {ckpt}",
                            command=" ".join(["optidiff", *sys.argv[1:]]))
        if cfg_path:
            run.copy_config(cfg_path)
        run.log(record)
        path = run.save_samples(f"{sampler}-{steps}", x)
        if x.ndim == 2 and x.shape[1] == 2:
            run.save_figure(scatter_figure({f"{sampler}, {steps} steps": x}), "samples")
        report = run.write_report()
    typer.echo(f"samples: {path}")
    typer.echo(f"report: {report}")


# ---------------------------------------------------------------------------------- report

@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Rebuild RUN_DIR/report.html.

    The page is made from what the directory holds: metrics.jsonl and plots/*.png."""
    from .report import write_report

    with _clean_errors():
        path = write_report(run_dir)
    typer.echo(f"report: {path}")


# ---------------------------------------------------------------------------------- demo

def demo_config(steps: int, n: int) -> RunConfig:
    """The demo's run: TimeMLP 128×3 on the 8-Gaussian mixture, log-linear σ ∈ [0.01, 10]."""
    from .config import parse_config

    return parse_config({"name": "demo",
                         "data": {"name": "gaussian_mixture", "n": 50_000, "seed": 0},
                         "model": {"hidden": 128, "depth": 3, "emb_dim": 64},
                         "schedule": {"kind": "loglinear", "sigma_min": 0.01, "sigma_max": 10.0},
                         "train": {"steps": steps, "batch_size": 512, "lr": 1e-3,
                                   "ema_decay": 0.995, "seed": 0,
                                   "log_every": max(1, min(100, steps // 10))},
                         "sample": {"sampler": "ge", "steps": 10, "n": n, "seed": 0}}, "demo")


@app.command()
def optimize(
    config: Annotated[Path, typer.Argument(help="Optimization config (TOML); see "
                                                "examples/optimize_subspace.toml.")],
    run_dir: RunDirOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Generative optimization (Algorithm 1 or 2 of seed 000) from a config file.

    Builds the task and the model (pre-trained and cached, loaded from a checkpoint, or exact),
    runs the rounds writing each to the run directory, then writes plots and report.html."""
    from .runs import run_optimize

    with _clean_errors():
        if _is_offline_config(config):
            _run_offline(config, run_dir, progress)
            return
        result, run = run_optimize(config, run_dir, resume=resume, progress=progress)
    last = result.history[-1]
    typer.echo(f"rounds: {len(result.history) - 1}, final mean reward {last['reward_mean']:.4g}")
    typer.echo(f"run directory: {run.path}")
    typer.echo(f"report: {run.path / 'report.html'}")


def _is_offline_config(config: Path) -> bool:
    """Offline reward maximization (seed 002) configs have a ``[method]`` section; generative
    optimization (seed 000) configs an ``[optimize]`` section."""
    from .config import read_toml

    return "method" in read_toml(config)


def _run_offline(config: Path, run_dir: Path | None, progress: bool) -> None:
    from .optimize.offline import load_offline_config, run_offline
    from .report import RunDir

    cfg = load_offline_config(config)
    run = RunDir.create(cfg.name, path=run_dir, title=f"optidiff optimize (offline): {cfg.name}",
                        command=f"optidiff optimize {config}")
    summary = run_offline(cfg, run.path, progress=progress)
    typer.echo(json.dumps(summary.get("timings", {}), indent=1))
    typer.echo(f"run directory: {run.path}")


@app.command()
def demo(
    run_dir: RunDirOpt = None,
    rounds: Annotated[int, typer.Option(help="Optimization rounds.")] = 30,
    progress: ProgressOpt = True,
) -> None:
    """Naive vs look-ahead gradient guidance on the subspace task, side by side.

    Algorithm 1 of seed 000 on f1 = 10 − (θᵀx − 3)² with θ mostly off the data subspace: a small
    network (pre-trained on first use, cached) guided by NaiveGradient and by LookAhead (G_loss);
    prints reward and off-subspace ratio per round and writes a report."""
    from .runs import demo as run_demo

    with _clean_errors():
        run_demo(run_dir, rounds, progress=progress)  # prints the table and the report's path


@app.command("demo-samplers")
def demo_samplers(
    run_dir: RunDirOpt = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 4000,
    n: Annotated[int, typer.Option("--n", help="Samples per sampler.")] = 4000,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (1 is fastest for this small model).")] = 1,
    progress: ProgressOpt = True,
) -> None:
    """Train on a 2-D mixture; compare DDIM and GE at 10 steps.

    Trains a small model on an 8-Gaussian mixture (whose exact denoiser is known), samples it with
    DDIM and GE at 10 steps, does the same with the exact denoiser, prints a quality table and
    writes a report."""
    import torch

    from .config import build_schedule, dump_toml
    from .report import RunDir, scatter_figure
    from .tasks.toy2d import gaussian_mixture, gaussian_mixture_denoiser

    start = time.perf_counter()
    with _clean_errors(), _threads(threads):
        cfg = demo_config(steps, n)
        run = RunDir.create("demo", path=run_dir, title="optidiff demo: DDIM vs GE at 10 steps",
                            command=" ".join(["optidiff", *sys.argv[1:]]))
        run.write_text("config.toml", dump_toml(cfg))
        typer.echo(f"run directory: {run.path}")
        model = train_run(cfg, run, progress=progress)
        schedule = build_schedule(cfg.schedule)
        g = torch.Generator().manual_seed(cfg.sample.seed)
        x_init = schedule.sigmas[-1].item() * torch.randn(n, 2, generator=g)  # shared by all
        exact = gaussian_mixture_denoiser()
        ref = gaussian_mixture(n, cfg.data.seed + 1)
        runs = [("data: exact mixture draws", None, None, None),
                ("trained, DDIM", model, "ddim", 10), ("trained, GE (γ=2)", model, "ge", 10),
                ("exact denoiser, DDIM", exact, "ddim", 10),
                ("exact denoiser, GE (γ=2)", exact, "ge", 10),
                ("exact denoiser, DDIM (reference)", exact, "ddim", 200)]
        rows, xs = [], {}
        for label, m, sampler, k in runs:
            if m is None:
                x = gaussian_mixture(n, cfg.data.seed + 2)
            else:
                x0 = x_init.double() if m is exact else x_init
                x = _sample(m, schedule.sample_sigmas(k, final_zero=True), sampler,
                            x_init=x0).float()
                run.save_samples(f"{'exact' if m is exact else 'trained'}-{sampler}-{k}", x)
            xs[label] = x
            rows.append(run.log(event="sample", label=label, sampler=sampler, nfe=k,
                                **quality(x, ref)))
        run.save_figure(scatter_figure({"data": xs[runs[0][0]], "DDIM, 10 steps":
                                        xs[runs[1][0]], "GE, 10 steps": xs[runs[2][0]]},
                                       title="trained model"), "1_trained")
        run.save_figure(scatter_figure({"DDIM, 10 steps": xs[runs[3][0]], "GE, 10 steps":
                                        xs[runs[4][0]], "DDIM, 200 steps": xs[runs[5][0]]},
                                       title="exact denoiser"), "2_exact")
        report = run.write_report()
    typer.echo("")
    _print_table(rows)
    typer.echo(f"\nsample quality against {n} exact mixture draws (lower is better; the 'data' "
               f"row is the sampling-noise floor)")
    typer.echo(f"time: {time.perf_counter() - start:.1f} s")
    typer.echo(f"report: {report}")


# ---------------------------------------------------------------------------------- bench

def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source tree (the repository holding ``src/optidiff``)."""
    import optidiff

    return Path(optidiff.__file__).resolve().parents[2] / "benchmarks"


def benchmark_names(folder: Path) -> list[str]:
    """Scripts in ``folder`` that run as programs (they have a ``__main__`` block)."""
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_")
                  and "__main__" in p.read_text(encoding="utf-8", errors="replace"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          name: Annotated[str, typer.Argument(help="Benchmark name (benchmarks/NAME.py) or "
                                              "'all'.")]) -> None:
    """Run a benchmark script (or all).

    Runs benchmarks/NAME.py of the source tree; further arguments (e.g. --quick) are passed to
    the script(s)."""
    folder = benchmarks_dir()
    if not folder.is_dir():
        _fail(f"no benchmarks folder at {folder}: `optidiff bench` needs a source checkout "
              f"(pip install -e .)")
    names = benchmark_names(folder)
    if name != "all" and name not in names:
        _fail(f"unknown benchmark {name!r}; choose one of {', '.join(names) or '(none)'} or 'all'")
    failed: list[str] = []
    for b in names if name == "all" else [name]:
        cmd = [sys.executable, str(folder / f"{b}.py"), *ctx.args]
        typer.echo(f"$ {' '.join(cmd)}", err=True)
        if subprocess.run(cmd, cwd=folder.parent, check=False).returncode != 0:
            failed.append(b)
    if failed:
        typer.echo(f"error: benchmark(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
