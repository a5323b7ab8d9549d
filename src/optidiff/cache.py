"""The cache of trained models and fetched data: one root directory, one mechanism.

The root is ``$OPTIDIFF_CACHE`` if set, else ``~/.cache/optidiff``. A cached model lives in
``<root>/<kind>-<hash of its recipe>/``, a checkpoint (:mod:`optidiff.checkpoint`) whose meta
records the recipe and what training reported (times, losses), so a changed recipe is a different
entry and never loads a stale model. Data files fetched by a data step (e.g. the TFBind8 source
file) live in ``<root>/<name>/``; a data step that cannot obtain its file raises
:class:`DataError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import has_checkpoint, load_checkpoint, pack, save_checkpoint
from .models.registry import load_model, model_to_config

__all__ = ["DataError", "cache_root", "cached", "recipe_key"]


class DataError(OSError):
    """Data a task needs cannot be obtained (no network, a file that does not verify, …)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$OPTIDIFF_CACHE``, else ``~/.cache/optidiff``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("OPTIDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "optidiff"


def recipe_key(recipe: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the recipe's canonical JSON."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cached(kind: str, recipe: dict[str, Any], build: Callable[[], tuple[nn.Module, dict[str, Any]]],
           *, cache_dir: str | os.PathLike | None = None, retrain: bool = False,
           use_cache: bool = True) -> nn.Module:
    """The model of ``recipe``: loaded from ``<root>/<kind>-<recipe_key(recipe)>`` when present,
    else built by ``build() -> (model, info)`` (typically: train it) and saved there.

    The model comes back in eval mode without gradients, with ``model.train_info`` = the recipe and
    ``info`` (plus ``"cached": True`` when it was loaded). ``retrain=True`` builds again and
    replaces the entry; ``use_cache=False`` builds without reading or writing the cache.
    """
    path = cache_root(cache_dir) / f"{kind}-{recipe_key(recipe)}"
    if use_cache and not retrain and has_checkpoint(path):
        model = load_model(path).requires_grad_(False)
        model.train_info = {**load_checkpoint(path)[1].get("info", {}), "cached": True}
        return model
    model, info = build()
    info = {"recipe": recipe, **info}
    if use_cache:
        save_checkpoint(path, pack("model.", model.state_dict()),
                        {"kind": "model", "model": model_to_config(model), "info": info})
    model.eval().requires_grad_(False)
    model.train_info = {**info, "cached": False}
    return model
