"""Run directories that are safe to repeat into, and the errors a user can cause.

A run directory belongs to one kind of run (``train``, ``sample``, ``optimize``, ``offline``,
``demo``, ``demo-samplers``), recorded in its ``run.json``. :meth:`RunDir.prepare` checks, before
anything is written, that the directory may be used: a fresh path, or, with ``resume``, a run of
the same kind; a directory holding anything else is refused. :meth:`RunDir.start` then creates it
(and ``run.json``); nothing is written before. Every file is written atomically
(:mod:`optidiff.checkpoint`). :class:`RunError` is a failure the user can fix (the CLI prints it
as one ``error:`` line, exit code 2), worded in the command's own terms (``--run-dir``,
``--resume``).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import append_jsonl, read_json, read_jsonl, save_tensors, write_bytes, write_text
from ..report import write_report

__all__ = ["RunDir", "RunError"]


class RunError(ValueError):
    """A run cannot start or continue for a reason the user can fix."""


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


class RunDir:
    """A run directory of one ``kind`` (see the module docstring)."""

    def __init__(self, path: Path, kind: str, fresh: bool):
        self.path, self.kind, self.fresh = Path(path), kind, fresh

    @classmethod
    def prepare(cls, kind: str, name: str, path: str | Path | None = None, *,
                resume: bool = False, resumable: bool = True, root: str | Path = "runs"
                ) -> RunDir:
        """Check (writing nothing) where a ``kind`` run may go: ``path``, or a fresh
        ``<root>/<name>-<YYYYmmdd-HHMMSS>``. Raises :class:`RunError` when ``--resume`` has no
        ``--run-dir``, when ``path`` holds something other than a ``kind`` run, or holds a ``kind``
        run and ``resume`` is not set."""
        if path is None:
            if resume:
                raise RunError("--resume needs --run-dir (the run directory to continue)")
            stem = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            path, i = stem, 1
            while path.exists():
                path, i = stem.with_name(f"{stem.name}-{i}"), i + 1
            return cls(path, kind, True)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"--run-dir {path} is a file, not a directory")
        if not path.exists() or not any(path.iterdir()):
            if resume:
                raise RunError(f"--resume: {path} holds no run to continue")
            return cls(path, kind, True)
        meta_path = path / "run.json"
        if not meta_path.is_file():
            raise RunError(f"--run-dir {path} is not empty and is not an optidiff run directory; "
                           "choose another --run-dir")
        meta = read_json(meta_path)
        found = meta.get("kind") if isinstance(meta, dict) else None
        if found != kind:
            raise RunError(f"--run-dir {path} holds a {found or 'unknown'} run, not a {kind} run; "
                           "choose another --run-dir")
        if not resume:
            how = "pass --resume to continue it or " if resumable else ""
            raise RunError(f"--run-dir {path} already holds a {kind} run; {how}choose another "
                           "--run-dir")
        if not resumable:
            raise RunError(f"{kind} runs cannot be resumed; choose another --run-dir")
        return cls(path, kind, False)

    def start(self, *, title: str, command: str | None = None) -> RunDir:
        """Create the directory and, for a fresh run, ``run.json``; returns ``self``."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            self.write_text("run.json", json.dumps(
                {"kind": self.kind, "title": title, "command": command,
                 "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
        return self

    def __str__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------------- files
    def write_text(self, name: str, text: str) -> Path:
        """Write a text file of the run (atomically)."""
        dst = self.path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_text(dst, text)
        return dst

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Append one JSON record to ``metrics.jsonl`` (tensors become numbers or lists)."""
        rec = {k: _jsonable(v) for k, v in {**(record or {}), **fields}.items()}
        append_jsonl(self.path / "metrics.jsonl", rec)
        return rec

    def metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl``."""
        return read_jsonl(self.path / "metrics.jsonl")

    def save_samples(self, name: str, x: Tensor) -> Path:
        """Save a tensor as ``samples/<name>.safetensors`` (key ``"samples"``)."""
        return save_tensors(self.path / "samples" / f"{name}.safetensors", {"samples": x})

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``plots/<name>.png``."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        dst = self.path / "plots" / f"{name}.png"
        dst.parent.mkdir(exist_ok=True)
        write_bytes(dst, buf.getvalue())
        return dst

    def write_report(self, title: str | None = None) -> Path:
        """(Re)write ``report.html`` from the directory's contents."""
        return write_report(self.path, title)
