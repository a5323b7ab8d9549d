"""Training throughput: ``od.train`` vs a bare hand-written PyTorch loop, side by side.

Both train the same ``TimeMLP(dim=64, hidden=256, depth=3)`` (float32) on the same data (65,536
points of the ``subspace`` task: x = A·u, D=64, d=16) with batch 256, AdamW(lr=1e-3,
weight_decay=0), σ drawn per sample uniformly from the 1000 levels of ``LogLinearSchedule()``
(od.train's default table), gradient clipping to global norm 1.0 and an EMA with decay
min(0.999, (1+t)/(10+t)). The bare loop, per step::

    idx   = randint(N, (B,), generator=g_data);  x0 = data[idx]
    sigma = table[randint(1000, (B,), generator=g_noise)]
    eps   = randn(x0.shape, generator=g_noise)
    loss  = F.mse_loss(model(x0 + sigma[:, None]·eps, sigma), eps)
    opt.zero_grad(set_to_none=True); loss.backward(); clip_grad_norm_(params, 1.0); opt.step()
    with torch.no_grad(): torch._foreach_lerp_(ema_params, params, 1 − decay_t)
    losses.append(loss.detach())             # read back once, at the end

and its setup (EMA deepcopy, AdamW, generators) is inside the timed call, as od.train's is.
Measurement: one process, fixed thread count, progress off; after a warm-up call of each, ``reps``
rounds each time one call of ``steps_per_block`` steps of both, in alternating order, each on its
own model; ratio = (od.train steps/s) / (bare steps/s) per round, median over rounds (target ≥
0.95). od.train's fixed cost per call (argument checks, setup) is reported separately.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from benchmarks.common import add_timing_args, finish, markdown_table, parser, set_threads, timer

import optidiff as od

NAME = "train"
TARGET = 0.95
DIM, HIDDEN, DEPTH, BATCH, N_DATA = 64, 256, 3, 256, 65536


def make_data(n: int = N_DATA, D: int = DIM, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = (q * torch.sign(torch.diagonal(r)))[:, :d]
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ A.T).float()


def make_model(seed: int = 0) -> od.models.TimeMLP:
    torch.manual_seed(seed)
    return od.models.TimeMLP(DIM, hidden=HIDDEN, depth=DEPTH)


def bare_train(model: torch.nn.Module, data: torch.Tensor, *, steps: int,
               batch_size: int = BATCH, lr: float = 1e-3, ema_decay: float = 0.999,
               grad_clip: float = 1.0, seed: int = 0, sigmas: torch.Tensor | None = None):
    """The hand-written reference loop (see the module docstring)."""
    table = (od.LogLinearSchedule().sigmas if sigmas is None else sigmas).to(torch.float32)
    g_data = torch.Generator().manual_seed(seed)
    g_noise = torch.Generator().manual_seed(seed + 1)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    losses = []
    model.train()
    for t in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g_data)
        x0 = data[idx]
        sigma = table[torch.randint(len(table), (batch_size,), generator=g_noise)]
        eps = torch.randn(x0.shape, generator=g_noise)
        loss = F.mse_loss(model(x0 + sigma[:, None] * eps, sigma), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - min(ema_decay, (1 + t) / (10 + t)))
        losses.append(loss.detach())
    return model, ema, torch.stack(losses).tolist()


def od_train(model, data, *, steps: int, seed: int = 0):
    return od.train(model, data, steps=steps, batch_size=BATCH, lr=1e-3, ema_decay=0.999,
                    grad_clip=1.0, seed=seed, progress=False)


def run(quick: bool = False, threads: int | None = 1, clock: str = "wall") -> dict:
    threads = set_threads(threads)
    _timed = timer(clock)
    steps, reps = (20, 2) if quick else (300, 9)
    t0 = time.perf_counter()
    data = make_data(8192 if quick else N_DATA)
    m_od, m_bare = make_model(), make_model()
    tasks = {"od.train": lambda: _timed(lambda: od_train(m_od, data, steps=steps)),
             "bare": lambda: _timed(lambda: bare_train(m_bare, data, steps=steps))}
    fixed = {"od.train": lambda: _timed(lambda: od_train(make_model(), data, steps=1)),
             "bare": lambda: _timed(lambda: bare_train(make_model(), data, steps=1))}
    for fn in (*tasks.values(), *fixed.values()):  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    one: dict[str, list[float]] = {k: [] for k in fixed}
    for r in range(reps):
        for k in (("od.train", "bare") if r % 2 == 0 else ("bare", "od.train")):
            times[k].append(tasks[k]())
            one[k].append(fixed[k]())
    ratios = [tb / to for to, tb in zip(times["od.train"], times["bare"])]
    # a correctness side-check: the EMA update must not be recorded by autograd (a recorded
    # update chains one graph node per step and parameter onto the EMA weights)
    ema = od_train(make_model(), data, steps=3).ema
    ema_graph = any(p.requires_grad or p.grad_fn is not None for p in ema.parameters())
    ratio = statistics.median(ratios)
    rows = [{"loop": k, "steps/s": steps / statistics.median(v),
             "ms/step": 1e3 * statistics.median(v) / steps,
             "1-step call ms": 1e3 * statistics.median(one[k])} for k, v in times.items()]
    summary = [{"ratio (od.train / bare steps/s)": ratio,
                "range over rounds": f"{min(ratios):.3f}–{max(ratios):.3f}",
                "target": f">= {TARGET}", "meets target": ratio >= TARGET,
                "EMA weights tracked by autograd": ema_graph}]
    head = (f"`TimeMLP(dim={DIM}, hidden={HIDDEN}, depth={DEPTH})`, batch {BATCH}, {len(data)} "
            f"data points, {reps} interleaved rounds of {steps} steps per loop, {threads} "
            f"thread(s), {clock} clock, progress off.")
    md = "\n".join([head, "", markdown_table(rows), "", markdown_table(summary)])
    return {"config": {"quick": quick, "steps_per_block": steps, "reps": reps, "threads": threads,
                       "clock": clock,
                       "dim": DIM, "hidden": HIDDEN, "depth": DEPTH, "batch": BATCH,
                       "n_data": len(data)},
            "rows": rows, "summary": summary, "ratios": ratios,
            "seconds": time.perf_counter() - t0, "markdown": md}


def main(argv=None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    add_timing_args(p)
    args = p.parse_args(argv)
    result = run(quick=args.quick, threads=args.threads, clock=args.clock)
    finish(NAME, result, args)
    return result


if __name__ == "__main__":
    main()
