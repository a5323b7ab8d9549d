"""Checkpoints: safetensors for tensors, JSON for everything else; atomic writes, no pickle.

Layout: a checkpoint is a **directory** ``path/`` holding

- ``tensors-<token>.safetensors``: every tensor (flat names such as ``model.net.0.weight``);
- ``meta.json``: ``{"format": "optidiff-checkpoint", "version": 1, "tensors": "<file name>",
  "sha256": "<digest of that file>", "meta": {...caller's JSON...}}``.

``meta.json`` is the commit record. A save writes the new tensor file under a fresh name, then
replaces ``meta.json`` (each through a temporary file in the same directory, fsync, ``os.replace``),
then deletes tensor files that ``meta.json`` no longer names. A crash at any point leaves either the
old or the new checkpoint, complete. Loading uses ``json.load`` and ``safetensors.torch.load`` only;
anything wrong (missing file, bad JSON, wrong format version, digest mismatch, bad safetensors
header, truncation, missing keys) raises :class:`CheckpointError` naming the path.

Helpers flatten what training must resume exactly into the flat tensor dict: module state_dicts
(:func:`pack`/:func:`unpack`), optimizer state_dicts (:func:`optimizer_to_tensors`/
:func:`optimizer_from_tensors`) and ``torch.Generator`` states (uint8 tensors,
``Generator.get_state``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "has_checkpoint", "pack",
           "unpack", "optimizer_to_tensors", "optimizer_from_tensors", "set_generator_state"]

FORMAT = "optidiff-checkpoint"
VERSION = 1
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, truncated or of an unsupported format."""


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # persist the rename (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Save ``tensors`` (copied to CPU, contiguous) and JSON-able ``meta`` atomically to the
    directory ``path`` (created if needed; an existing checkpoint there is replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a directory for a checkpoint, got the file {str(path)!r}")
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ValueError(f"tensors must map str to Tensor, got {k!r}: {type(v).__name__}")
    try:
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable (no NaN/inf): {e}") from None
    path.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                    for k, v in tensors.items()}, metadata={"format": FORMAT})
    name = f"tensors-{uuid.uuid4().hex[:16]}.safetensors"
    _write_atomic(path / name, blob)
    record = {"format": FORMAT, "version": VERSION, "tensors": name,
              "sha256": hashlib.sha256(blob).hexdigest(), "meta": json.loads(meta_json)}
    _write_atomic(path / META_FILE, json.dumps(record, indent=1).encode())
    for old in path.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a committed checkpoint (its ``meta.json`` exists)."""
    return (Path(path) / META_FILE).is_file()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Load ``(tensors, meta)`` saved by :func:`save_checkpoint`; raise :class:`CheckpointError`
    with the path and the problem when anything is missing or corrupted."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: {META_FILE} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted checkpoint {str(meta_path)!r}: invalid JSON "
                              f"({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{str(meta_path)!r} is not an optidiff checkpoint "
                              f"(format {found!r}, expected {FORMAT!r})")
    if record.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{record.get('version')!r}; this optidiff reads version {VERSION}")
    missing = [k for k in ("tensors", "sha256", "meta") if k not in record]
    if missing:
        raise CheckpointError(f"corrupted checkpoint {str(meta_path)!r}: missing keys {missing}")
    tensor_path = path / Path(str(record["tensors"])).name
    try:
        blob = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint {str(path)!r}: tensor file "
                              f"{tensor_path.name!r} is missing") from None
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise CheckpointError(f"corrupted checkpoint {str(tensor_path)!r}: SHA-256 digest does not "
                              f"match {META_FILE} (file truncated or modified)")
    try:
        tensors = st_load(blob)
    except SafetensorError as e:
        raise CheckpointError(f"corrupted checkpoint {str(tensor_path)!r}: {e}") from None
    return tensors, record["meta"]


def pack(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{prefix + name: tensor}`` for a module state_dict."""
    return {prefix + k: v for k, v in state.items()}


def unpack(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` under ``prefix``, prefix removed (inverse of :func:`pack`)."""
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"checkpoint has no tensors under {prefix!r}")
    return out


def optimizer_to_tensors(state_dict: dict,
                         prefix: str = "optim.") -> tuple[dict[str, Tensor], dict]:
    """Flatten an optimizer state_dict: per-parameter tensors (AdamW: ``step``, ``exp_avg``,
    ``exp_avg_sq``) become ``{prefix}{index}.{name}``; param_groups and non-tensor state go to a
    JSON-able dict."""
    tensors: dict[str, Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, st in state_dict["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}{idx}.{name}"] = v
            else:
                other.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": state_dict["param_groups"], "state": other}


def optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict, prefix: str = "optim.") -> dict:
    """Inverse of :func:`optimizer_to_tensors`. JSON turns tuples into lists; list-valued
    hyperparameters other than ``params`` (``betas``) are turned back into tuples."""
    try:
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
        groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v)
                   for k, v in g.items()} for g in meta["param_groups"]]
        for key, v in tensors.items():
            if key.startswith(prefix):
                idx, name = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[name] = v
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"malformed optimizer state in checkpoint: {e!r}") from None
    return {"state": state, "param_groups": groups}


def set_generator_state(generator: torch.Generator, state: Tensor) -> None:
    """``generator.set_state(state)``; a state of the wrong kind is a :class:`CheckpointError`."""
    try:
        generator.set_state(state.to(torch.uint8).cpu())
    except RuntimeError as e:
        raise CheckpointError(f"generator state does not fit a {generator.device} generator: "
                              f"{e}") from None
