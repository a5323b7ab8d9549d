"""The figures and the HTML report of a run directory (:class:`optidiff.runs.RunDir`).

A run directory holds ``run.json`` (kind, title, command, creation time), ``config.toml``,
``metrics.jsonl`` (one JSON record per line; ``event`` groups records into tables, records
without one are "train" if they hold a loss, else "metrics"), ``samples/*.safetensors``,
``plots/*.png`` and ``report.html``. :func:`write_report` rebuilds the report from those files
alone, so ``optidiff report RUN_DIR`` works on any run directory, also one copied from another
machine. Figures are matplotlib ``Figure`` objects (no pyplot state; matplotlib is imported only
when a figure is made).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, read_json, read_jsonl, write_text

__all__ = ["curves_figure", "distribution_figure", "loss_figure", "metrics_figure",
           "projection_figure", "scatter_figure", "write_report"]

MAX_ROWS = 30  # rows per metrics table in report.html (evenly thinned, the last row always kept)


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
    if not (path / "run.json").is_file():
        raise ValueError(f"{str(path)!r} is not an optidiff run directory (it has no run.json)")
    meta = read_json(path / "run.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / 'run.json'}: must be a JSON object")
    title = title or meta.get("title") or path.name
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in read_jsonl(path / "metrics.jsonl"):
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
    write_text(out, doc)
    return out


def _curve(hist: list[dict], key: str) -> tuple[list, list]:
    xs = [h["round"] for h in hist]
    return xs, [math.nan if h.get(key) is None else h[key] for h in hist]


def curves_figure(runs: dict[str, list[dict]], keys: list[tuple[str, ...]],
                  refs: dict[str, float]):
    """One panel per ``(key, label)`` or ``(key, label, overlay, overlay label)`` of the round
    records of each run (the overlay dotted in the run's colour, e.g. the implied plateau next to
    the reward), with the reference values (dashed) on the reward panels. The vertical range is
    that of the curves and references: an overlay that runs off it (the plateau δr/(1 − r) as r
    → 1) is clipped rather than squashing the curves."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (key, label, *over) in zip(axes, keys):
        shown = []
        for name, hist in runs.items():
            xs, ys = _curve(hist, key)
            (line,) = ax.plot(xs, ys, label=name)
            shown += ys
            if over and any(h.get(over[0]) is not None for h in hist):
                ax.plot(*_curve(hist, over[0]), ls=":", color=line.get_color(),
                        label=f"{name}: {over[1]}")
        for rname, val in refs.items():
            if key.startswith("reward") and val is not None and math.isfinite(val):
                ax.axhline(val, ls="--", lw=0.8, color="gray")
                ax.annotate(rname, (0, val), fontsize=7, color="gray", va="bottom")
                shown.append(val)
        shown = [v for v in shown if v is not None and math.isfinite(v)]
        if over and shown:
            lo, hi = min(shown), max(shown)
            pad = 0.1 * (hi - lo) or 0.1 * abs(hi) or 1.0
            ax.set_ylim(lo - pad, hi + pad)
        ax.set(xlabel="round", ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def projection_figure(task: Any, objective: str, runs: dict[str, list[Tensor]],
                      rounds: dict[str, list[int]]):
    """The task's 2-D projection (``task.projection``) of the samples of selected rounds, one
    panel per run, colour by round."""
    from matplotlib import cm
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.4 * len(runs), 3.8))
    axes = fig.subplots(1, len(runs), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (name, samples) in zip(axes, runs.items()):
        ks = rounds[name]
        for i, (k, x) in enumerate(zip(ks, samples)):
            p, xl, yl = task.projection(objective, x)
            ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.7, color=cm.viridis(i / max(1, len(ks) - 1)),
                       label=f"round {k}", linewidths=0)
        ax.set(xlabel=xl, ylabel=yl, title=name)
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


def metrics_figure(records: list[dict[str, Any]], *, by: str = "target", seed_key: str = "seed"):
    """One panel per numeric metric of ``records`` (e.g. the offline runs' oracle scores): its
    mean over the records of each ``by`` value, with the min–max range over seeds."""
    from matplotlib.figure import Figure
    skip = {by, seed_key, "seconds", "target_value", "event"}
    keys = [k for k in dict.fromkeys(k for r in records for k in r)
            if k not in skip and all(isinstance(r.get(k), (int, float)) for r in records)]
    groups = list(dict.fromkeys(str(r.get(by)) for r in records))
    fig = Figure(figsize=(3.2 * max(1, len(keys)), 3.0))
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        vals = [[float(r[key]) for r in records if str(r.get(by)) == g] for g in groups]
        mean = [sum(v) / len(v) for v in vals]
        lo = [m - min(v) for m, v in zip(mean, vals)]
        hi = [max(v) - m for m, v in zip(mean, vals)]
        ax.errorbar(range(len(groups)), mean, yerr=[lo, hi], fmt="o", capsize=3)
        ax.set(xticks=range(len(groups)), xticklabels=groups, xlabel=by, title=key)
    fig.tight_layout()
    return fig


def distribution_figure(panels: Mapping[str, Mapping[str, list[float]]], *,
                        xlabel: str = "oracle score"):
    """One panel per problem: box plots of the score distribution of each method (rows), e.g. the
    de-duplicated candidates of every seed of an offline suite run."""
    from matplotlib.figure import Figure

    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        raise ValueError("distribution_figure needs at least one non-empty panel")
    rows = max(len(v) for v in panels.values())
    fig = Figure(figsize=(4.2 * len(panels), 0.9 + 0.32 * rows))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, groups) in zip(axes, panels.items()):
        names = list(groups)
        ax.boxplot([groups[n] for n in names], orientation="horizontal", widths=0.6,
                   flierprops={"markersize": 2})
        ax.set_yticks(range(1, len(names) + 1), labels=names, fontsize=7)
        ax.invert_yaxis()
        ax.set(title=title, xlabel=xlabel)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig
