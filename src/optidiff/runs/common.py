"""What the run drivers share: configs checked in the command's terms, tasks and networks built
from config sections, sampling with a section's settings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import models, rng
from ..config import ConfigError, load_config
from ..sampling import sample
from ..tasks import make_task
from .rundir import RunDir, RunError

__all__ = ["build_network", "build_task", "check_resume", "draw", "save_task_figures"]


def build_task(cfg: Any, source: str) -> Any:
    """The config's task; a parameter the task rejects is a ConfigError naming ``task``."""
    try:
        return make_task(cfg.task.name, **cfg.task.params())
    except (ValueError, TypeError, RuntimeError, MemoryError) as e:
        raise ConfigError(f"{source}: task: {e}") from None


def build_network(model_cfg: Any, kind: str, task: Any, seed: int, **defaults: Any) -> nn.Module:
    """A freshly initialised network of ``kind`` for the task's data, initialised from ``seed``:
    the config's parameters over ``defaults``; the data-derived ones (the dimension or image
    shape, σ_data = the task's ``data_scale`` when it has one) from the task."""
    shape = tuple(task.input_shape)
    params = {**defaults, **model_cfg.params()}
    scale = getattr(task, "data_scale", None)
    with rng.seeded(seed):
        if kind == "unet":
            if len(shape) != 3:
                raise ConfigError(f"model.kind = 'unet' needs image data (C, H, W); task "
                                  f"{task.name!r} has samples of shape {shape}")
            return models.UNet(image_size=list(shape[1:]), in_channels=shape[0], **params)
        if kind in ("transformer", "unrolled"):
            seq = getattr(task, "sequence_shape", None)
            if seq is None:
                raise ConfigError(f"model.kind = {kind!r} needs sequence data; task {task.name!r} "
                                  "has no sequence_shape (use kind = 'timemlp')")
            if kind == "unrolled":
                params["steps"] = params.pop("unroll", 32)
                return models.UnrolledScoreNet(*seq, **params)
            if scale is not None:
                params.setdefault("sigma_data", scale)
            times = getattr(task, "times", None)
            return models.SequenceTransformer(*seq, times=None if times is None
                                              else [float(t) for t in times], **params)
        if len(shape) != 1:
            raise ConfigError(f"model.kind = {kind!r} needs vector data (D,); task {task.name!r} "
                              f"has samples of shape {shape} (use kind = 'unet')")
        if scale is not None:
            params.setdefault("sigma_data", scale)
        cls = models.TimeMLP if kind == "timemlp" else models.ConditionalMLP
        return cls(shape[0], **params)


def check_resume(run: RunDir, cfg: Any, allowed: dict[str, set[str]]) -> None:
    """On ``--resume``, the run's ``config.toml`` must equal ``cfg`` except the fields in
    ``allowed`` (section -> keys); a RunError naming the differing sections otherwise."""
    if run.fresh or not (run.path / "config.toml").is_file():
        return
    old = load_config(run.path / "config.toml").model_dump()
    new = cfg.model_dump()
    for d in (old, new):
        for section, keys in allowed.items():
            for k in keys:
                (d.get(section) or {}).pop(k, None)
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
        free = ", ".join(f"{s}.{k}" for s, ks in allowed.items() for k in sorted(ks))
        raise RunError(f"cannot --resume {run.path}: its config.toml differs in "
                       f"{', '.join(diff)} (only {free} may change)")


def draw(model: Any, sigmas: Tensor, s: dict[str, Any], *, x_init: Tensor | None = None,
         progress: bool | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Samples on ``device`` with a resolved ``[sampler]`` section ``s`` (name, batch_size,
    gamma, mu, seed, precision), returned on the CPU."""
    return sample(model, sigmas, x_init=None if x_init is None else x_init.to(device),
                  batch_size=None if x_init is not None else s["batch_size"], sampler=s["name"],
                  gamma=s.get("gamma"), mu=s.get("mu"), device=device,
                  precision=s.get("precision") or "fp32",
                  generator=torch.Generator(device).manual_seed(s["seed"]),
                  progress=progress).cpu()


def save_task_figures(run: RunDir, task: Any, x: Tensor, model: Any = None) -> None:
    """Save the figures of the task's optional ``figures(x, model)`` hook as ``plots/NAME.png``."""
    hook = getattr(task, "figures", None)
    if hook is None:
        return
    for name, fig in hook(x, model).items():
        run.save_figure(fig, name)
