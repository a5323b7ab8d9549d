"""Results as data: training and optimization results written to a directory and read back.

One layout per kind, the same whether a result was saved by ``result.save(dir)`` or written along
the way by a run (``od.train(run_dir=...)``, ``od.optimize.gradient_guided(run_dir=...)``, the
``optidiff train`` and ``optidiff optimize`` commands), so every run directory loads with one call:

- training: ``checkpoint/`` (:mod:`optidiff.checkpoint`: weights, EMA weights, optimizer state,
  losses, σ table; a run's checkpoint also holds what resuming needs) —
  :meth:`TrainResult.load <optidiff.training.TrainResult.load>`;
- optimization: ``metrics.jsonl`` (one record per round), ``state/`` (the last round's samples
  and rewards, the best samples seen, the query counts), and the model reference: ``model.json``
  (where the model came from, written by the commands) or ``model/`` (a saved network) —
  :func:`optidiff.optimize.load_result`.

Nothing is unpickled: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .models.registry import load_model, model_to_config, save_model
from .plugins import import_path

__all__ = ["load_optimize_result", "load_train_result", "save_optimize_result",
           "save_train_result"]


def _fresh(directory: Path, *names: str) -> None:
    """Refuse to write into ``directory`` if it already holds any of ``names``."""
    taken = [n for n in names if (directory / n).exists()]
    if taken:
        raise FileExistsError(f"{directory} already holds {', '.join(taken)}; save to a new "
                              "directory")


# ------------------------------------------------------------------------------ training

def save_train_result(result: Any, directory: str | os.PathLike) -> Path:
    """Write ``result`` (a :class:`~optidiff.training.TrainResult`) as ``directory/checkpoint``;
    the model must be of a registered class (:func:`optidiff.models.register_model`)."""
    d = Path(directory)
    if result.run_dir is not None and d.resolve() == Path(result.run_dir).resolve():
        return d  # the run wrote its checkpoint already
    _fresh(d, "checkpoint")
    opt: dict[str, torch.Tensor] = {}
    opt_meta = ckpt.flatten_state(result.optimizer.state_dict(), opt, prefix="optim")
    tensors = {**ckpt.pack("model.", result.model.state_dict()),
               **ckpt.pack("ema.", result.ema.state_dict()), **opt,
               "losses": torch.tensor(result.losses, dtype=torch.float64)}
    ckpt.save_checkpoint(d / "checkpoint", tensors, {
        "kind": "train", "step": result.step, "optimizer": opt_meta,
        "optimizer_class": type(result.optimizer).__name__,
        "optimizer_defaults": _jsonable(result.optimizer.defaults),
        "model": model_to_config(result.model)})
    return d


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()
            if isinstance(v, (int, float, bool, str, tuple, type(None)))}


def load_train_result(run_dir: str | os.PathLike, device: torch.device | str | None = None
                      ) -> Any:
    """The :class:`~optidiff.training.TrainResult` in ``run_dir`` (a ``TrainResult.save``
    directory, an ``od.train(run_dir=...)`` directory or an ``optidiff train`` run): the model and
    EMA weights, an AdamW optimizer holding the saved state, the losses and the step."""
    from .training import TrainResult

    d = Path(run_dir)
    path = d / "checkpoint"
    tensors, meta = ckpt.load_checkpoint(path)
    if meta.get("kind") != "train":
        raise ckpt.CheckpointError(f"{str(path)!r} is not a training checkpoint")
    model = load_model(path, ema=False, device=device)
    ema = load_model(path, ema=True, device=device) if any(k.startswith("ema.") for k in tensors) \
        else model
    defaults = meta.get("optimizer_defaults") or {
        k: meta.get("settings", {}).get(k) for k in ("lr", "weight_decay")
        if meta.get("settings", {}).get(k) is not None}
    optimizer = torch.optim.AdamW(model.parameters(), **{
        k: tuple(v) if isinstance(v, list) else v for k, v in defaults.items()
        if k in ("lr", "betas", "eps", "weight_decay", "amsgrad")})
    try:
        optimizer.load_state_dict(ckpt.unflatten_state(meta["optimizer"], tensors))
    except (KeyError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{str(path)!r}: the optimizer state does not fit ({e})"
                                   ) from None
    return TrainResult(model=model, ema=ema, optimizer=optimizer,
                       losses=tensors["losses"].tolist(), step=int(meta["step"]), run_dir=d)


# -------------------------------------------------------------------------- optimization

def save_optimize_result(result: Any, directory: str | os.PathLike) -> Path:
    """Write ``result`` (an :class:`~optidiff.optimize.OptimizeResult`) into ``directory``: its
    history, samples and best samples, and its model (``model/`` for a network of a registered
    class, ``model.json`` for a reference dict). A run's own directory only gains the model."""
    d = Path(directory)
    own = result.run_dir is not None and d.resolve() == Path(result.run_dir).resolve()
    if not own:
        _fresh(d, "metrics.jsonl", "state")
        d.mkdir(parents=True, exist_ok=True)
        ckpt.write_jsonl(d / "metrics.jsonl", result.history)
        queries = result.objective.queries if result.objective is not None else {}
        ckpt.save_state(d / "state", {
            "round": result.history[-1]["round"], "z": result.samples,
            "rewards": result.rewards, "best_samples": result.best_samples,
            "best_rewards": result.best_rewards, "queries": queries},
            {"kind": "optimize", "round": result.history[-1]["round"]})
    model = result.model
    if isinstance(model, nn.Module):
        try:
            model_to_config(model)
        except ValueError:  # not a registered network (e.g. an exact denoiser): named only
            model = {"class": import_path(type(model)), "saved": False}
        else:
            if not (d / "model").exists():
                save_model(d / "model", model)
    if isinstance(model, dict) and not (d / "model.json").exists():
        ckpt.write_text(d / "model.json", json.dumps(model, indent=1, default=str))
    return d


def load_optimize_result(run_dir: str | os.PathLike, device: torch.device | str | None = None
                         ) -> Any:
    """The :class:`~optidiff.optimize.OptimizeResult` in ``run_dir`` (saved by ``result.save``,
    written by ``gradient_guided``/``adaptive`` with ``run_dir``, or an ``optidiff optimize``
    run): history, the last round's samples and rewards, the best samples, and the model — the
    saved network if the directory holds one, else the reference dict of ``model.json`` (None
    without either). ``objective`` is None: a function is not data."""
    from .optimize.gradient_guided import OptimizeResult

    d = Path(run_dir)
    if not (d / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{d} holds no optimization run (no metrics.jsonl)")
    state, meta = ckpt.load_state(d / "state")
    if meta.get("kind") != "optimize":
        raise ckpt.CheckpointError(f"{str(d / 'state')!r} is not an optimization state")
    history = [r for r in ckpt.read_jsonl(d / "metrics.jsonl")
               if isinstance(r.get("round"), int) and r["round"] <= state["round"]]
    if ckpt.has_checkpoint(d / "model"):
        model: Any = load_model(d / "model", device=device)
    elif (d / "model.json").is_file():
        model = ckpt.read_json(d / "model.json")
    else:
        model = None
    to = {"device": device or "cpu"}
    return OptimizeResult(history=history, samples=state["z"].to(**to),
                          rewards=state["rewards"].to(**to),
                          best_samples=state["best_samples"].to(**to),
                          best_rewards=state["best_rewards"].to(**to), model=model,
                          objective=None, run_dir=d)
