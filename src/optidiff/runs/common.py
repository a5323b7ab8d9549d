"""What the run drivers share: configs checked in the command's terms, tasks and networks built
from config sections, sampling with a section's settings."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import models, rng
from ..config import ConfigError, load_config
from ..plugins import load_object, search_path
from ..sampling import sample
from ..tasks import make_task
from ..tasks.base import SubspaceNetSpec
from .rundir import RunDir, RunError

__all__ = ["build_network", "build_plugin_network", "build_task", "check_resume",
           "config_plugins", "draw", "plugin", "save_task_figures"]


def build_task(cfg: Any, source: str) -> Any:
    """The config's task (None for a train config without one); a parameter the task rejects is
    a ConfigError naming ``task``."""
    if cfg.task is None:
        return None
    try:
        return make_task(cfg.task.name, **cfg.task.params())
    except (ValueError, TypeError, RuntimeError, MemoryError) as e:
        raise ConfigError(f"{source}: task: {e}") from None


def plugin(spec: str, field: str, source: str, *, call: bool = False, **kwargs: Any) -> Any:
    """The object an import path names (:mod:`optidiff.plugins`), or with ``call`` what calling it
    with ``kwargs`` returns; an import error, or whatever the user's call raises, is one
    ConfigError naming ``field``."""
    try:
        obj = load_object(spec, field)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not call:
        return obj
    try:
        return obj(**kwargs)
    except Exception as e:  # the user's code: whatever it raises is reported on the field
        raise ConfigError(f"{source}: {field}: {spec}(**{kwargs}) raised "
                          f"{type(e).__name__}: {e}") from None


def config_plugins(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a command ``command(config, ...)``: the config's plug-ins are imported with
    the config file's directory and the current directory at the front of the module path."""
    @functools.wraps(command)
    def run(config: str | Path, *args: Any, **kwargs: Any) -> Any:
        with search_path(Path(config).parent, Path.cwd()):
            return command(config, *args, **kwargs)
    return run


def build_plugin_network(model_cfg: Any, seed: int, source: str) -> nn.Module:
    """The user's network ``kind(**args)`` initialised from ``seed``; it must be an ``nn.Module``
    of a class decorated with ``optidiff.models.register_model`` (so that its checkpoints load)."""
    with rng.seeded(seed):
        net = plugin(model_cfg.kind, "model.kind", source, call=True, **(model_cfg.args or {}))
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{source}: model.kind: {model_cfg.kind} returned a "
                          f"{type(net).__name__}, not a torch.nn.Module")
    try:
        models.model_to_config(net)
    except ValueError as e:
        raise ConfigError(f"{source}: model.kind: {e}") from None
    return net


def build_network(model_cfg: Any, kind: str, task: Any, seed: int, **defaults: Any) -> nn.Module:
    """A freshly initialised network of ``kind`` for the task's data, initialised from ``seed``:
    the config's parameters over ``defaults``; the data-derived ones (the dimension or image
    shape, σ_data = the task's ``data_scale`` when it has one) from the task."""
    shape = tuple(task.input_shape)
    params = {**defaults, **model_cfg.params()}
    scale = getattr(task, "data_scale", None)
    with rng.seeded(seed):
        if kind == "subspace_net":
            try:
                return SubspaceNetSpec(**params).network(task)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"model: {e}") from None
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
