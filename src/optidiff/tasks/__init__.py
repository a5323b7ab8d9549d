"""Problems: data, objectives, metrics and references, behind one protocol and one registry.

:data:`TASKS` maps a task name (the ``[task] name`` of a config) to the import path of its class
(imported on first use, so ``import optidiff.tasks`` stays light); :func:`task_class` resolves a
name, :func:`make_task` builds an instance from its parameters, and :func:`register_task` adds a
task defined elsewhere. The protocols are :class:`~optidiff.tasks.base.Task` and
:class:`~optidiff.tasks.base.OfflineTask`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..plugins import is_import_path, load_object
from . import toy2d

__all__ = ["TASKS", "make_task", "register_task", "task_class", "toy2d"]

TASKS: dict[str, str | type] = {
    "subspace": "optidiff.tasks.subspace:SubspaceTask",
    "sphere": "optidiff.tasks.sphere:SphereTask",
    "toy2d": "optidiff.tasks.toy2d:Toy2DTask",
    "digits": "optidiff.tasks.digits:DigitsTask",
    "linear_subspace": "optidiff.tasks.subspace:LinearSubspaceTask",
    "tfbind8": "optidiff.tasks.tfbind8:TFBind8Task",
    "gp": "optidiff.tasks.gp:GPTask",
    "ehrlich": "optidiff.tasks.ehrlich:EhrlichTask",
}


def register_task(name: str, cls: str | type) -> None:
    """Register a task class (or its ``"module:attribute"`` import path) under ``name``."""
    TASKS[name] = cls


def task_class(name: str) -> type:
    """The class registered as ``name``, or the class an import path ``"package.module:Class"``
    names (a task of your own, see :mod:`optidiff.plugins`); a ValueError otherwise."""
    if name not in TASKS:
        if not is_import_path(name):
            raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
        cls = load_object(name, "name")
        if not isinstance(cls, type):
            raise ValueError(f"task: {name!r} is a {type(cls).__name__}, not a task class")
        return cls
    target = TASKS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = TASKS[name] = getattr(importlib.import_module(module), attr)
    return target


def make_task(name: str, **params: Any) -> Any:
    """An instance of task ``name`` built from its parameters (the dataclass fields)."""
    return task_class(name)(**params)
