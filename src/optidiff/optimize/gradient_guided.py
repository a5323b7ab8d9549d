"""Algorithm 1 of Guo et al. (NeurIPS 2024): gradient-guided diffusion for generative optimization.

Guo, Yuan, Yang, Chen, Wang, *Gradient Guidance for Diffusion Models: An Optimization Perspective*
(NeurIPS 2024), Algorithm 1; the settings of the official code (github.com/yukang123/GGDMOptim). The
pre-trained model is never changed::

    z_0 = B samples of the unguided model
    for k = 0 … K−1:
        g_k = ∇f(z_k)                    gradient_at="sample": one per sample (official code, §3)
                                         gradient_at="mean":   at the batch mean z̄_k (the paper)
        y_k = g_kᵀz_k + δ                increment rule (``increment=δ``), or
        y_k = y* − f(z_k) + g_kᵀz_k      fixed target with a first-order Taylor bias (``target=y*``,
                                         the official image code)
        z_{k+1} = B fresh samples guided by LookAhead(g_k, y_k) (or NaiveGradient)

Every round starts from fresh noise and delivers only a fraction r of the requested shift; the
increment rule then stalls where gᵀ(z̄ − z̄₀) = δ·r/(1 − r). Each round records r and that
plateau, and ``target_rule="corrected"`` rescales the target so that a network delivers what an exact model
would (:mod:`optidiff.optimize.delivered`, beyond the paper).

Their theorem: for concave, L-smooth f and a linear (Gaussian) score, the batch mean converges
linearly to the regularized optimum x_λ* = argmax f(x) − (λ/2)‖x − x̄0‖²_{Σ̄0⁻¹}; with the
increment rule and the Lemma-1 step size the fixed point has λ = σ_y²/δ (the guided
round samples the exact posterior, whose mean m satisfies m = x̄0 + Σ̄0·g·(gᵀ(z̄ − x̄0) + δ)/(σ_y² +
gᵀΣ̄0 g); at z̄ = m this is m = x̄0 + (δ/σ_y²)·Σ̄0·∇f(m), the stationarity condition of x_λ*).

The loop (shared with Algorithm 2, :mod:`optidiff.optimize.adaptive`) records one history entry per
round (mean, spread and top-k reward, f at the batch mean, the caller's metrics such as the
off-subspace ratio, the queries used so far), keeps the best samples seen, and, given ``run_dir``,
writes after every round the record (``metrics.jsonl``), the samples (``samples/round_XXXXX
.safetensors``) and a resumable state, so that a crash loses at most the round in progress and
``resume=True`` continues exactly as an uninterrupted run would.

Under ``torchrun --nproc-per-node N script.py`` the loop runs data-parallel on torch's own engine:
each rank draws, scores and differentiates its shard of every round with its own generator
stream, and the round's record is computed from the gathered batch (:func:`gradient_guided`,
"Distributed").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .. import distributed, rng
from ..sampling import progress_off, sample
from . import delivered as dlv
from .objectives import Objective, as_objective

__all__ = ["GRADIENT_AT", "GUIDANCES", "TARGET_RULES", "OptimizeResult", "gradient_guided",
           "make_guidance"]

GUIDANCES = ("lookahead", "naive")
GRADIENT_AT = ("sample", "mean")
TARGET_RULES = ("plain", "corrected")
Metrics = Callable[[Tensor], dict[str, float]]


@dataclass
class OptimizeResult:
    """Outcome of Algorithm 1 or 2.

    Attributes:
        history: one dict per round 0 … K (round 0: the unguided samples), see :func:`gradient_guided`.
        samples: the last round's samples ``(B, *dims)``; ``rewards`` their f values.
        best_samples, best_rewards: the ``top_k`` best samples seen in any round, best first.
        model: the model that produced the last round (fine-tuned by Algorithm 2); in a loaded
            result, the saved network or the reference dict of the run's ``model.json``.
        objective: the counted objective (None in a loaded result).
        run_dir: where the run was written, if anywhere.

    ``result.save(dir)`` writes it and :func:`optidiff.optimize.load_result` (also
    ``OptimizeResult.load``) reads it back, or any run directory of ``gradient_guided``,
    ``adaptive`` and ``optidiff optimize`` (:mod:`optidiff.results`).
    """

    history: list[dict[str, Any]]
    samples: Tensor
    rewards: Tensor
    best_samples: Tensor
    best_rewards: Tensor
    model: Any
    objective: Objective | None
    run_dir: Path | None = None

    def curve(self, key: str) -> list[float]:
        """The values of ``key`` over the rounds, e.g. ``result.curve("reward_mean")``."""
        return [rec.get(key, math.nan) for rec in self.history]

    def save(self, directory: str | Path) -> Path:
        """Write this result into ``directory`` (see :mod:`optidiff.results`)."""
        from ..results import save_optimize_result
        return save_optimize_result(self, directory)

    @classmethod
    def load(cls, run_dir: str | Path, device: Any = None) -> OptimizeResult:
        """The result saved in, or written by a run into, ``run_dir``."""
        from ..results import load_optimize_result
        return load_optimize_result(run_dir, device)


def make_guidance(kind: str | Callable, g: Tensor, y: Tensor | float, *, beta: Any = None,
                  noise_std: float = 0.1):
    """The guidance of one round: ``"lookahead"`` → ``LookAhead(g, y)`` (G_loss, default β
    ``"lemma1"``), ``"naive"`` → ``NaiveGradient(g, y)`` (default β ``"official"``), or a callable
    ``kind(g, y)`` returning any guidance."""
    if callable(kind):
        return kind(g, y)
    from ..guidance import LookAhead, NaiveGradient
    cls = {"lookahead": LookAhead, "naive": NaiveGradient}[kind]
    kwargs = {"noise_std": noise_std}
    if beta is not None:
        kwargs["beta"] = beta
    return cls(g, y, **kwargs)


def _check_args(rounds: int, batch_size: int, increment: float | None, target: float | None,
                guidance: Any, gradient_at: str, noise_std: float, top_k: int,
                run_dir: Any, resume: bool, target_rule: str, max_correction: float) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got rounds={rounds!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got batch_size={batch_size!r}")
    if (increment is None) == (target is None):
        raise ValueError("give exactly one target rule: increment=δ (y = gᵀz + δ) or target=y* "
                         f"(y = y* − f(z) + gᵀz); got increment={increment!r}, target={target!r}")
    if increment is not None and not (math.isfinite(increment) and increment > 0):
        raise ValueError(f"increment (δ) must be finite and > 0, got increment={increment!r}")
    if target is not None and not math.isfinite(target):
        raise ValueError(f"target must be finite, got target={target!r}")
    if not callable(guidance) and guidance not in GUIDANCES:
        raise ValueError(f"unknown guidance={guidance!r}; choose one of {GUIDANCES} or pass a "
                         "callable (g, y) -> guidance")
    if gradient_at not in GRADIENT_AT:
        raise ValueError(f"gradient_at must be one of {GRADIENT_AT}, got {gradient_at!r}")
    if target_rule not in TARGET_RULES:
        raise ValueError(f"target_rule must be one of {TARGET_RULES}, got {target_rule!r}")
    if not (isinstance(max_correction, (int, float)) and math.isfinite(max_correction)
            and max_correction >= 1):
        raise ValueError(f"max_correction must be a finite number >= 1, got "
                         f"max_correction={max_correction!r}")
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std (σ_y) must be finite and > 0, got noise_std={noise_std!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got top_k={top_k!r}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir (the directory of the run to continue)")


def _flatdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


def _targets(objective: Objective, z: Tensor, rewards: Tensor, gradient_at: str,
             increment: float | None, target: float | None, reward_at_mean: Tensor | None,
             batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(g, y) of the next round: per sample ``g (n, *dims), y (n,)`` for the rows ``z`` (this
    rank's shard) or at the mean ``g (*dims), y ()`` of ``batch`` (the whole batch, default
    ``z``; under torchrun rank 0 queries ∇f(z̄) and sends it to every rank). Gradient queries
    happen here."""
    if gradient_at == "mean":
        zbar = (z if batch is None else batch).mean(0, keepdim=True)
        rank = distributed.rank_world()[0]
        g = distributed.broadcast(objective.grad(zbar) if rank == 0 else None, zbar)
        lin = _flatdot(g, zbar)
        y = lin + increment if increment is not None else target - reward_at_mean.view(1) + lin
        return g[0], y[0]
    g = objective.grad(z)
    lin = _flatdot(g, z)
    y = lin + increment if increment is not None else target - rewards + lin
    return g, y


def _record(k: int, z: Tensor, rewards: Tensor, queries: dict[str, int], top_k: int,
            metrics: Metrics | None, reward_at_mean: Tensor | None, y: Tensor | None,
            seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    kk = min(top_k, len(rewards))
    rec: dict[str, Any] = {
        "round": k,
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward_max": rewards.max().item(),
        "reward_top_k": rewards.topk(kk).values.mean().item(),
        "reward_at_mean": None if reward_at_mean is None else reward_at_mean.item(),
        "target_mean": None if y is None else y.float().mean().item(),
        **queries,
        "seconds": seconds,
    }
    for key, val in extra.items():
        rec[key] = float(val) if isinstance(val, (Tensor, int, float)) else val
    if metrics is not None:
        for key, val in metrics(z).items():
            rec[key] = float(val)
    return rec


def _delivery(g: Tensor, y: Tensor, y_plain: Tensor, z: Tensor, z0: Tensor, rho: Tensor,
              increment: float | None, reward: float) -> dict[str, Any]:
    """The round's delivered fraction, the exact model's fraction for the same requests and, for
    the increment rule, the plateaus they imply, linearised at this round's samples (mean reward
    ``reward``, shift s = mean g_iᵀ(z_i − z̄₀); :mod:`optidiff.optimize.delivered`)."""
    got, asked = dlv.shifts(g, y, z, z0)
    rec = {"delivered_fraction": dlv.ratio(got, asked),
           "exact_fraction": dlv.ratio(rho * asked, asked)}
    if increment is not None:
        # the plateau of the rule as run: delivered shift over the *plain* request
        r_eff = dlv.ratio(got, dlv.shifts(g, y_plain, z, z0)[1])
        base = reward - got.mean().item()
        rec["plateau"] = dlv.implied_plateau(r_eff, increment, base)
        rec["exact_plateau"] = dlv.implied_plateau(rec["exact_fraction"], increment, base)
    return rec


def _config_json(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if callable(v) and not isinstance(v, str):
            v = getattr(v, "__name__", type(v).__name__)
        try:
            json.dumps(v)
        except TypeError:
            v = repr(v)
        out[k] = v
    return out


def _open_run(rdir: Path, config: dict[str, Any], resume: bool
              ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(state, history) of the run in ``rdir`` (None, [] for a new run); reads only."""
    state = ckpt.load_state(rdir / "state")[0] if ckpt.has_checkpoint(rdir / "state") else None
    if state is None:
        return None, []
    if not resume:
        raise FileExistsError(f"{rdir} already holds an optimization run (round "
                              f"{state['round']}); pass resume=True to continue it or choose "
                              "a new run_dir")
    old = ckpt.read_json(rdir / "config.json")
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        raise ValueError(f"cannot resume {rdir}: settings differ from the saved run in "
                         f"{', '.join(f'{k} ({old.get(k)!r} -> {config.get(k)!r})' for k in diff)}")
    start = int(state["round"])
    history = [r for r in ckpt.read_jsonl(rdir / "metrics.jsonl")
               if isinstance(r.get("round"), int) and r["round"] <= start]
    if len(history) != start + 1:
        raise ckpt.CheckpointError(f"{rdir / 'metrics.jsonl'}: holds {len(history)} round "
                                   f"records up to round {start}, expected {start + 1}")
    return state, history


_QUERIES = ("value_queries", "grad_queries")


def _totals(objective: Objective, seconds: float, world: int
            ) -> tuple[dict[str, int], float, Tensor | None]:
    """(queries summed over the ranks, seconds of the slowest rank, the per-rank query counts
    ``(world, 2)``; None on a single process)."""
    if world == 1:
        return objective.queries, seconds, None
    row = torch.tensor([[objective.value_queries, objective.grad_queries, seconds]],
                       dtype=torch.float64)
    parts = distributed.gather(row)
    counts = parts[:, :2].long()
    return dict(zip(_QUERIES, counts.sum(0).tolist())), parts[:, 2].max().item(), counts


def run_loop(model: Any, objective: Objective, sigmas: Tensor, *, rounds: int, batch_size: int,
             increment: float | None, target: float | None, guidance: Any, gradient_at: str,
             noise_std: float, beta: Any, sampler: str, sampler_kwargs: dict | None, top_k: int,
             metrics: Metrics | None, run_dir: str | Path | None, resume: bool,
             save_samples: bool, generator: torch.Generator | None, seed: int | None,
             dtype: torch.dtype | None, device: torch.device | str | None, progress: bool,
             target_rule: str = "plain", max_correction: float = 2.0,
             updater: Any = None, algorithm: str = "gradient_guided",
             config: dict[str, Any] | None = None) -> OptimizeResult:
    """The loop shared by Algorithms 1 and 2 (``updater``: Algorithm 2's fine-tuning step), on one
    process or under torchrun (see :func:`gradient_guided`, "Distributed")."""
    _check_args(rounds, batch_size, increment, target, guidance, gradient_at, noise_std, top_k,
                run_dir, resume, target_rule, max_correction)
    objective = as_objective(objective)
    with distributed.session(torch.device(device if device is not None else "cpu")) as (
            rank, world, dev):
        if world > 1:
            device = dev if device is not None else None
            if batch_size < world:
                raise ValueError(f"batch_size={batch_size} cannot be shared out over {world} ranks")
            if generator is not None:
                raise ValueError("under torchrun give seed= (not generator=): every rank draws "
                                 "its own stream, seeded rank_seed(seed, rank)")
            generator = rng.generator(distributed.rank_seed(0 if seed is None else seed, rank),
                                      device or "cpu")
        elif generator is None:
            generator = torch.Generator(device=device or "cpu").manual_seed(
                0 if seed is None else seed)
        return _loop(model, objective, sigmas, rank=rank, world=world, rounds=rounds,
                     batch_size=batch_size, increment=increment, target=target,
                     guidance=guidance, gradient_at=gradient_at, noise_std=noise_std, beta=beta,
                     sampler=sampler, sampler_kwargs=sampler_kwargs, top_k=top_k,
                     metrics=metrics, run_dir=run_dir, resume=resume, save_samples=save_samples,
                     generator=generator, dtype=dtype, device=device, progress=progress,
                     target_rule=target_rule, max_correction=max_correction, updater=updater,
                     algorithm=algorithm, config=config)


def _loop(model, objective, sigmas, *, rank, world, rounds, batch_size, increment, target,
          guidance, gradient_at, noise_std, beta, sampler, sampler_kwargs, top_k, metrics,
          run_dir, resume, save_samples, generator, dtype, device, progress, target_rule,
          max_correction, updater, algorithm, config) -> OptimizeResult:
    skw = dict(sampler_kwargs or {})
    skw.setdefault("sampler", sampler)
    rows = distributed.shard(batch_size, rank, world)  # this rank's rows of every round

    def draw(guid) -> tuple[Tensor, Tensor]:
        """(this rank's shard, the whole batch gathered in rank order)."""
        mine = sample(model, sigmas, batch_size=rows.stop - rows.start, guidance=guid,
                      generator=generator, dtype=dtype, device=device, distributed=False, **skw)
        return mine, distributed.gather(mine)

    config = _config_json({"algorithm": algorithm, "batch_size": batch_size, "increment": increment,
                           "target": target, "guidance": guidance, "gradient_at": gradient_at,
                           "noise_std": noise_std, "beta": beta, "sampler": skw,
                           "top_k": top_k, "target_rule": target_rule,
                           "max_correction": max_correction,
                           "sigmas": [float(v) for v in torch.as_tensor(sigmas).tolist()],
                           **(config or {}), **({"world_size": world} if world > 1 else {})})
    rdir = Path(run_dir) if run_dir is not None else None
    state, history = _open_run(rdir, config, resume) if rdir is not None else (None, [])
    distributed.barrier()  # every rank has read the run directory before rank 0 writes to it
    writer = rdir is not None and rank == 0
    if writer:
        (rdir / "samples").mkdir(parents=True, exist_ok=True)
        if state is None:
            ckpt.write_text(rdir / "config.json", json.dumps(config, indent=1))
        else:
            ckpt.write_jsonl(rdir / "metrics.jsonl", history)

    def save(k: int, z: Tensor, rewards: Tensor, best: tuple[Tensor, Tensor],
             counts: Tensor | None) -> None:
        if rdir is None:
            return
        gens = distributed.gather(generator.get_state()[None]) if world > 1 else None
        if not writer:
            return
        if save_samples:
            ckpt.save_tensors(rdir / "samples" / f"round_{k:05d}.safetensors",
                              {"samples": z, "rewards": rewards})
        ckpt.append_jsonl(rdir / "metrics.jsonl", history[-1])
        st = {"round": k, "z": z, "z0": z0, "rewards": rewards, "best_samples": best[0],
              "best_rewards": best[1], "generator": generator.get_state(),
              "queries": {q: history[-1][q] for q in _QUERIES}}
        if world > 1:  # every rank's stream and query counts, row r for rank r
            st.update(generators=gens, rank_queries=counts)
        if updater is not None:
            st["model"] = dict(model.state_dict())
            st["updater"] = updater.state_dict()
        ckpt.save_state(rdir / "state", st, {"kind": "optimize", "round": k})

    def update_best(best, z, rewards):
        allz = z if best is None else torch.cat([best[0], z])
        allr = rewards if best is None else torch.cat([best[1], rewards])
        idx = allr.topk(min(top_k, len(allr))).indices
        return allz[idx], allr[idx]

    def score(mine: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """(f of the whole batch, f(z̄) with gradient_at="mean"): each rank scores its shard, rank
        0 the batch mean."""
        rewards = distributed.gather(objective.value(mine))
        at_mean = None
        if gradient_at == "mean":
            at_mean = distributed.broadcast(
                objective.value(z.mean(0, keepdim=True))[0] if rank == 0 else None, rewards[0])
        return rewards, at_mean

    def finish(k, z, rewards, best, at_mean, y, t0, extra) -> None:
        queries, seconds, counts = _totals(objective, time.perf_counter() - t0, world)
        history.append(_record(k, z, rewards, queries, top_k, metrics, at_mean, y, seconds,
                               extra))
        save(k, z, rewards, best, counts)

    if state is not None:
        start = int(state["round"])
        if start > rounds:
            raise ValueError(f"{rdir} already ran {start} rounds, more than rounds={rounds}")
        z, rewards = state["z"].to(device=device or "cpu"), state["rewards"].to(device or "cpu")
        mine = z[rows]
        z0 = state["z0"].to(z)
        best = (state["best_samples"].to(z), state["best_rewards"].to(rewards))
        if world > 1:
            ckpt.set_generator_state(generator, state["generators"][rank])
            objective.load_queries(dict(zip(_QUERIES, state["rank_queries"][rank].tolist())))
        else:
            generator.set_state(state["generator"])
            objective.load_queries(state["queries"])
        if updater is not None:
            model.load_state_dict(state["model"])
            updater.load_state_dict(state["updater"])
        at_mean = (torch.tensor(history[-1]["reward_at_mean"], dtype=rewards.dtype)
                   if gradient_at == "mean" else None)
    else:
        t0 = time.perf_counter()
        mine, z = draw(None)
        z0 = z
        rewards, at_mean = score(mine, z)
        best = update_best(None, z, rewards)
        extra = updater.round_info() if updater is not None else {}
        finish(0, z, rewards, best, at_mean, None, t0, extra)
        start = 0

    bar = tqdm(range(start, rounds), desc=algorithm, leave=False,
               disable=True if rank != 0 else progress_off(progress))
    for k in bar:
        t0 = time.perf_counter()
        g, y_plain = _targets(objective, mine, rewards[rows], gradient_at, increment, target,
                              at_mean, batch=z)
        if gradient_at == "sample":  # the whole batch's targets, for the round statistics
            g, y_plain = distributed.gather(g), distributed.gather(y_plain)
        rho = dlv.exact_fraction(g, z0, noise_std)
        y, corr = y_plain, None
        if target_rule == "corrected":
            y, corr = dlv.corrected_targets(g, y_plain, z0, rho, history[-1].get(
                "delivered_fraction"), max_correction)
        if updater is not None:
            model = updater.step(model, k, z, generator)
        mine_g, mine_y = (g[rows], y[rows]) if gradient_at == "sample" else (g, y)
        mine, z = draw(make_guidance(guidance, mine_g, mine_y, beta=beta, noise_std=noise_std))
        rewards, at_mean = score(mine, z)
        best = update_best(best, z, rewards)
        extra = updater.round_info() if updater is not None else {}
        extra.update(_delivery(g, y, y_plain, z, z0, rho, increment, rewards.mean().item()))
        if corr is not None:
            extra["target_correction"] = corr
        finish(k + 1, z, rewards, best, at_mean, y, t0, extra)
        bar.set_postfix(reward=f"{history[-1]['reward_mean']:.4g}")
    if rdir is not None:
        distributed.barrier()  # no rank returns before rank 0 has written the run directory
    return OptimizeResult(history=history, samples=z, rewards=rewards, best_samples=best[0],
                          best_rewards=best[1], model=model, objective=objective, run_dir=rdir)


def gradient_guided(model: Any, objective: Callable[[Tensor], Tensor] | Objective, sigmas: Tensor,
                    *, rounds: int, batch_size: int, increment: float | None = None,
                    target: float | None = None, target_rule: str = "plain",
                    max_correction: float = 2.0, guidance: str | Callable = "lookahead",
                    gradient_at: str = "sample", noise_std: float = 0.1, beta: Any = None,
                    sampler: str = "ddpm", sampler_kwargs: dict | None = None, top_k: int = 4,
                    metrics: Metrics | None = None, run_dir: str | Path | None = None,
                    resume: bool = False, save_samples: bool = True,
                    generator: torch.Generator | None = None, seed: int | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    progress: bool | None = None) -> OptimizeResult:
    """Algorithm 1 of Guo et al. (NeurIPS 2024; formulas in the module docstring): the model is never
    changed.

    Args:
        model: a pre-trained optidiff model ``model(x, sigma, cond=None) -> eps`` with
            ``input_shape``.
        objective: ``f(x) -> (B,)`` (gradient by autograd) or an :class:`Objective` with its own
            gradient oracle. Every value and gradient query is counted.
        sigmas: the decreasing sampling grid (e.g. ``schedule.sample_sigmas(steps)``).
        rounds: K, the number of guided rounds (round 0 is unguided).
        batch_size: B, samples per round.
        increment: δ of the rule ``y = gᵀz + δ`` (the official code's ``--interval``).
        target: y* of the fixed-target rule ``y = y* − f(z) + gᵀz`` (give one of the two).
        target_rule: ``"plain"`` (the rule above, as the paper) or ``"corrected"``: the target
            rescaled about the prior mean by c = ρ/r_{k−1} (the exact model's fraction over the
            fraction delivered in the previous round, clipped to [1,
            max_correction]) so that an imperfect network moves as an exact one would
            (:mod:`optidiff.optimize.delivered`); equal to the plain rule when r ≥ ρ.
        max_correction: the clip of the corrected rule's factor c (≥ 1). Default 2: on the
            subspace task's TimeMLP, c up to 4 drove the samples off the data and the reward
            diverged (the ``guidance_subspace`` benchmark).
        guidance: ``"lookahead"`` (G_loss), ``"naive"`` or a callable ``(g, y) -> guidance``.
        gradient_at: ``"sample"`` (per-sample chains, as the official code) or ``"mean"`` (at the
            batch mean, as the paper).
        noise_std: σ_y of the guidance's observation model (0.1 as the official code).
        beta: the guidance's step size (default: the guidance class's default).
        sampler, sampler_kwargs: any ``od.sample`` sampler and its options (gamma, mu, chunk_size).
        top_k: size of the top-k reward statistic and of the kept best samples (4 as the paper).
        metrics: ``metrics(samples) -> {name: float}`` added to each round's record (e.g. the
            off-subspace ratio of a task).
        run_dir: write ``config.json``, ``metrics.jsonl``, ``samples/`` and a resumable state after
            every round.
        resume: continue the run in ``run_dir`` from its last completed round (same settings;
            ``rounds`` may be larger).
        generator, seed: the only source of randomness (default: a CPU generator seeded with
            ``seed``, 0 if not given).
        dtype, device: of the samples.
        progress: show a progress bar over rounds.

    Distributed: launch the script with ``torchrun --nproc-per-node 2 script.py`` (WORLD_SIZE >
    1; the process group is initialised here unless the script did it: gloo on CPU, nccl on
    CUDA, where ``device="cuda"`` means ``cuda:LOCAL_RANK``). Every rank passes the same
    ``model`` (the same weights) and ``objective``. Then

    - per rank: rank r draws rows :func:`optidiff.distributed.shard` ``(B, r, world)`` of every
      round with its own generator, seeded :func:`optidiff.distributed.rank_seed` ``(seed, r)``
      (give ``seed=``; ``generator=`` is refused), evaluates f on them and, with
      ``gradient_at="sample"``, their gradients and guidance targets;
    - gathered (the whole batch in rank order, on every rank): samples, rewards and targets, from
      which the round statistics, the delivered fraction and plateau, the caller's ``metrics``,
      the corrected rule's factors and the top-k best samples are computed, so every rank holds
      the same history and result. With ``gradient_at="mean"``, z̄ is the mean of the whole batch
      and rank 0 alone queries f(z̄) and ∇f(z̄) and sends them to the others. The history's query
      counts are totals over the ranks (``result.objective`` counts this rank's), ``seconds``
      the slowest rank's;
    - rank 0 alone writes ``run_dir`` (call ``result.save`` on rank 0 only). The resumable state
      holds every rank's generator state and query counts (row r for rank r), so ``resume=True``
      with the same number of processes continues exactly; another number is refused
      (``world_size`` is a saved setting). Every rank reads the run directory when it starts, so
      it must be on a file system they share.

    The gathered result equals one process drawing the shards one after the other with the same
    per-rank streams; a single process runs exactly as without torchrun.

    Returns an :class:`OptimizeResult`. Each history record holds ``round``, ``reward_mean``,
    ``reward_std``, ``reward_max``, ``reward_top_k`` (mean of the ``top_k`` best rewards of the
    round), ``reward_at_mean`` (f(z̄_k), with ``gradient_at="mean"``), ``target_mean`` (mean y of
    the guidance that produced the round), ``value_queries`` and ``grad_queries`` (cumulative, per
    point: rounds 0 … k scored with B value queries each, plus one for f(z̄) with
    ``gradient_at="mean"``; k gradient queries of B points, or of 1 point at the mean),
    ``seconds``, and the caller's ``metrics``. Rounds k ≥ 1 also hold the diagnostics of
    :mod:`optidiff.optimize.delivered`: ``delivered_fraction`` (r of the guidance that produced
    the round, centred at the unguided round's mean), ``exact_fraction`` (ρ, what an exact
    Gaussian model would deliver for the same requests) and, for the increment rule,
    ``plateau`` (R + δ·r/(1 − r) − s, the mean reward at which the run stalls if every round
    delivers as this one, linearised at this round: R its mean reward, s its mean shift
    g_iᵀ(z_i − z̄₀); R₀ + δ·r/(1 − r) for a linear f; ``None`` when r ∉ (0, 1)) and
    ``exact_plateau`` (the same with ρ: where an exact model would stall, the linearised
    f(x_λ*)); with ``target_rule="corrected"``, ``target_correction`` (the mean factor c).
    """
    return run_loop(model, objective, sigmas, rounds=rounds, batch_size=batch_size,
                    increment=increment, target=target, guidance=guidance,
                    gradient_at=gradient_at, noise_std=noise_std, beta=beta, sampler=sampler,
                    sampler_kwargs=sampler_kwargs, top_k=top_k, metrics=metrics, run_dir=run_dir,
                    resume=resume, save_samples=save_samples, generator=generator, seed=seed,
                    dtype=dtype, device=device, progress=progress, target_rule=target_rule,
                    max_correction=max_correction)
