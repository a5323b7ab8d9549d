"""The one on-disk format: safetensors for tensors, JSON for everything else; atomic, no pickle.

A **checkpoint** (models, training state, optimization state) is a directory ``path/`` holding

- ``tensors-<token>.safetensors``: every tensor (flat names such as ``model.net.0.weight``);
- ``meta.json``: ``{"format": "optidiff-checkpoint", "version": 1, "tensors": "<file name>",
  "sha256": "<digest of that file>", "meta": {...caller's JSON...}}``.

``meta.json`` is the commit record. A save writes the new tensor file under a fresh name, then
replaces ``meta.json`` (each through a temporary file in the same directory, fsync, ``os.replace``,
fsync of the directory), then deletes tensor files that ``meta.json`` no longer names and the
temporary files a killed save left behind. A crash at any point leaves either the old or the new
checkpoint, complete. Loading uses ``json`` and ``safetensors`` only; anything wrong (missing file,
bad JSON, wrong format version, digest mismatch, bad safetensors header, truncation, missing keys)
raises :class:`CheckpointError` naming the path.

Nested state (an optimizer's ``state_dict()``, a generator state, counters) goes into a checkpoint
with :func:`save_state` / :func:`load_state`: :func:`flatten_state` splits it into a JSON skeleton,
in which each tensor is replaced by ``{"__tensor__": key}``, and a flat ``{key: tensor}`` dict
(dicts with non-string keys and tuples are tagged so they come back with their types).

Run files: :func:`save_tensors` / :func:`load_tensors` (one safetensors file, atomic),
:func:`write_text` (atomic), and the metrics log, one JSON record per line: :func:`append_jsonl`
(fsync'd) and :func:`read_jsonl`, the one reader, which drops a half-written last line (a kill
during an append) and names the file and line of any other bad line.
"""

from __future__ import annotations

import contextlib
import glob
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

__all__ = ["CheckpointError", "append_jsonl", "flatten_state", "has_checkpoint",
           "load_checkpoint", "load_state", "load_tensors", "pack", "read_json", "read_jsonl",
           "save_checkpoint", "save_state", "save_tensors", "set_generator_state",
           "unflatten_state", "unpack", "write_bytes", "write_jsonl", "write_text"]

FORMAT = "optidiff-checkpoint"
VERSION = 1
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint or run file is missing, corrupted, truncated or of an unsupported format."""


# ------------------------------------------------------------------------------ atomic writes

def _fsync_dir(directory: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # persist the rename (POSIX)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temporaries(directory: Path, name: str) -> None:
    """Delete the temporary files that a killed write of ``name`` left in ``directory``."""
    for tmp in directory.glob(f".{glob.escape(name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync,
    ``os.replace``, fsync of the directory. Temporaries of earlier killed writes are removed."""
    path = Path(path)
    _remove_stale_temporaries(path.parent, path.name)
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
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------ checkpoints

def _blob(tensors: dict[str, Tensor]) -> bytes:
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ValueError(f"tensors must map str to Tensor, got {k!r}: {type(v).__name__}")
    return st_save({k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                    for k, v in tensors.items()}, metadata={"format": FORMAT})


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Save ``tensors`` (copied to CPU, contiguous) and JSON-able ``meta`` atomically to the
    directory ``path`` (created if needed; an existing checkpoint there is replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a directory for a checkpoint, got the file {str(path)!r}")
    try:
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable (no NaN/inf): {e}") from None
    path.mkdir(parents=True, exist_ok=True)
    blob = _blob(tensors)
    name = f"tensors-{uuid.uuid4().hex[:16]}.safetensors"
    for stale in path.glob(".tensors-*.tmp"):  # tensor files of killed saves
        stale.unlink(missing_ok=True)
    write_bytes(path / name, blob)
    record = {"format": FORMAT, "version": VERSION, "tensors": name,
              "sha256": hashlib.sha256(blob).hexdigest(), "meta": json.loads(meta_json)}
    write_text(path / META_FILE, json.dumps(record, indent=1))
    for old in path.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a committed checkpoint (its ``meta.json`` exists)."""
    return (Path(path) / META_FILE).is_file()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; CheckpointError naming it when it is not valid UTF-8 JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted file {str(path)!r}: invalid JSON ({e})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Load ``(tensors, meta)`` saved by :func:`save_checkpoint`; raise :class:`CheckpointError`
    with the path and the problem when anything is missing or corrupted."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: {META_FILE} is missing")
    record = read_json(meta_path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{str(meta_path)!r} is not an optidiff checkpoint "
                              f"(format {found!r}, expected {FORMAT!r})")
    if record.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{record.get('version')!r}; this optidiff reads version {VERSION}")
    missing = [k for k in ("tensors", "sha256", "meta") if k not in record]
    if missing or not isinstance(record["meta"], dict):
        raise CheckpointError(f"corrupted checkpoint {str(meta_path)!r}: missing keys {missing} "
                              "or a meta that is not a JSON object")
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


# ------------------------------------------------------------------------------ nested state

def flatten_state(obj: Any, tensors: dict[str, Tensor], prefix: str = "s") -> Any:
    """JSON skeleton of ``obj``; its tensors are moved to ``tensors`` under unique keys."""
    if isinstance(obj, Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, "
                    "strings, lists, tuples and dicts only)")


def unflatten_state(skel: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`; a skeleton that does not fit is a CheckpointError."""
    try:
        if isinstance(skel, dict):
            if "__tensor__" in skel:
                return tensors[skel["__tensor__"]]
            if "__dict__" in skel:
                return {unflatten_state(k, tensors): unflatten_state(v, tensors)
                        for k, v in skel["__dict__"]}
            if "__tuple__" in skel:
                return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
            raise TypeError(f"untagged object {sorted(skel)}")
        if isinstance(skel, list):
            return [unflatten_state(v, tensors) for v in skel]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed state skeleton: {e}") from None
    return skel


def save_state(path: str | os.PathLike, state: dict[str, Any], meta: dict | None = None) -> Path:
    """A checkpoint at ``path`` holding the nested ``state`` (skeleton under ``meta["state"]``)."""
    tensors: dict[str, Tensor] = {}
    skel = flatten_state(state, tensors)
    return save_checkpoint(path, tensors, {**(meta or {}), "state": skel})


def load_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """``(state, meta)`` of a checkpoint written by :func:`save_state`."""
    tensors, meta = load_checkpoint(path)
    if "state" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no nested state")
    try:
        return unflatten_state(meta["state"], tensors), meta
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None


def set_generator_state(generator: torch.Generator, state: Tensor) -> None:
    """``generator.set_state(state)``; a state of the wrong kind is a :class:`CheckpointError`.
    (A copy: torch 2.x crashes on a state that is a view into a larger tensor, such as one row of
    a stack of per-rank states.)"""
    try:
        generator.set_state(state.to(torch.uint8).cpu().clone())
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"generator state does not fit a {generator.device} generator: "
                              f"{e}") from None


# ------------------------------------------------------------------------------ run files

def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor]) -> Path:
    """One safetensors file (tensors copied to CPU, contiguous), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, _blob(tensors))
    return path


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a :func:`save_tensors` file; CheckpointError naming it when unreadable."""
    path = Path(path)
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"tensor file {str(path)!r} does not exist") from None
    except SafetensorError as e:
        raise CheckpointError(f"corrupted tensor file {str(path)!r}: {e}") from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line of ``path`` and fsync it."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace ``path`` atomically by these records, one per line."""
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (empty if it does not exist).

    A last line without its newline that does not parse is the trace of a write killed midway and
    is dropped; any other line that is not a JSON object raises :class:`CheckpointError` naming
    the file and the line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason})") from None
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: an interrupted append
                break
            raise CheckpointError(f"{path}:{i}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict):
            raise CheckpointError(f"{path}:{i}: a record must be a JSON object, got "
                                  f"{type(rec).__name__}")
        records.append(rec)
    return records
