"""Run directories and their reports.

A :class:`RunDir` holds everything one command produced (DESIGN.md §2.1)::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        run.json          title, command, creation time
        config.toml       copy of the configuration
        metrics.jsonl     one JSON record per line; ``event`` groups records into tables
                          (records without one: "train" if they hold a loss, else "metrics")
        samples/*.safetensors   tensors under the key "samples" (no pickle)
        plots/*.png       matplotlib figures (Agg, no pyplot state)
        report.html       title, one metrics table per event, the plots inline

:func:`write_report` rebuilds ``report.html`` from the files alone, so ``optidiff report RUN_DIR``
works on any run directory, also one copied from another machine.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RunDir",
    "load_samples",
    "loss_figure",
    "read_metrics",
    "scatter_figure",
    "write_report",
]

MAX_ROWS = 30  # rows per metrics table in report.html (evenly thinned, the last row always kept)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


class RunDir:
    """A run directory; ``RunDir.create(name)`` makes ``runs/<name>-<YYYYmmdd-HHMMSS>``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, name: str, *, root: str | Path = "runs", path: str | Path | None = None,
               title: str | None = None, command: str | None = None) -> RunDir:
        """A run directory: ``path`` if given (created if needed; an existing ``run.json`` is
        kept), else a fresh time-stamped one under ``root``."""
        if path is None:
            stem = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            path, i = stem, 1
            while path.exists():
                path, i = stem.with_name(f"{stem.name}-{i}"), i + 1
        run = cls(path)
        if not (run.path / "run.json").exists():  # an existing run (resumed) keeps its record
            meta = {"name": name, "title": title or name, "command": command,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            (run.path / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
        return run

    def __str__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------------- files
    def copy_config(self, src: str | Path) -> Path:
        """Copy a config file into the run as ``config<suffix>``."""
        dst = self.path / f"config{Path(src).suffix or '.toml'}"
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return dst

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file in the run directory."""
        dst = self.path / name
        dst.write_text(text, encoding="utf-8")
        return dst

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Append one JSON record to ``metrics.jsonl`` (tensors become numbers or lists)."""
        rec = {k: _jsonable(v) for k, v in {**(record or {}), **fields}.items()}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl``."""
        return read_metrics(self.path)

    def save_samples(self, name: str, x: Tensor) -> Path:
        """Save a tensor as ``samples/<name>.safetensors`` (key ``"samples"``)."""
        from safetensors.torch import save_file

        dst = self.path / "samples" / f"{name}.safetensors"
        dst.parent.mkdir(exist_ok=True)
        save_file({"samples": x.detach().cpu().contiguous()}, str(dst))
        return dst

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``plots/<name>.png``."""
        dst = self.path / "plots" / f"{name}.png"
        dst.parent.mkdir(exist_ok=True)
        fig.savefig(dst, dpi=110, bbox_inches="tight")
        return dst

    def write_report(self, title: str | None = None) -> Path:
        """(Re)write ``report.html`` from the directory's contents."""
        return write_report(self.path, title)


def load_samples(path: str | Path) -> Tensor:
    """Read a tensor saved by :meth:`RunDir.save_samples`."""
    from safetensors.torch import load_file

    return load_file(str(path))["samples"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``<path>/metrics.jsonl`` (empty if absent); a bad line raises ValueError."""
    f = Path(path) / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{i}: not a JSON line ({e.msg})") from None
    return out


# ------------------------------------------------------------------------------ figures

def _figure(ncols: int, size: float = 3.6):
    from matplotlib.figure import Figure  # lazily: no pyplot, no global backend state

    fig = Figure(figsize=(size * ncols, size))
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def scatter_figure(panels: Mapping[str, Tensor], *, title: str | None = None,
                   lim: float | None = None, max_points: int = 5000):
    """Side-by-side scatter plots of 2-D point sets, one panel per entry, on shared axes."""
    fig, axes = _figure(len(panels))
    pts = {k: torch.as_tensor(v).detach().double().cpu()[:max_points] for k, v in panels.items()}
    if lim is None:
        allp = torch.cat(list(pts.values()))
        lim = float(torch.quantile(allp.abs().flatten(), 0.999)) * 1.15 if len(allp) else 1.0
    for ax, (name, x) in zip(axes, pts.items()):
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"scatter panel {name!r} needs points of shape (N, 2), got "
                             f"{tuple(x.shape)}")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, linewidths=0)
        ax.set(title=name, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    if title:
        fig.suptitle(title)
    return fig


def loss_figure(losses: Iterable[float], *, window: int = 50):
    """Training loss per step (light) and its running mean over ``window`` steps."""
    y = torch.as_tensor(list(losses), dtype=torch.float64)
    fig, (ax,) = _figure(1, 4.5)
    ax.plot(y, lw=0.5, alpha=0.4, label="loss")
    if len(y) >= window:
        ax.plot(range(window - 1, len(y)), y.unfold(0, window, 1).mean(1), label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="DSM loss", yscale="log", title="training loss")
    ax.legend()
    return fig


# ------------------------------------------------------------------------------- report

def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v))
    return html.escape("" if v is None else str(v))


def _table(records: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in records for k in r if k != "event"))
    n = len(records)
    rows = records
    if n > MAX_ROWS:
        idx = sorted({round(i * (n - 1) / (MAX_ROWS - 1)) for i in range(MAX_ROWS)})
        rows = [records[i] for i in idx]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>"
                     for r in rows)
    note = f"<p class='note'>{len(rows)} of {n} rows shown</p>" if n > MAX_ROWS else ""
    return f"<table><tr>{head}</tr>\n{body}</table>{note}"


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}.note{color:#777}
code{background:#f3f3f3}"""


def write_report(path: str | Path, title: str | None = None) -> Path:
    """Write ``<path>/report.html``: title, one table per ``event`` of metrics.jsonl, every
    ``plots/*.png`` (by relative path) and the list of files. Returns the report's path."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} does not exist")
    meta = {}
    if (path / "run.json").exists():
        meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
    title = title or meta.get("title") or path.name
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in read_metrics(path):
        event = rec.get("event") or ("train" if "loss" in rec else "metrics")
        groups.setdefault(str(event), []).append(rec)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(path.name)}"
             + (f" · created {html.escape(meta['created'])}" if "created" in meta else "")
             + (f" · <code>{html.escape(meta['command'])}</code>" if meta.get("command") else "")
             + "</p>"]
    for event, recs in groups.items():
        parts += [f"<h2>{html.escape(event)}</h2>", _table(recs)]
    if not groups:
        parts.append("<p class='note'>no metrics.jsonl records</p>")
    plots = sorted((path / "plots").glob("*.png")) if (path / "plots").is_dir() else []
    if plots:
        parts.append("<h2>plots</h2>")
        parts += [f"<figure><img src='plots/{html.escape(p.name)}' alt='{html.escape(p.stem)}'>"
                  f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in plots]
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                   if p.is_file() and p.name != "report.html")
    parts += ["<h2>files</h2>", "<ul>" + "".join(f"<li><code>{html.escape(f)}</code></li>"
                                               for f in files) + "</ul>"]
    doc = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(parts)
           + "\n</body></html>\n")
    out = path / "report.html"
    out.write_text(doc, encoding="utf-8")
    return out
