"""Sampler overhead: time of ``od.sample`` / (NFE × time of one model forward), side by side.

The physical limit of an unguided sampler is 1.0 (every step is one network evaluation plus a few
vector operations); the target is ≤ 1.05. Model: ``TimeMLP(dim=64, hidden=256, depth=3)`` (float32,
eval mode) at batch 4096, on the log-linear grid σ ∈ [0.01, 40] with ``steps`` = target NFE and a
final σ = 0 (Heun: steps = (NFE+1)//2, costing 2·steps − 1 NFE; the ratio uses the actual NFE).

Measurement: one process, fixed thread count; a warm-up of everything, then ``reps`` rounds, each
measuring the forward (mean of ``NFE`` back-to-back calls under ``torch.no_grad()``) and one
``od.sample`` per sampler in a rotating order; the ratio is taken per round against that round's
forward time, and the median over rounds is reported.

Sections: each is a function ``section_NAME(cfg) -> list[dict]`` registered in ``SECTIONS``; their
rows are merged (with a ``section`` column) into ``benchmarks/results/overhead.json``. Section
``guided`` measures one guided step / one unguided step for LookAhead, NaiveGradient, DPS and
ClassifierFree at batch 1024 (target for LookAhead ≤ 3.0: one forward and one backward pass).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import add_timing_args, finish, markdown_table, parser, set_threads, timer

import optidiff as od

NAME = "overhead"
SAMPLERS = ("ddim", "ddpm", "ge", "dpmpp_2m", "heun", "reverse_sde")
TARGET = 1.05


@dataclass
class Config:
    """Sizes shared by all sections (``quick``: a smoke run)."""

    quick: bool = False
    dim: int = 64
    hidden: int = 256
    depth: int = 3
    batch: int = 4096
    nfe: int = 20
    reps: int = 15
    threads: int = 1
    clock: str = "wall"
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool, threads: int, clock: str = "wall") -> Config:
        if quick:
            return cls(quick=True, batch=1024, nfe=6, reps=3, threads=threads, clock=clock)
        return cls(threads=threads, clock=clock)


def _model(cfg: Config) -> od.models.TimeMLP:
    torch.manual_seed(0)
    return od.models.TimeMLP(cfg.dim, hidden=cfg.hidden, depth=cfg.depth).eval()


def _grid(sampler: str, nfe: int) -> torch.Tensor:
    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
    return od.LogLinearSchedule(0.01, 40.0).sample_sigmas(steps, final_zero=True)


def section_unguided(cfg: Config) -> list[dict]:
    """Unguided sampler time / (NFE × forward time) for every sampler."""
    model = _model(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, cfg.dim, generator=g)
    sigma = torch.tensor(1.0)
    grids = {s: _grid(s, cfg.nfe) for s in SAMPLERS}
    nfes = {}
    for s in SAMPLERS:  # actual NFE, read from the sampler's own step records
        *_, last = od.sample_iter(model, grids[s], x_init=x[:2], sampler=s,
                                  generator=torch.Generator().manual_seed(1))
        nfes[s] = last.nfe

    timed = timer(cfg.clock)

    def forward() -> float:
        def calls():
            with torch.no_grad():
                for _ in range(cfg.nfe):
                    model(x, sigma)
        return timed(calls) / cfg.nfe

    def sampler(s: str, m) -> Callable[[], float]:
        x_init = grids[s][0].item() * x
        gen = torch.Generator().manual_seed(1)
        return lambda: timed(lambda: od.sample(m, grids[s], x_init=x_init, sampler=s,
                                               generator=gen))

    free = FreeModel(x)
    tasks: dict[str, Callable[[], float]] = {
        "forward": forward, **{s: sampler(s, model) for s in SAMPLERS},
        **{f"free:{s}": sampler(s, free) for s in SAMPLERS}}
    for fn in tasks.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    names = list(tasks)
    for r in range(cfg.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            times[k].append(tasks[k]())
    rows = []
    t_fwd = statistics.median(times["forward"])
    for s in SAMPLERS:
        ratios = [ts / (nfes[s] * tf) for ts, tf in zip(times[s], times["forward"])]
        ratio = statistics.median(ratios)
        free_per_nfe = statistics.median(times[f"free:{s}"]) / nfes[s]
        rows.append({"sampler": s, "NFE": nfes[s],
                     "forward ms": 1e3 * t_fwd,
                     "sample ms": 1e3 * statistics.median(times[s]),
                     "ratio": ratio,
                     "ratio IQR": _iqr(ratios),
                     "sampler-only ms/NFE": 1e3 * free_per_nfe,
                     "1 + sampler-only/forward": 1 + free_per_nfe / t_fwd,
                     "within 1.05": ratio <= TARGET})
    return rows


class FreeModel:
    """A model that costs nothing: returns a fixed ε, so ``od.sample`` time is pure sampler work
    (the per-step vector operations, checks and bookkeeping)."""

    def __init__(self, eps: torch.Tensor):
        self.eps, self.input_shape = eps, tuple(eps.shape[1:])

    def __call__(self, x, sigma, cond=None):
        return self.eps


def _iqr(xs: list[float]) -> str:
    if len(xs) < 4:
        return f"{min(xs):.3f}–{max(xs):.3f}"
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.3f}–{q[2]:.3f}"


GUIDED_TARGETS = {"LookAhead": 3.0}  # one forward + one backward pass is the limit


def _guidances(cfg: Config, x: torch.Tensor) -> dict[str, tuple[object, object]]:
    """name -> (guidance, cond): each seed-000/002 guidance on a TimeMLP-sized problem."""
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(cfg.dim, generator=g)
    operator = torch.randn(cfg.dim, 16, generator=g) / cfg.dim**0.5
    y_meas = x[:, :1].repeat(1, 16)
    labels = torch.randint(10, (len(x),), generator=g)
    return {"LookAhead": (od.guidance.LookAhead(direction, 1.0), None),
            "NaiveGradient": (od.guidance.NaiveGradient(direction, 1.0), None),
            "DPS": (od.guidance.DPS(lambda x0: x0 @ operator, y_meas, scale=1.0), None),
            "ClassifierFree": (od.guidance.ClassifierFree(3.0), labels)}


def section_guided(cfg: Config) -> list[dict]:
    """Guided step / unguided step: ``od.sample`` with and without each guidance, same model,
    grid and start (DDIM, batch ``cfg.batch // 4``), interleaved rounds, median ratio."""
    torch.manual_seed(0)
    model = od.models.TimeMLP(cfg.dim, hidden=cfg.hidden, depth=cfg.depth, num_classes=10).eval()
    batch = max(cfg.batch // 4, 1)
    x = torch.randn(batch, cfg.dim, generator=torch.Generator().manual_seed(0))
    grid = _grid("ddim", cfg.nfe)
    x_init = grid[0].item() * x
    timed = timer(cfg.clock)
    tasks: dict[str, Callable[[], float]] = {}
    for name, (guidance, cond) in _guidances(cfg, x).items():
        tasks[name] = (lambda gd=guidance, c=cond: timed(lambda: od.sample(
            model, grid, x_init=x_init, sampler="ddim", guidance=gd, cond=c)))
        tasks[f"plain:{name}"] = (lambda c=cond: timed(lambda: od.sample(
            model, grid, x_init=x_init, sampler="ddim", cond=c)))
    for fn in tasks.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    names = list(tasks)
    for r in range(cfg.reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(tasks[k]())
    rows = []
    for name in _guidances(cfg, x):
        ratios = [tg / tu for tg, tu in zip(times[name], times[f"plain:{name}"])]
        target = GUIDED_TARGETS.get(name)
        rows.append({"guidance": name, "batch": batch, "NFE": cfg.nfe,
                     "unguided ms/step": 1e3 * statistics.median(times[f"plain:{name}"]) / cfg.nfe,
                     "guided ms/step": 1e3 * statistics.median(times[name]) / cfg.nfe,
                     "guided / unguided": statistics.median(ratios),
                     "ratio IQR": _iqr(ratios),
                     "target": "—" if target is None else f"≤ {target}",
                     "met": "—" if target is None else statistics.median(ratios) <= target})
    return rows


SECTIONS: dict[str, Callable[[Config], list[dict]]] = {"unguided": section_unguided,
                                                       "guided": section_guided}


def run(quick: bool = False, threads: int | None = 1, sections: list[str] | None = None,
        clock: str = "wall") -> dict:
    threads = set_threads(threads)
    cfg = Config.make(quick, threads, clock)
    t0 = time.perf_counter()
    rows, md = [], []
    for name in sections or list(SECTIONS):
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}; choose from {sorted(SECTIONS)}")
        sec_rows = SECTIONS[name](cfg)
        rows += [{"section": name, **r} for r in sec_rows]
        what = (f"batch {cfg.batch}; ratio = sample time / (NFE × forward time), median over "
                f"rounds (target ≤ {TARGET})" if name == "unguided" else
                f"batch {max(cfg.batch // 4, 1)}, DDIM; ratio = guided / unguided sampling time, "
                f"median over rounds")
        head = (f"**{name}**: `TimeMLP(dim={cfg.dim}, hidden={cfg.hidden}, depth={cfg.depth})`, "
                f"target NFE {cfg.nfe}, {cfg.reps} interleaved rounds, {threads} thread(s), "
                f"{cfg.clock} clock; {what}.")
        md += [head, "", markdown_table(sec_rows), ""]
    return {"config": {k: v for k, v in vars(cfg).items() if k != "extra"},
            "rows": rows, "seconds": time.perf_counter() - t0, "markdown": "\n".join(md)}


def main(argv=None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    add_timing_args(p)
    p.add_argument("--section", action="append", choices=sorted(SECTIONS),
                   help="run only these sections (repeatable)")
    args = p.parse_args(argv)
    result = run(quick=args.quick, threads=args.threads, sections=args.section, clock=args.clock)
    finish(NAME, result, args)
    return result


if __name__ == "__main__":
    main()
