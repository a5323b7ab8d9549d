"""Plug-ins named by import string, ``"package.module:attribute"`` (the convention of Python's
entry points, uvicorn and gunicorn).

A config names the user's own code this way: a network class or builder (``[model] kind``), a data
source for training (``[train] data``), a task class (``[task] name``) and an objective
(``[task] objective``); a model checkpoint names a user's registered network class the same way
(:mod:`optidiff.models.registry`). Importing a module runs its top-level code, so name only
modules you trust; nothing else is ever executed from a file (no unpickling, no ``eval``).

The ``optidiff`` commands import a config's plug-ins with the config file's directory and the
current directory at the front of the module search path (:func:`search_path`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["import_path", "is_import_path", "load_object", "search_path"]

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(value: Any) -> bool:
    """Whether ``value`` is a string of the form ``"package.module:attribute"``."""
    return isinstance(value, str) and bool(_PATH.match(value))


def load_object(spec: str, what: str = "import path") -> Any:
    """The object ``spec = "package.module:attr.sub"`` names: the module imported, then the
    attributes followed. A ValueError naming ``what`` and ``spec`` when the string is malformed,
    the module cannot be imported (whatever its code raised) or the attribute is missing."""
    if not is_import_path(spec):
        raise ValueError(f"{what}: {spec!r} is not an import path 'package.module:attribute'")
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # the user's module: any error of its import is a user error
        raise ValueError(f"{what}: cannot import module {module!r} of {spec!r}: "
                         f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def import_path(obj: Any) -> str:
    """``"module:qualname"`` of a class or function defined at module level."""
    return f"{obj.__module__}:{obj.__qualname__}"


@contextlib.contextmanager
def search_path(*dirs: str | os.PathLike) -> Iterator[None]:
    """Put ``dirs`` (resolved) at the front of ``sys.path`` for the duration, then remove those
    that were not there before."""
    added = [d for d in dict.fromkeys(str(Path(d).resolve()) for d in dirs) if d not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)
