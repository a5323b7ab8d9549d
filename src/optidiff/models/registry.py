"""Model files: weights (safetensors) plus the constructor call (JSON), never a pickle.

A network class joins the registry with :func:`register_model` (a class decorator): it records the
arguments every instance was constructed with, exposed as ``model.config`` (JSON-able: tuples
become lists), so ``type(model)(**model.config)`` rebuilds it. :func:`model_to_config` /
:func:`model_from_config` turn a model into ``{"class": name, "config": {...}}`` and back;
optidiff's own classes are named by their class name, a user's by their import path
``"package.module:Class"``, which loading imports (:mod:`optidiff.plugins`) and then accepts only
if the class it finds is registered, so a checkpoint can never make optidiff call anything but a
registered network's constructor;
:func:`save_model` / :func:`load_model` write and read a checkpoint directory
(:mod:`optidiff.checkpoint`) holding the weights and that record.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, pack, save_checkpoint, unpack
from ..plugins import import_path, is_import_path, load_object

__all__ = ["checkpoint_sigmas", "load_model", "model_from_config", "model_to_config",
           "register_model", "save_model"]

_MODELS: dict[str, type[nn.Module]] = {}


def _key(cls: type) -> str:
    """A registered class's name in model records: optidiff's own by class name, others by
    import path."""
    return cls.__name__ if cls.__module__.split(".")[0] == "optidiff" else import_path(cls)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    return v


def register_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` loadable by name and give its instances a ``config`` (the
    constructor's arguments, defaults filled in). ``cls.__init__`` must take JSON-able arguments
    (numbers, strings, booleans, None, lists/tuples and dicts of them)."""
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is cls:  # the outermost registered class records its own call
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(list(bound.arguments.items())[1:])
            extra = arguments.pop(next((p.name for p in signature.parameters.values()
                                        if p.kind is p.VAR_KEYWORD), ""), {})
            self._init_config = _jsonable({**arguments, **extra})

    cls.__init__ = __init__
    cls.config = property(lambda self: dict(self._init_config),
                          doc="Constructor arguments (JSON-able): ``type(m)(**m.config)`` rebuilds m.")
    _MODELS[_key(cls)] = cls
    return cls


def model_to_config(model: nn.Module) -> dict[str, Any]:
    """``{"class": name, "config": model.config}`` for a registered model class."""
    name = _key(type(model))
    if _MODELS.get(name) is not type(model):
        raise ValueError(f"model class {name!r} is not registered; decorate it with "
                         "optidiff.models.register_model")
    return {"class": name, "config": model.config}


def model_from_config(config: Any, source: str = "model config") -> nn.Module:
    """A freshly initialised model from :func:`model_to_config`'s dict; a record that names no
    registered class or whose arguments the class does not take is a :class:`CheckpointError`
    naming ``source``. A class named by import path is imported first."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the model record must be a JSON object, got {config!r}")
    found = config.get("class")
    if not isinstance(found, str):
        raise CheckpointError(f"{source}: the model record names no class (got {found!r})")
    if is_import_path(found) and found not in _MODELS:
        try:
            load_object(found, "model class")  # importing the module registers its classes
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
    if found not in _MODELS:
        raise CheckpointError(f"{source}: class {found!r} is not a registered model class "
                              f"({', '.join(sorted(_MODELS))}; a class of yours must be "
                              "decorated with optidiff.models.register_model)")
    kwargs = config.get("config", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: 'config' must be a JSON object, got {kwargs!r}")
    try:
        return _MODELS[config["class"]](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build {config['class']}(**config): {e}") from None


def save_model(path: str | os.PathLike, model: nn.Module, *, schedule: Any = None) -> Path:
    """Save weights (``model.*`` tensors) and config to the checkpoint directory ``path``;
    ``schedule`` (a schedule or its σ table) is stored too, so samplers can use the model's own
    noise levels."""
    tensors = pack("model.", model.state_dict())
    if schedule is not None:
        tensors["sigmas"] = torch.as_tensor(getattr(schedule, "sigmas", schedule),
                                            dtype=torch.float64)
    return save_checkpoint(path, tensors, {"kind": "model", "model": model_to_config(model)})


def load_model(path: str | os.PathLike, *, ema: bool | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model` or a training checkpoint (``run_dir/checkpoint``),
    in eval mode. ``ema``: use the EMA weights of a training checkpoint (default: when present).
    Any mismatch between the JSON record and the tensors is a :class:`CheckpointError` naming the
    checkpoint."""
    tensors, meta = load_checkpoint(path)
    if not meta.get("model"):
        raise CheckpointError(f"checkpoint {str(path)!r} has no model record (an unregistered "
                              "model class); build the model and use load_checkpoint")
    has_ema = any(k.startswith("ema.") for k in tensors)
    if ema and not has_ema:
        raise CheckpointError(f"ema=True but checkpoint {str(path)!r} holds no EMA weights")
    model = model_from_config(meta["model"], f"checkpoint {str(path)!r}")
    try:
        model.load_state_dict(unpack(tensors, "ema." if has_ema and ema is not False else "model."))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {str(path)!r}: the weights do not fit "
                              f"{meta['model']['class']}(**config): "
                              f"{' '.join(s.strip() for s in first[:3])}") from None
    return model.to(device or "cpu").eval()


def checkpoint_sigmas(path: str | os.PathLike) -> torch.Tensor | None:
    """The σ table stored with a model or training checkpoint, if any (increasing, float64)."""
    tensors, _ = load_checkpoint(path)
    return tensors.get("sigmas")
