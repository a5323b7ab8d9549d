"""The ``optidiff`` command (typer): options, messages and exit codes; the work is in
:mod:`optidiff.runs`.

Every command that does work writes a run directory and prints it when it starts. Bad input (an
invalid config, an unknown sampler, a missing or damaged checkpoint, a run directory of another
kind, ...) is reported as one ``error: ...`` line on stderr with exit code 2, never a traceback;
deprecated spellings print one ``warning: ...`` line each.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(help="optidiff: diffusion models seen through optimization. Train and sample "
                  "models, optimize objectives with them, run the demos and the benchmarks, "
                  "rebuild run reports.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)

RunDirOpt = Annotated[Path | None, typer.Option(
    "--run-dir", help="Run directory (default runs/<name>-<YYYYmmdd-HHMMSS>); an existing one is "
                      "used only by --resume of a run of the same kind.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads.")]
DeviceOpt = Annotated[str, typer.Option(
    help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")]
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Show progress bars (default: when stderr is a terminal).",
    show_default=False)]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _warn(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    typer.echo(f"warning: {message}", err=True)


def _renamed(old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value of an option renamed from ``old`` to ``new`` (the old name warns; both is an
    error)."""
    if old_value is None:
        return default if new_value is None else new_value
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning)
    if new_value is not None:
        raise ValueError(f"give {new}, not also its old name {old}")
    return old_value


@contextlib.contextmanager
def _command(threads: int | None = None) -> Iterator[None]:
    """The frame of every command: user-caused errors (ValueError and its subclasses ConfigError,
    CheckpointError, RunError; missing, unreadable or unobtainable files; a diverging loss) become
    one ``error:`` line and exit code 2; ``threads`` torch threads inside (restored afterwards,
    so commands invoked in-process, e.g. by tests, leave no trace)."""
    from .device import torch_threads

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DeprecationWarning)
            warnings.showwarning = _warn
            if threads is not None and threads < 1:
                raise ValueError(f"--threads must be >= 1, got --threads {threads}")
            with torch_threads(threads):
                yield
    except (ValueError, OSError, FloatingPointError) as e:
        text = str(e).strip()
        _fail(text.splitlines()[0] if text else type(e).__name__)


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


def _metrics_line(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {v:.5g}" for k, v in record.items()
                     if isinstance(v, float) and k not in keys)


# ---------------------------------------------------------------------------------- train

@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="TOML train config (see examples/train_toy.toml).")],
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Train a model from a TOML config.

    Validates CONFIG, trains its [model] on its [task]'s data, samples it with [sampler], and
    writes the checkpoint, metrics.jsonl, plots and report.html into the run directory."""
    from .runs.train import train_command

    with _command(threads):
        out = train_command(config, run_dir, resume=resume, progress=progress, device=device,
                            echo=typer.echo)
    typer.echo(f"{out['sampler']}-{out['steps']}: {_metrics_line(out, ('gamma', 'mu'))}")
    typer.echo(f"checkpoint: {out['checkpoint']}")
    typer.echo(f"report: {out['report']}")


# ---------------------------------------------------------------------------------- sample

@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="Checkpoint directory (or a training run directory holding one).")],
    sampler: Annotated[str, typer.Option(help="gamma_mu, ddim, ddpm, ge, dpmpp_2m, heun or "
                                         "reverse_sde.")] = "ge",
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 10,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Number of samples [default: 1000].", show_default=False)] = None,
    n: Annotated[int | None, typer.Option("--n", hidden=True)] = None,
    gamma: Annotated[float | None, typer.Option(help="γ of the (γ, μ) family.")] = None,
    mu: Annotated[float | None, typer.Option(help="μ of the (γ, μ) family.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler's noise.")] = 0,
    run_dir: RunDirOpt = None,
    out: Annotated[Path | None, typer.Option("--out", hidden=True)] = None,
    config: Annotated[Path | None, typer.Option(
        help="Config whose [schedule] to use (default: the σ table stored in the checkpoint).")
    ] = None,
    final_zero: Annotated[bool, typer.Option(
        "--final-zero/--no-final-zero", help="End at σ=0 (the denoised estimate).")] = True,
    precision: Annotated[str, typer.Option(
        help="fp32, or bf16/fp16: the network under torch.autocast.")] = "fp32",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Draw samples from a trained model.

    Loads the checkpoint, samples on its σ table, and writes the samples, a scatter plot for 2-D
    data, the task's metrics when the checkpoint's run config is known, and report.html."""
    from .runs.sample import sample_command

    with _command(threads):
        batch_size = _renamed("--n", n, "--batch-size", batch_size, 1000)
        run_dir = _renamed("--out", out, "--run-dir", run_dir, None)
        result = sample_command(checkpoint, run_dir, sampler=sampler, steps=steps,
                                batch_size=batch_size, gamma=gamma, mu=mu,
                                seed=seed, final_zero=final_zero, config=config,
                                progress=progress, device=device, precision=precision,
                                echo=typer.echo)
    typer.echo(f"samples: {result['samples']}")
    typer.echo(f"report: {result['report']}")


# ---------------------------------------------------------------------------------- report

@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="An optidiff run directory.")]) -> None:
    """Rebuild RUN_DIR/report.html.

    The page is made from what the directory holds: run.json, metrics.jsonl and plots/*.png."""
    from .report import write_report

    with _command():
        path = write_report(run_dir)
    typer.echo(f"report: {path}")


# ---------------------------------------------------------------------------------- optimize

@app.command()
def optimize(
    config: Annotated[Path, typer.Argument(help="Optimization config (TOML); see "
                                                "examples/optimize_subspace.toml and "
                                                "examples/offline_tfbind8.toml.")],
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Optimize with a diffusion model, from a config file.

    Generative optimization (Algorithm 1 or 2 of Guo et al., NeurIPS 2024; an [optimize]
    section) or offline reward maximization (a [method] section): builds the task and the model,
    runs writing every round or target to the run directory, then plots and report.html."""
    from .config import config_kind
    from .schema import read_toml

    with _command(threads):
        kind = config_kind(read_toml(config))
        if kind == "offline":
            from .runs.offline import offline_command
            summary, run = offline_command(config, run_dir, resume=resume, progress=progress,
                                           device=device, echo=typer.echo)
            typer.echo(f"{len(summary['records'])} candidate batches, "
                       f"{summary['timings']['total_s']:.0f} s")
        else:
            from .runs.optimize import optimize_command
            result, run = optimize_command(config, run_dir, resume=resume, progress=progress,
                                           device=device, echo=typer.echo)
            last = result.history[-1]
            typer.echo(f"rounds: {len(result.history) - 1}, final mean reward "
                       f"{last['reward_mean']:.4g}")
    typer.echo(f"report: {run.path / 'report.html'}")


# ---------------------------------------------------------------------------------- demos

@app.command()
def demo(
    run_dir: RunDirOpt = None,
    rounds: Annotated[int, typer.Option(help="Optimization rounds.")] = 100,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (default 1: fastest for its batches of 32).")] = 1,
    progress: ProgressOpt = None,
) -> None:
    """Naive vs look-ahead gradient guidance on the subspace task, side by side.

    Algorithm 1 of Guo et al. (NeurIPS 2024) on f1 = 10 − (θᵀx − 3)² with θ mostly off the data
    subspace: a small network (pre-trained on first use, cached) guided by NaiveGradient and by
    LookAhead (G_loss); prints reward and off-subspace ratio per round and writes a report."""
    from .runs.demo import demo as run_demo

    with _command(threads):
        if rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got --rounds {rounds}")
        run_demo(run_dir, rounds, progress=progress, device=device, echo=typer.echo)


@app.command("demo-samplers")
def demo_samplers(
    run_dir: RunDirOpt = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 4000,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Samples per sampler [default: 4000].", show_default=False)] = None,
    n: Annotated[int | None, typer.Option("--n", hidden=True)] = None,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (1 is fastest for this small model).")] = 1,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = None,
) -> None:
    """Train on a 2-D mixture; compare DDIM and GE at 10 steps.

    Trains a small model on an 8-Gaussian mixture (whose exact denoiser is known), samples it with
    DDIM and GE at 10 steps, does the same with the exact denoiser, prints a quality table and
    writes a report."""
    from .runs.demo import demo_samplers as run

    start = time.perf_counter()
    with _command(threads):
        n = _renamed("--n", n, "--batch-size", batch_size, 4000)
        rows = run(run_dir, steps=steps, n=n, progress=progress, device=device, echo=typer.echo)
    typer.echo(f"\n{'samples':<34}{'NFE':>5}{'MMD² (h=0.1)':>15}{'SW2²':>11}")
    for r in rows:
        typer.echo(f"{r['label']:<34}{r.get('nfe') or '-':>5}{r['mmd2']:>15.5f}{r['sw2']:>11.5f}")
    typer.echo(f"\nsample quality against {n} exact mixture draws (lower is better; the 'data' "
               f"row is the sampling-noise floor)")
    typer.echo(f"time: {time.perf_counter() - start:.1f} s")


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
