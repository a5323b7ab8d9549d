"""``optidiff sample``: draw samples from a saved model into a new run directory.

The σ grid comes from ``--config``'s ``[schedule]`` if given, else from the σ table stored in the
checkpoint (every training checkpoint has one; :func:`optidiff.save_model` stores it when given a
schedule); a checkpoint without one needs ``--config``. When the checkpoint belongs to a training
run (its ``config.toml`` is known), the samples are scored with that run's task metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import has_checkpoint
from ..config import build_schedule, load_config
from ..device import resolve_device
from ..models.registry import checkpoint_sigmas, load_model
from ..plugins import search_path
from ..report import scatter_figure
from ..sampling import resolve_sampler
from ..schedules import Schedule
from .common import build_task, draw, save_task_figures
from .rundir import RunDir, RunError

__all__ = ["sample_command"]


def _find_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint directory, config.toml of its run or None); accepts a run directory too."""
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not has_checkpoint(path):
        raise RunError(f"--checkpoint {path}: no checkpoint there (a checkpoint directory holds "
                       "meta.json; a training run directory holds checkpoint/)")
    cfg = path.parent / "config.toml"
    return path, cfg if cfg.is_file() else None


def sample_command(checkpoint: str | Path, run_dir: str | Path | None = None, *,
                   sampler: str = "ge", steps: int = 10, batch_size: int = 1000,
                   gamma: float | None = None, mu: float | None = None, seed: int = 0,
                   final_zero: bool = True, config: str | Path | None = None,
                   progress: bool | None = None, device: str = "auto", precision: str = "fp32",
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Load the checkpoint, sample, and write samples, metrics, a scatter plot for 2-D data and
    the report into a fresh ``sample`` run directory. Returns the record with the paths. A model
    class of yours named by the checkpoint is imported with the current directory (and the
    config's) on the module path."""
    with search_path(Path.cwd(), *([Path(config).parent] if config is not None else [])):
        if steps < 1 or batch_size < 1:
            raise RunError(f"--steps and --batch-size must be >= 1, got --steps {steps}, "
                           f"--batch-size {batch_size}")
        dev = resolve_device(device)
        ckpt, found = _find_checkpoint(Path(checkpoint))
        cfg_path = Path(config) if config is not None else found
        cfg = load_config(cfg_path) if cfg_path is not None else None
        if cfg is not None and getattr(cfg, "schedule", None) is not None and config is not None:
            schedule, origin = build_schedule(cfg.schedule), f"[schedule] of {cfg_path}"
        else:
            table = checkpoint_sigmas(ckpt)
            if table is None:
                raise RunError(f"--checkpoint {ckpt} stores no σ table; pass --config with the "
                               "[schedule] the model was trained on")
            schedule, origin = Schedule(table), f"the σ table of {ckpt}"
        model = load_model(ckpt, device=dev)
        run = RunDir.prepare("sample", "sample", run_dir)
        task = build_task(cfg, str(cfg_path)) if cfg is not None and hasattr(cfg, "task") else None
        if task is not None and tuple(task.input_shape) != tuple(getattr(model, "input_shape", ())):
            task = None  # a config of another problem: no metrics
        s = {"name": sampler, "batch_size": batch_size, "gamma": gamma, "mu": mu, "seed": seed,
             "precision": precision}
        resolve_sampler(sampler, gamma, mu)  # a bad option is refused before the run starts
        sigmas = schedule.sample_sigmas(steps, final_zero=final_zero)
        run.start(title=f"optidiff sample: {ckpt}", command=f"optidiff sample --checkpoint {ckpt}")
        echo(f"run directory: {run.path}")
        echo(f"schedule: {schedule} (from {origin})")
        x = draw(model, sigmas, s, progress=progress, device=dev)
        record = run.log(event="sample", checkpoint=str(ckpt), sampler=sampler, gamma=gamma, mu=mu,
                         steps=steps, batch_size=batch_size, seed=seed,
                         **(task.metrics(x) if task is not None else {}))
        path = run.save_samples(f"{sampler}-{steps}", x)
        if x.ndim == 2 and x.shape[1] == 2:
            run.save_figure(scatter_figure({f"{sampler}, {steps} steps": x}), "samples")
        if task is not None:
            save_task_figures(run, task, x, model)
        return {**record, "samples": path, "run_dir": run.path, "report": run.write_report()}
