"""Run-directory I/O of the optimization loops: atomic writes, nested state <-> safetensors + JSON.

No pickle anywhere: tensors go to safetensors, everything else to JSON. A nested state (a torch
optimizer's ``state_dict()``, a generator state, counters) is split into a JSON skeleton, in which
each tensor is replaced by ``{"__tensor__": key}``, and a flat ``{key: tensor}`` dict. Dicts with
non-string keys and tuples are tagged so that they come back with their types.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "append_jsonl",
    "atomic_write_text",
    "flatten_state",
    "load_state",
    "load_tensors",
    "read_jsonl",
    "save_state",
    "save_tensors",
    "unflatten_state",
    "write_jsonl",
]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """safetensors file written atomically; tensors are made contiguous CPU copies."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def flatten_state(obj: Any, tensors: dict[str, Tensor], prefix: str = "s") -> Any:
    """JSON skeleton of ``obj``; tensors are moved to ``tensors`` under unique keys."""
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
    raise TypeError(f"cannot store a {type(obj).__name__} in a run state (tensors, numbers, "
                    "strings, lists, tuples and dicts only)")


def unflatten_state(skel: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors)
                    for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


def save_state(directory: Path, name: str, state: dict[str, Any], tag: int | str) -> None:
    """Write ``name-<tag>.safetensors``, then ``name.json`` (skeleton + the tensor file's name),
    then remove older tensor files. The JSON is replaced atomically and written last, so a crash at
    any point leaves the previous complete state readable."""
    directory = Path(directory)
    tensors: dict[str, Tensor] = {}
    skel = flatten_state(state, tensors)
    fname = f"{name}-{tag}.safetensors"
    save_tensors(directory / fname, tensors)
    atomic_write_text(directory / f"{name}.json", json.dumps({"file": fname, "state": skel}))
    for old in directory.glob(f"{name}-*.safetensors"):
        if old.name != fname:
            old.unlink()


def load_state(directory: Path, name: str) -> dict[str, Any] | None:
    """The state written by :func:`save_state`, or None if there is none."""
    js = Path(directory) / f"{name}.json"
    if not js.exists():
        return None
    meta = json.loads(js.read_text())
    return unflatten_state(meta["state"], load_tensors(Path(directory) / meta["file"]))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
