"""Guided digits: steer a trained digit model toward chosen classes; accuracy vs FD over strength.

Setting (:mod:`optidiff.tasks.digits`): the cached 8×8 UNet (``pretrained_digits_model``), DDIM
on the log-linear grid σ ∈ [0.01, 40] with ``steps`` steps (final σ = 0), ``n`` samples whose
targets are ``i mod 10`` (every class equally often), all runs from one shared initial noise.

- ``Classifier``: classifier guidance ``G = s·∇ₓ log c(y | x, σ)`` with the cached
  noise-conditional classifier (an MLP trained on noisy digits), for several scales s.
- ``LookAhead``: Algorithm 1 of Guo et al. (NeurIPS 2024) with look-ahead guidance G_loss on the log-probability of
  the same noise-conditional classifier at σ_f = 2 (``steer_lookahead``): per-sample
  linearisation, increment δ nats per round, ``rounds`` rounds, each from the same initial noise;
  every (δ, round) is a point.

Evaluation by a different network: the clean CNN classifier (``pretrained_classifier``): target
accuracy (argmax = target) and the mean probability of the target; FD of the guided batch (in that
CNN's penultimate features) against the held-out real images. Goal: target accuracy
≥ 90 % at a strength whose FD stays within 2× the unguided FD.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import finish, markdown_table, parser, set_threads

import optidiff as od
from optidiff.metrics import batched_features
from optidiff.models.classifiers import predict
from optidiff.tasks import digits as D

NAME = "guided_digits"
SIGMA_RANGE = (0.01, 40.0)
SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
INCREMENTS = (0.5, 1.0, 2.0)
#: LookAhead settings (chosen on 200 samples, see BENCHMARKS.md): objective log c(y | x, σ_f) of the
#: noise-conditional classifier at σ_f = 2, the official β rule, guidance active for σ ∈ [0.2, 100]
LOOKAHEAD = {"objective_sigma": 2.0, "beta": "official", "noise_std": 0.1,
             "interval": (0.2, 100.0)}
SEED = 0


def evaluate(clf, ref, x: torch.Tensor, targets: torch.Tensor) -> dict:
    p = predict(clf, x.clamp(-1, 1))
    return {"accuracy": (p.argmax(1) == targets).float().mean().item(),
            "p_target": p.gather(1, targets[:, None]).mean().item(),
            "fd": D.fd(clf, x, reference_features=ref)}


def run(quick: bool = False, threads: int | None = 2, dataset: str = "digits8",
        n: int | None = None, steps: int = 20, rounds: int | None = None,
        model_steps: int | None = None, plot_path: Path | None = None,
        progress: bool = True) -> dict:
    threads = set_threads(threads)
    t_all = time.perf_counter()
    n = n or (100 if quick else 1000)
    rounds = rounds or (2 if quick else 8)
    scales = (0.0, 2.0, 8.0) if quick else SCALES
    increments = (2.0,) if quick else INCREMENTS
    model = D.pretrained_digits_model(dataset, steps=model_steps, progress=progress)
    clf = D.pretrained_classifier(dataset)
    noise_clf = D.pretrained_noise_classifier(dataset)
    x_ho, _ = D.load(dataset, "heldout")
    ref = batched_features(clf.features, x_ho)
    sigmas = od.LogLinearSchedule(*SIGMA_RANGE, n=1000).sample_sigmas(steps, final_zero=True)
    targets = D.balanced_targets(n)
    w = torch.randn(n, *model.input_shape, generator=torch.Generator().manual_seed(SEED))
    x_init = w * sigmas[0].item()

    rows, samples = [], {}
    for s in scales:
        t0 = time.perf_counter()
        x = D.steer_classifier(model, noise_clf, targets, sigmas, scale=s, x_init=x_init)
        samples["Classifier", s] = x
        rows.append({"method": "Classifier" if s > 0 else "unguided", "strength": f"s={s:g}",
                     "s": s, **evaluate(clf, ref, x, targets),
                     "seconds": time.perf_counter() - t0})
        if progress:
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    fd0 = rows[0]["fd"]
    for delta in increments:
        t0 = time.perf_counter()
        res = D.steer_lookahead(model, noise_clf, targets, sigmas, rounds=rounds, increment=delta,
                                x_init=x_init, chunk_size=250, **LOOKAHEAD,
                                metrics=lambda z: evaluate(clf, ref, z, targets),
                                progress=progress)
        secs = time.perf_counter() - t0
        for rec in res.history[1:]:
            rows.append({"method": "LookAhead", "strength": f"δ={delta:g}, round {rec['round']}",
                         "delta": delta, "round": rec["round"], "accuracy": rec["accuracy"],
                         "p_target": rec["p_target"], "fd": rec["fd"],
                         "objective_mean": rec["reward_mean"], "seconds": secs / rounds})
            if progress:
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        samples["LookAhead", delta] = res.samples
    for r in rows:
        r["fd / unguided fd"] = r["fd"] / fd0
    goal = []
    for method in ("Classifier", "LookAhead"):
        ok = [r for r in rows if r["method"] == method and r["fd"] <= 2 * fd0]
        best = max(ok, key=lambda r: r["accuracy"]) if ok else None
        goal.append({"method": method, "best strength with FD ≤ 2× unguided":
                     best["strength"] if best else "none",
                     "accuracy": best["accuracy"] if best else None,
                     "fd / unguided fd": best["fd / unguided fd"] if best else None,
                     "accuracy ≥ 90 %": bool(best and best["accuracy"] >= 0.9)})
    elapsed = time.perf_counter() - t_all
    if plot_path is not None:
        plot(rows, samples, goal, plot_path)
    info = model.train_info
    cols = ["method", "strength", "accuracy", "p_target", "fd", "fd / unguided fd", "seconds"]
    md = [(f"{dataset}: {n} samples (targets i mod 10), DDIM {steps} steps on the log-linear grid "
          f"σ ∈ [{SIGMA_RANGE[0]}, {SIGMA_RANGE[1]}], one shared initial noise; guide: the "
          f"noise-conditional MLP classifier (held-out accuracy "
          f"{noise_clf.train_info['heldout_accuracy_sigma_0.5']:.3f} at σ = 0.5); judge: the clean "
          f"CNN classifier (held-out accuracy {clf.train_info['heldout_accuracy']:.3f}); FD "
          f"against {len(x_ho)} held-out images. Model: UNet trained "
          f"{info['recipe']['train']['steps']} steps. LookAhead: objective log c(y | x, σ_f = "
          f"{LOOKAHEAD['objective_sigma']:g}) of the noise-conditional classifier, "
          f"σ_y = {LOOKAHEAD['noise_std']:g}, β = {LOOKAHEAD['beta']}, active for σ ∈ "
          f"{list(LOOKAHEAD['interval'])}, increment δ per round, {rounds} rounds, each from the "
          "same initial noise."), "",
          markdown_table(rows, cols, digits=3), "",
          "Goal: accuracy ≥ 90 % with FD ≤ 2× the unguided FD:", "",
          markdown_table(goal, list(goal[0].keys()), digits=3), "",
          f"![accuracy vs FD](benchmarks/results/{NAME}.png)", "",
          f"Total time {elapsed / 60:.1f} min with {threads} torch thread(s)."]
    print(f"total time {elapsed:.0f} s", file=sys.stderr)
    return {"config": {"quick": quick, "dataset": dataset, "n": n, "steps": steps,
                       "rounds": rounds, "scales": list(scales), "increments": list(increments),
                       "lookahead": LOOKAHEAD,
                       "sigma_range": list(SIGMA_RANGE), "threads": threads, "seed": SEED},
            "rows": rows, "goal": goal, "unguided_fd": fd0, "model_info": info,
            "classifier_info": clf.train_info, "noise_classifier_info": noise_clf.train_info,
            "seconds": elapsed, "markdown": "\n".join(md)}


def plot(rows, samples, goal, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, ax_img) = plt.subplots(1, 2, figsize=(8, 3.4),
                                     gridspec_kw={"width_ratios": [1.6, 1]})
    fd0 = rows[0]["fd"]
    cls = [r for r in rows if r["method"] in ("unguided", "Classifier")]
    ax.plot([r["fd"] for r in cls], [r["accuracy"] for r in cls], "o-", ms=4,
            label="Classifier (s)")
    for r in cls:
        ax.annotate(f"{r['s']:g}", (r["fd"], r["accuracy"]), fontsize=6, xytext=(3, -6),
                    textcoords="offset points")
    for delta in sorted({r["delta"] for r in rows if r["method"] == "LookAhead"}):
        pts = [rows[0]] + [r for r in rows if r["method"] == "LookAhead" and r["delta"] == delta]
        ax.plot([r["fd"] for r in pts], [r["accuracy"] for r in pts], "s--", ms=3, lw=1,
                label=f"LookAhead δ={delta:g} (rounds)")
    ax.axvline(2 * fd0, color="k", ls=":", lw=0.8, label="2× unguided FD")
    ax.axhline(0.9, color="gray", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="FD vs held-out (classifier features)",
           ylabel="target-class accuracy", title="guided digits")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=6)
    # a grid of guided samples (one row per target class) for the best Classifier strength
    best = next((g for g in goal if g["method"] == "Classifier"), None)
    key = None
    if best and best["accuracy"] is not None:
        key = ("Classifier", float(best["best strength with FD ≤ 2× unguided"].split("=")[1]))
    x = samples.get(key, samples[("Classifier", 0.0)])
    n_per = min(10, len(x) // 10)
    idx = torch.tensor([c + 10 * j for c in range(10) for j in range(n_per)])
    imgs = x[idx].clamp(-1, 1).view(10, n_per, *x.shape[-2:])
    grid = imgs.permute(0, 2, 1, 3).reshape(10 * x.shape[-2], n_per * x.shape[-1])
    ax_img.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax_img.set_axis_off()
    ax_img.set_title(f"Classifier guidance s={key[1] if key else 0:g}\nrow = target class",
                     fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--clock", default="wall", help="accepted for `optidiff bench all`; unused")
    p.add_argument("--samples", type=int, default=None, help="samples per setting (default 1000)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--rounds", type=int, default=None, help="LookAhead rounds (default 8)")
    p.add_argument("--model-steps", type=int, default=None,
                   help="training steps of the cached model (default: the task's recipe, or 200 "
                        "with --quick; another value is another cache entry)")
    args = p.parse_args(argv)
    write = not (args.no_write or (args.quick and not args.write))
    result = run(quick=args.quick, threads=args.threads, n=args.samples, steps=args.steps,
                 rounds=args.rounds, model_steps=args.model_steps or (200 if args.quick else None),
                 plot_path=args.results_dir / f"{NAME}.png" if write else None)
    finish(NAME, result, args)
    return result


if __name__ == "__main__":
    main()
