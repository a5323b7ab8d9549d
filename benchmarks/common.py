"""Shared helpers of the benchmark scripts: results JSON, BENCHMARKS.md tables, timing, CLI.

Every benchmark ``benchmarks/NAME.py`` exposes ``run(quick=False, ...) -> dict`` (with ``rows`` and
``markdown``) and ``main(argv=None)``; ``python benchmarks/NAME.py`` writes
``benchmarks/results/NAME.json`` and regenerates the block between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` in ``BENCHMARKS.md``. ``--quick`` is a smoke run that prints its table and
writes nothing unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
MARKDOWN = ROOT / "BENCHMARKS.md"

__all__ = [
    "CLOCKS",
    "MARKDOWN",
    "RESULTS_DIR",
    "ROOT",
    "add_timing_args",
    "finish",
    "fmt",
    "machine_info",
    "markdown_table",
    "parallel_map",
    "parser",
    "set_threads",
    "simple_main",
    "timer",
    "update_markdown",
    "write_results",
]


# ------------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: platform, CPU, core and thread counts, versions, date."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def set_threads(n: int | None) -> int:
    """``torch.set_num_threads(n)`` (``None``: keep torch's default) and return the count in use."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------ output

def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_results(name: str, result: dict[str, Any], results_dir: Path | str = RESULTS_DIR) -> Path:
    """Write ``results_dir/NAME.json`` = ``{"benchmark": NAME, "machine": …, **result}`` (the
    ``markdown`` entry excluded); atomic (temporary file + rename)."""
    path = Path(results_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(),
               **{k: v for k, v in result.items() if k != "markdown"}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    tmp.replace(path)
    return path


def fmt(v: Any, digits: int = 4) -> str:
    """Table cell: floats with ``digits`` significant digits, everything else ``str``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 10 ** digits or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` defaults to the first row's keys."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def update_markdown(name: str, block: str, path: Path | str = MARKDOWN) -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path`` by
    ``block`` (appending a new section with the markers when they are missing)."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = f"{begin}\n{block.strip()}\n{end}"
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        if j < i:
            raise ValueError(f"{path}: marker {end!r} comes before {begin!r}")
        text = text[:i] + new + text[j:]
    elif begin in text or end in text:
        raise ValueError(f"{path}: only one of the markers {begin!r}, {end!r} is present")
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{new}\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ timing

#: ``wall``: elapsed time (``time.perf_counter``), what a user waits; ``cpu``: CPU time of this
#: process (``time.process_time``), which on a shared, busy machine leaves out the time the process
#: waited for a core. With one torch thread both measure the same work; with several, ``cpu`` sums
#: the threads' time (a work ratio, not a latency ratio).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timer(clock: str = "wall") -> Callable[[Callable[[], Any]], float]:
    """``timed(fn)``: seconds that one call of ``fn`` takes on ``clock`` (see :data:`CLOCKS`)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]

    def timed(fn: Callable[[], Any]) -> float:
        t0 = now()
        fn()
        return now() - t0

    return timed


def _one_thread() -> None:
    torch.set_num_threads(1)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 1) -> list[Any]:
    """``[fn(x) for x in items]`` in ``workers`` spawned processes of one torch thread each (in
    order; ``workers=1`` runs here). ``fn`` must be a module-level function and every random draw
    inside it seeded from its item, so the result does not depend on ``workers``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        return list(pool.map(fn, items))


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


# ----------------------------------------------------------------------------------------- CLI

def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (small sizes); prints the table, writes nothing unless --write")
    p.add_argument("--write", action="store_true", help="write the results even with --quick")
    p.add_argument("--no-write", action="store_true", help="print only, write nothing")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help=f"where NAME.json goes (default {RESULTS_DIR.relative_to(ROOT)})")
    p.add_argument("--markdown", type=Path, default=MARKDOWN,
                   help="the markdown file whose NAME block is regenerated (default BENCHMARKS.md)")
    return p


def add_timing_args(p: argparse.ArgumentParser) -> None:
    """``--threads`` (default 1) and ``--clock`` for the timing benchmarks."""
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: process CPU time, robust on a busy machine "
                        "(use with --threads 1)")


def simple_main(name: str, doc: str, run: Callable[..., dict], argv=None) -> dict:
    """The ``main`` of a benchmark whose ``run`` takes ``quick`` and ``threads``: parse the common
    arguments (``--clock`` is accepted, for ``optidiff bench all --clock …``, and unused), run,
    print and write."""
    p = parser(name, doc.splitlines()[0])
    add_timing_args(p)
    args = p.parse_args(argv)
    result = run(quick=args.quick, threads=args.threads)
    finish(name, result, args)
    return result


def finish(name: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the markdown block and, for full runs (or ``--write``), write JSON and markdown."""
    print(result["markdown"])
    if args.no_write or (args.quick and not args.write):
        print(f"\n(not written: {'--no-write' if args.no_write else '--quick without --write'})")
        return
    path = write_results(name, result, args.results_dir)
    update_markdown(name, result["markdown"], args.markdown)
    print(f"\nwrote {path} and the {name!r} block of {args.markdown}", file=sys.stderr)
