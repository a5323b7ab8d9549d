"""Sample quality vs NFE of DDIM, DDPM, GE (γ=2), DPM-Solver++(2M) and Heun on exact denoisers.

Part (a) of the ``samplers`` benchmark: the denoisers are exact, so the target law is
known and every error is the sampler's (discretisation) error.

Problems
  - ``subspace``: D=64, d=16, x0 = A·u, u ~ N(0, I₁₆), A = the first 16 columns of a Haar-random
    orthogonal matrix (QR of a seeded Gaussian, sign-fixed). Target N(0, AAᵀ).
    Metric: W2² = metrics.sample_w2_to_gaussian(samples, 0, AAᵀ) on ``n_subspace`` samples (Monte
    Carlo), and the exact W2² of the sampler's output law for the deterministic samplers (they are
    linear maps x_N ↦ M·x_N for this denoiser, so the output law is N(0, σ_N²·MMᵀ); M is obtained by
    sampling from x_init = σ_N·I, one basis vector per row).
  - ``mixture``: 2-D mixture of 8 equal-weight Gaussians N(m_k, 0.1²I), m_k on the unit circle.
    Metric: sliced W2² (256 directions) against an independent exact sample of the same size.

Floors: the same metric for exact samples of the target (Monte-Carlo floor of the sample size).
Samplers end at σ = 0 (``sample_sigmas(steps, final_zero=True)``): the last step returns the
denoised estimate, and Heun's last step is Euler; NFE = steps, Heun: steps = (NFE+1)//2 and NFE =
2·steps − 1 (5, 9, 19, 49). All runs of a problem share one initial noise (common random numbers);
everything runs in float64.

Permenter & Yuan's claim (ICML 2024, their CIFAR-10/CelebA FID table): GE at N=10 beats DDIM at N=10 by a
wide margin and reaches DDIM-at-N=50 quality.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import markdown_table, set_threads, simple_main

import optidiff as od
from optidiff import metrics

NAME = "samplers"
NFES = (5, 10, 20, 50)
SAMPLERS = ("ddim", "ddpm", "ge", "dpmpp_2m", "heun")
DETERMINISTIC = ("ddim", "ge", "dpmpp_2m", "heun")
SIGMA_RANGE = (0.01, 40.0)  # log-linear σ range for unit-scale data (see BENCHMARKS.md)
SEED = 0
FLOOR_DRAWS = 5
GAMMAS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
F64 = torch.float64


def schedules() -> dict[str, od.schedules.Schedule]:
    return {"loglinear": od.LogLinearSchedule(*SIGMA_RANGE, n=1000), "ddpm": od.DDPMSchedule()}


def grid(schedule, sampler: str, nfe: int) -> tuple[torch.Tensor, int]:
    """The σ grid for a target NFE and the NFE it actually costs."""
    if sampler == "heun":
        steps = (nfe + 1) // 2
        return schedule.sample_sigmas(steps, final_zero=True), 2 * steps - 1
    return schedule.sample_sigmas(nfe, final_zero=True), nfe


# ----------------------------------------------------------------------------------- problems

def haar_columns(D: int, d: int, seed: int) -> torch.Tensor:
    """First d columns of a Haar-random orthogonal D×D matrix (QR of a Gaussian, sign-fixed so that
    diag(R) > 0; Mezzadri 2007)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r)))[:, :d]


class Subspace:
    name, metric = "subspace", "W2²"

    def __init__(self, n: int, D: int = 64, d: int = 16, seed: int = SEED):
        self.n, self.D, self.d = n, D, d
        self.A = haar_columns(D, d, seed)
        self.model = od.models.SubspaceGaussianDenoiser(self.A)
        self.mean, self.cov = torch.zeros(D, dtype=F64), self.A @ self.A.T

    def exact(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.d, generator=g, dtype=F64) @ self.A.T

    def score(self, x: torch.Tensor) -> float:
        return metrics.sample_w2_to_gaussian(x, self.mean, self.cov).item()

    def exact_score(self, sigmas: torch.Tensor, sampler: str, **kw) -> float | None:
        """W2² of the sampler's exact output law (deterministic samplers: a linear map)."""
        if sampler not in (*DETERMINISTIC, "gamma_mu"):
            return None
        basis = sigmas[0].item() * torch.eye(self.D, dtype=F64)
        out = od.sample(self.model, sigmas, x_init=basis, sampler=sampler, **kw)  # rows σ_N·Mᵀ
        return metrics.gaussian_w2(self.mean, out.T @ out, self.mean, self.cov).item()


class Mixture:
    name, metric = "mixture", "SW2²"

    def __init__(self, n: int, k: int = 8, radius: float = 1.0, std: float = 0.1,
                 seed: int = SEED, n_proj: int = 512):
        self.n, self.n_proj = n, n_proj
        ang = 2 * math.pi * torch.arange(k, dtype=F64) / k
        self.means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
        self.weights = torch.full((k,), 1.0 / k, dtype=F64)
        self.std = std
        covs = std**2 * torch.eye(2, dtype=F64).expand(k, 2, 2)
        self.model = od.models.GaussianMixtureDenoiser(self.weights, self.means, covs)
        self.reference = self.exact(n, torch.Generator().manual_seed(seed + 1000))

    def exact(self, n: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[idx] + self.std * torch.randn(n, 2, generator=g, dtype=F64)

    def score(self, x: torch.Tensor) -> float:
        g = torch.Generator().manual_seed(SEED + 2000)  # the same directions for every row
        return metrics.sliced_wasserstein(x, self.reference, n_proj=self.n_proj,
                                          generator=g).item()

    def exact_score(self, sigmas, sampler) -> None:
        return None


# ------------------------------------------------------------------------------------- running

def evaluate(problem, schedules_, nfes, samplers) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    floor_g = torch.Generator().manual_seed(SEED + 3000)
    draws = torch.tensor([problem.score(problem.exact(problem.n, floor_g))
                          for _ in range(FLOOR_DRAWS)])
    floor = draws.mean().item()
    floors = [{"problem": problem.name, "metric": problem.metric, "n_samples": problem.n,
               "floor": floor, "floor_std": draws.std().item(), "draws": FLOOR_DRAWS}]
    for sname, sched in schedules_.items():
        for sampler in samplers:
            for nfe in nfes:
                sigmas, actual = grid(sched, sampler, nfe)
                g = torch.Generator().manual_seed(SEED + 4000)  # common initial noise
                x_init = sigmas[0].item() * torch.randn(problem.n, *problem.model.input_shape,
                                                        generator=g, dtype=F64)
                x = od.sample(problem.model, sigmas, x_init=x_init, sampler=sampler, generator=g)
                rows.append({"problem": problem.name, "metric": problem.metric,
                             "schedule": sname, "sampler": sampler, "nfe_target": nfe,
                             "nfe": actual, "value": problem.score(x),
                             "exact": problem.exact_score(sigmas, sampler), "floor": floor})
    return rows, floors


def _value(r: dict) -> float:
    return r["value"] if r.get("exact") is None else r["exact"]


def equivalent_nfe(value: float, points: list[tuple[int, float]]) -> str:
    """The NFE at which a sampler with errors ``points`` [(nfe, error)] reaches ``value``
    (log-log interpolation between measured points)."""
    points = sorted(points)
    if value >= points[0][1]:
        return f"<= {points[0][0]}"
    if value <= points[-1][1]:
        return f"> {points[-1][0]}"
    for (n0, e0), (n1, e1) in itertools.pairwise(points):
        if e1 <= value <= e0:
            t = math.log(e0 / value) / math.log(e0 / e1)
            return f"{math.exp(math.log(n0) + t * math.log(n1 / n0)):.0f}"
    return "n/a (not monotone)"


def claims(rows: list[dict]) -> list[dict]:
    """Permenter & Yuan's claim per problem and schedule: GE@10 vs DDIM@10 and DDIM@50 (exact law where
    available, otherwise Monte Carlo)."""
    out = []
    look = {(r["problem"], r["schedule"], r["sampler"], r["nfe_target"]): r for r in rows}
    for (prob, sched, sampler, nfe), r in look.items():
        if sampler != "ge" or nfe != 10:
            continue
        ddim = [(n, _value(look[prob, sched, "ddim", n])) for n in NFES
                if (prob, sched, "ddim", n) in look]
        if not any(n == 50 for n, _ in ddim) or not any(n == 10 for n, _ in ddim):
            continue
        ge10, d10, d50 = _value(r), dict(ddim)[10], dict(ddim)[50]
        out.append({"problem": prob, "schedule": sched,
                    "source": "exact law" if r.get("exact") is not None else "Monte Carlo",
                    "GE@10": ge10, "DDIM@10": d10, "DDIM@50": d50,
                    "DDIM@10 / GE@10": d10 / ge10, "GE@10 / DDIM@50": ge10 / d50,
                    "DDIM NFE with GE@10's error": equivalent_nfe(ge10, ddim),
                    "GE@10 beats DDIM@10": ge10 < d10, "GE@10 <= DDIM@50": ge10 <= d50})
    return out


def gamma_sweep(problem: Subspace, schedules_, nfes, gammas=GAMMAS) -> list[dict]:
    """Exact W2² of the (γ, μ=0) sampler on the subspace Gaussian for several γ (Permenter & Yuan tuned γ
    per N: 2.0–2.8)."""
    rows = []
    for sname, sched in schedules_.items():
        for nfe in nfes:
            sigmas = sched.sample_sigmas(nfe, final_zero=True)
            row = {"schedule": sname, "NFE": nfe}
            for gamma in gammas:
                row[f"γ={gamma:g}"] = problem.exact_score(sigmas, "gamma_mu", gamma=gamma)
            rows.append(row)
    return rows


def pivot(rows: list[dict], nfes, column: str) -> list[dict]:
    table = {}
    for r in rows:
        if r.get(column) is None:
            continue
        key = (r["problem"], r["metric"], r["schedule"], r["sampler"])
        cell = table.setdefault(key, {"problem": key[0], "metric": key[1], "schedule": key[2],
                                      "sampler": key[3]})
        v = f"{r[column]:.3e}"
        cell[f"NFE {r['nfe_target']}"] = v if r["nfe"] == r["nfe_target"] else f"{v} [{r['nfe']}]"
    return list(table.values())


def run(quick: bool = False, threads: int | None = None) -> dict:
    threads = set_threads(threads)
    n_sub, n_mix = (2000, 2000) if quick else (10000, 10000)
    nfes = (5, 10) if quick else NFES
    t0 = time.perf_counter()
    rows, floors = [], []
    subspace = Subspace(n_sub)
    for problem in (subspace, Mixture(n_mix)):
        r, f = evaluate(problem, schedules(), nfes, SAMPLERS)
        rows += r
        floors += f
    cl = claims(rows)
    sweep = gamma_sweep(subspace, schedules(), nfes)
    elapsed = time.perf_counter() - t0
    cols = ["problem", "metric", "schedule", "sampler", *[f"NFE {n}" for n in nfes]]
    md = [(f"Monte-Carlo metric ({n_sub} samples for `subspace`, {n_mix} for `mixture`; "
           "[n] = actual NFE when it differs):"), "",
          markdown_table(pivot(rows, nfes, "value"), cols), "",
          (f"Floors (exact samples of the target, same metric and sample size; mean ± std over "
           f"{FLOOR_DRAWS} draws):"), "",
          markdown_table(floors, ["problem", "metric", "n_samples", "floor", "floor_std"]), "",
          "Exact W2² of the output law (`subspace`, deterministic samplers: no Monte-Carlo error):",
          "", markdown_table(pivot(rows, nfes, "exact"), cols)]
    if cl:
        md += ["", ("Permenter & Yuan's claim (GE at 10 NFE vs DDIM at 10 and 50; exact law where "
                    "available):"), "",
               markdown_table(cl, list(cl[0].keys()), digits=3)]
    md += ["", "GE's γ (μ = 0; γ = 1 is DDIM, γ = 2 is GE): exact W2² on `subspace`:", "",
           markdown_table(sweep, list(sweep[0].keys()), digits=3)]
    md += ["", (f"σ grids: log-linear σ ∈ [{SIGMA_RANGE[0]}, {SIGMA_RANGE[1]}] (n=1000) and "
                "DDPM linear β (n=1000, σ ∈ [0.01, 157]), trailing spacing, final σ = 0. "
                f"Runtime {elapsed:.0f} s with {threads} thread(s).")]
    return {"config": {"quick": quick, "nfes": list(nfes), "samplers": list(SAMPLERS),
                       "n_subspace": n_sub, "n_mixture": n_mix, "sigma_range_loglinear":
                       list(SIGMA_RANGE), "final_zero": True, "seed": SEED, "threads": threads},
            "rows": rows, "floors": floors, "claims": cl, "gamma_sweep": sweep,
            "seconds": elapsed,
            "markdown": "\n".join(md)}


def main(argv=None) -> dict:
    return simple_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
