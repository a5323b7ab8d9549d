"""Denoising score matching and the training loop (EMA, DDP, exact resume).

Loss (Vincent 2011; the "score matching as regression" view of the Wang & Chen tutorial;
ε-parametrisation of Ho et al. 2020): with ``x = x0 + σ·ε`` and score ``−eps/σ``, the DSM objective
``σ²·E‖s_θ(x, σ) + ε/σ‖²`` is ``E‖eps_θ(x, σ) − ε‖²``. σ is drawn per sample uniformly from the
indices of a discrete table (as Permenter & Yuan, ICML 2024, train on a discrete σ table).

Randomness: two ``torch.Generator``'s derived from ``(seed, rank)``: one on the data's device for
batch indices, one on the training device for σ indices, noise and condition dropout. Their states
are saved in every checkpoint, so a resumed run repeats the draws of an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, rng
from .checkpoint import (
    CheckpointError,
    append_jsonl,
    flatten_state,
    has_checkpoint,
    load_checkpoint,
    pack,
    read_jsonl,
    save_checkpoint,
    set_generator_state,
    unflatten_state,
    unpack,
    write_jsonl,
)
from .data import batch_stream
from .device import autocast, check_precision
from .models.base import sigma_like
from .models.registry import load_model, model_to_config, save_model
from .sampling import progress_off
from .schedules import LogLinearSchedule, Schedule

__all__ = ["LR_SCHEDULES", "TrainResult", "dsm_loss", "load_model", "save_model", "train"]

#: the learning-rate schedules of :func:`train`
LR_SCHEDULES = ("constant", "cosine")

# ----------------------------------------------------------------------------------------------
# loss


def dsm_loss(model: Any, x0: Tensor, sigma: Tensor, *, cond: Any = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching loss in the ε-parametrisation:

        L = mean over batch and coordinates of (model(x0 + σ·ε, σ, cond) − ε)²,   ε ~ N(0, I),

    i.e. ``F.mse_loss`` (multiply by the number of coordinates for the per-sample ‖·‖²). ``sigma``:
    shape ``(B,)`` (one σ per sample) or 0-d. ε is drawn from ``generator``.
    """
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return F.mse_loss(model(x0 + sigma_like(sigma, x0) * eps, sigma, cond), eps)


# ----------------------------------------------------------------------------------------------
# training loop


@dataclass
class TrainResult:
    """``model``: trained weights; ``ema``: a copy with the EMA weights; ``losses``: the DSM loss of
    every step 1…``step`` (this rank's batches); ``optimizer``: the AdamW state."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[float]
    step: int
    run_dir: Path | None = None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write this result as ``directory/checkpoint`` (see :mod:`optidiff.results`)."""
        from .results import save_train_result
        return save_train_result(self, directory)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: Any = None) -> TrainResult:
        """The result saved in ``run_dir``, or of a training run there (``od.train(run_dir=)``,
        ``optidiff train``)."""
        from .results import load_train_result
        return load_train_result(run_dir, device)


def _sigma_table(schedule: Schedule | Tensor | None) -> Tensor:
    table = LogLinearSchedule() if schedule is None else schedule
    table = torch.as_tensor(getattr(table, "sigmas", table), dtype=torch.float64).cpu()
    if table.ndim != 1 or len(table) < 1 or not torch.isfinite(table).all() or (table <= 0).any():
        raise ValueError(f"schedule must give a 1-D table of finite positive sigmas, got "
                         f"{schedule!r}")
    return table


def _check_args(model, data, cond, steps, batch_size, lr, weight_decay, ema_decay, grad_clip,
                cond_drop, log_every, checkpoint_every, resume, run_dir, seed, precision,
                lr_schedule) -> None:
    def positive_int(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={v!r}")

    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise ValueError(f"model must be an nn.Module with parameters, got {type(model).__name__}")
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_int("log_every", log_every)
    if checkpoint_every is not None:
        positive_int("checkpoint_every", checkpoint_every)
    rng.check_seed(seed)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got lr={lr!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                         f"lr_schedule={lr_schedule!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got ema_decay={ema_decay!r}")
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise ValueError(f"grad_clip must be positive or None, got grad_clip={grad_clip!r}")
    if not 0 <= cond_drop < 1:
        raise ValueError(f"cond_drop must be in [0, 1), got cond_drop={cond_drop!r}")
    if (resume or checkpoint_every is not None) and run_dir is None:
        raise ValueError(f"resume={resume!r} / checkpoint_every={checkpoint_every!r} need a "
                         f"run_dir")
    check_precision(precision)
    if not isinstance(data, Tensor):  # a dataset or loader: its batches are checked as they come
        return
    if data.ndim < 2 or len(data) == 0 or not data.is_floating_point():
        raise ValueError(f"data must be a non-empty floating tensor of shape (N, *dims), got "
                         f"{type(data).__name__} {tuple(getattr(data, 'shape', ()))}")
    if not torch.isfinite(data).all():
        raise ValueError("data must be finite (found NaN or inf)")
    if cond is None:
        if cond_drop > 0:
            raise ValueError(f"cond_drop={cond_drop} needs cond")
    elif not isinstance(cond, Tensor) or cond.ndim not in (1, 2) or len(cond) != len(data):
        raise ValueError(f"cond must be a tensor of shape (N,) or (N, k) with N=len(data)="
                         f"{len(data)}, got {tuple(getattr(cond, 'shape', ()))}")
    elif not cond.is_floating_point() and cond.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cond must hold integer class labels or float values, got {cond.dtype}")


def _drop_cond(c: Tensor, drop: Tensor) -> Tensor:
    """Null condition for dropped rows: label −1 (integers) or a NaN row (floats)."""
    if c.is_floating_point():
        return c.masked_fill(drop.view(-1, *([1] * (c.ndim - 1))), math.nan)
    return torch.where(drop, torch.full_like(c, -1), c)


def train(model: nn.Module, data: Any, *, steps: int, batch_size: int = 256, lr: float = 1e-3,
          weight_decay: float = 0.0, schedule: Schedule | Tensor | None = None,
          ema_decay: float = 0.999, grad_clip: float | None = 1.0, seed: int = 0,
          cond: Tensor | None = None, cond_drop: float = 0.0,
          run_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          resume: bool = False, progress: bool | None = None, log_every: int = 100,
          device: torch.device | str | None = None, precision: str = "fp32",
          num_workers: int = 0, lr_schedule: str = "constant") -> TrainResult:
    """Train an ε-model by denoising score matching (:func:`dsm_loss`) with AdamW.

    ``data`` is a tensor (N, *dims), a NumPy array or memmap, a map-style ``Dataset``, an
    ``IterableDataset``, a ``DataLoader`` or any iterable of batches (``x`` or ``(x, cond)``); see
    :mod:`optidiff.data` for how each is drawn, sharded and resumed (``num_workers`` loader
    processes for datasets). Each step takes ``batch_size`` rows of ``data`` (from a tensor:
    uniformly, with replacement), one σ per row
    uniformly from the indices of ``schedule.sigmas`` (default ``LogLinearSchedule()``:
    σ ∈ [0.02, 10], 1000 levels, for data scaled to unit variance), and noise; clips the gradient
    to global norm ``grad_clip``; takes an AdamW step; updates the EMA
    ``θ_ema ← d·θ_ema + (1−d)·θ`` with ``d = min(ema_decay, (1+t)/(10+t))`` at update t (the
    warm-up of TensorFlow's ExponentialMovingAverage and diffusers' EMAModel). ``lr_schedule``:
    ``"constant"``, or ``"cosine"``: ``lr_t = lr·½(1 + cos(π t/steps))`` at update t = 0, …,
    steps − 1 (Loshchilov & Hutter, "SGDR", ICLR 2017, one cycle without restarts; it depends on
    ``steps``, so a resumed cosine run must keep them).

    Conditioning: ``cond`` (N,) integer labels or (N,)/(N, k) float values aligned with a tensor
    or array ``data`` (a dataset or loader yields ``(x, cond)`` pairs instead);
    with probability ``cond_drop`` a row's condition becomes the null condition (label −1, or a
    NaN row for float conditions; the model must map it to "unconditional"), for
    classifier-free guidance.

    Run directory: ``run_dir/metrics.jsonl`` gets ``{"step", "loss", "steps_per_s", "elapsed_s"}``
    every ``log_every`` steps (loss: mean since the last record, over all ranks);
    ``run_dir/checkpoint`` (see :mod:`optidiff.checkpoint`) is written every ``checkpoint_every``
    steps and at the end, with model, EMA, optimizer, generator states, losses and settings.
    ``resume=True`` continues from that checkpoint (or starts afresh if there is none) and ends
    with bitwise the same result as an uninterrupted run, logging the same losses; without it an
    existing checkpoint is an error, so nothing is overwritten by accident.

    Distributed: under ``torchrun`` (WORLD_SIZE > 1) the process group is initialised (gloo on
    CPU, nccl on CUDA, device ``cuda:LOCAL_RANK``), the model wrapped in DistributedDataParallel,
    rank r trains on rows ``r::world`` with its own generators, and only rank 0 writes files and
    shows progress. ``batch_size`` is per rank.

    Precision: ``"bf16"`` or ``"fp16"`` run the forward pass under ``torch.autocast`` (the
    parameters, the optimizer state, the EMA and the loss stay in float32); fp16 scales the loss
    with ``torch.amp.GradScaler`` (on CUDA) so small gradients do not underflow. ``device``: where
    to train (default: the model's device); every tensor the loop creates is made there.

    The loss is read back to the host only at log and checkpoint steps; a non-finite loss raises
    ``FloatingPointError`` there, naming the first bad step, before any checkpoint is written.
    """
    _check_args(model, data, cond, steps, batch_size, lr, weight_decay, ema_decay, grad_clip,
                cond_drop, log_every, checkpoint_every, resume, run_dir, seed, precision,
                lr_schedule)
    table = _sigma_table(schedule)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    with distributed.session(device) as (rank, world, device):
        return _train(model.to(device), data, cond, table, rank, world, device, param.dtype,
                      steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      ema_decay=ema_decay, grad_clip=grad_clip, seed=seed, cond_drop=cond_drop,
                      run_dir=None if run_dir is None else Path(run_dir),
                      checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                      log_every=log_every, precision=precision, num_workers=num_workers,
                      lr_schedule=lr_schedule)


def _train(model, data, cond, table, rank, world, device, dtype, *, steps, batch_size, lr,
           weight_decay, ema_decay, grad_clip, seed, cond_drop, run_dir, checkpoint_every, resume,
           progress, log_every, precision, num_workers, lr_schedule) -> TrainResult:
    stream = batch_stream(data, cond, batch_size=batch_size, seed=seed, rank=rank, world=world,
                          num_workers=num_workers)
    settings = {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "ema_decay": ema_decay, "grad_clip": grad_clip, "seed": seed,
                "cond_drop": cond_drop, "world_size": world, "data": stream.describe,
                "precision": precision}
    if lr_schedule != "constant":  # absent for the default, so older checkpoints still resume
        settings["lr_schedule"] = f"{lr_schedule} over {steps} steps"
    # DDP broadcasts rank 0's parameters when it wraps the model: copy the EMA after that
    net = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g_noise = rng.generator(rng.derive_seed("optidiff", seed, rank, "noise"), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    losses: list[float] = []
    start = 0
    ckpt_dir = None if run_dir is None else run_dir / "checkpoint"
    if ckpt_dir is not None and has_checkpoint(ckpt_dir):
        if not resume:
            raise ValueError(f"run_dir {str(run_dir)!r} already holds a checkpoint; pass "
                             f"resume=True to continue it or choose another run_dir")
        start, losses = _restore(ckpt_dir, model, ema, optimizer, stream, g_noise, rank,
                                 settings, table, steps)

    params, ema_params = list(model.parameters()), list(ema.parameters())
    sigmas = table.to(device=device, dtype=dtype)
    writer = rank == 0 and run_dir is not None
    if writer:  # records after the last full log interval are logged again, over that interval
        _trim_metrics(run_dir, start - start % log_every)
    bar = tqdm(total=steps, initial=start, desc="train",
               disable=True if rank != 0 else progress_off(progress), dynamic_ncols=True)
    pending: list[Tensor] = []
    # a resumed run's log window starts where the uninterrupted run's did, so it logs the same mean
    last_log, t0 = start - start % log_every, time.perf_counter()
    model.train()
    try:
        for t in range(start, steps):
            x0, c = stream.next()
            n = len(x0)
            x0 = x0.to(device=device, dtype=dtype, non_blocking=True)
            sigma = sigmas[torch.randint(len(sigmas), (n,), generator=g_noise, device=device)]
            if c is not None:
                c = c.to(device, non_blocking=True)
                if cond_drop > 0:
                    c = _drop_cond(c, torch.rand(n, generator=g_noise, device=device) < cond_drop)
            elif cond_drop > 0:
                raise ValueError(f"cond_drop={cond_drop} needs conditions; the data yield none")
            with autocast(device, precision):
                loss = dsm_loss(net, x0, sigma, cond=c, generator=g_noise).float()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, grad_clip)
            if lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():  # the EMA must not join the autograd graph
                torch._foreach_lerp_(ema_params, params, 1.0 - min(ema_decay, (1 + t) / (10 + t)))
            pending.append(loss.detach())
            bar.update(1)

            done = t + 1
            is_log = done % log_every == 0 or done == steps
            is_ckpt = ckpt_dir is not None and (
                done == steps or (checkpoint_every is not None and done % checkpoint_every == 0))
            if not (is_log or is_ckpt):
                continue
            mean = _flush(pending, losses, last_log, world, device)
            if is_log:
                rate = (done - last_log) / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean:.4g}")
                if writer:
                    append_jsonl(run_dir / "metrics.jsonl",
                                 {"step": done, "loss": mean, "steps_per_s": rate,
                                  "elapsed_s": time.perf_counter() - t0})
                last_log, t0 = done, time.perf_counter()
            if is_ckpt:
                _copy_buffers(model, ema)
                _save(ckpt_dir, model, ema, optimizer, stream, g_noise, losses, done, settings,
                      table, rank, world, device)
    finally:
        bar.close()
    _copy_buffers(model, ema)
    return TrainResult(model=model, ema=ema, optimizer=optimizer, losses=losses, step=steps,
                       run_dir=run_dir)


def _flush(pending: list[Tensor], losses: list[float], last_log: int, world: int,
           device: torch.device) -> float:
    """Move pending losses to ``losses`` (one host sync); return the mean since ``last_log`` over
    all ranks; raise FloatingPointError at a non-finite loss (on every rank alike)."""
    first = len(losses) + 1
    losses.extend(torch.stack(pending).tolist())
    pending.clear()
    bad = next((first + i for i, v in enumerate(losses[first - 1:]) if not math.isfinite(v)), 0)
    window = losses[last_log:]
    stats = torch.tensor([sum(window) / len(window), float(bad > 0)], dtype=torch.float64)
    if world > 1:
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu() / torch.tensor([world, 1.0], dtype=torch.float64)
    if stats[1] > 0:
        where = f"at step {bad}" if bad else f"on another rank by step {len(losses)}"
        raise FloatingPointError(f"DSM loss became non-finite {where}; lower lr or check the "
                                 f"data scale and the model")
    return stats[0].item()


def _copy_buffers(model: nn.Module, ema: nn.Module) -> None:
    """EMA covers parameters; buffers (e.g. normalisation statistics) are copied."""
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _trim_metrics(run_dir: Path, start: int) -> None:
    """Keep only the training records up to step ``start`` in metrics.jsonl (a resumed run drops
    what was logged after its checkpoint, and a half-written last line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= start]
    write_jsonl(path, kept if start > 0 else [])


def _save(ckpt_dir, model, ema, optimizer, stream, g_noise, losses, step, settings, table, rank,
          world, device) -> None:
    """Checkpoint (collective under DDP: every rank's generator states are gathered to rank 0).
    The data stream's position is part of it: a tensor stream's generators (per rank) or the
    (epoch, batches read) of a dataset or loader (the same on every rank)."""
    states = {}
    gens = [("noise", g_noise)]
    if isinstance(stream.state_dict().get("generator"), Tensor):
        gens.insert(0, ("data", stream.generator))
    for name, g in gens:
        s = g.get_state()
        if world > 1:
            comm = s.to(device) if dist.get_backend() == "nccl" else s
            parts = [torch.empty_like(comm) for _ in range(world)]
            dist.all_gather(parts, comm)
            states.update({f"rng.{name}.{r}": p.cpu() for r, p in enumerate(parts)})
        else:
            states[f"rng.{name}.0"] = s
    if rank != 0:
        return
    opt_tensors: dict[str, Tensor] = {}
    opt_meta = flatten_state(optimizer.state_dict(), opt_tensors, prefix="optim")
    tensors = {**pack("model.", model.state_dict()), **pack("ema.", ema.state_dict()),
               **opt_tensors, **states, "losses": torch.tensor(losses, dtype=torch.float64),
               "sigmas": table}
    try:
        model_config = model_to_config(model)
    except ValueError:
        model_config = None
    data_state = None if len(gens) == 2 else stream.state_dict()
    save_checkpoint(ckpt_dir, tensors, {"kind": "train", "step": step, "settings": settings,
                                        "optimizer": opt_meta, "model": model_config,
                                        "data_state": data_state})


def _restore(ckpt_dir, model, ema, optimizer, stream, g_noise, rank, settings, table, steps):
    """Load a training checkpoint into the given objects; return (step, losses)."""
    tensors, meta = load_checkpoint(ckpt_dir)
    if meta.get("kind") != "train" or "step" not in meta or "settings" not in meta:
        raise CheckpointError(f"{str(ckpt_dir)!r} is not a training checkpoint")
    diff = {k: (meta["settings"].get(k), v) for k, v in settings.items()
            if meta["settings"].get(k) != v}
    if diff:
        raise ValueError(f"cannot resume {str(ckpt_dir)!r} with different settings "
                         f"(checkpoint, now): {diff}")
    if "sigmas" not in tensors or not torch.equal(tensors["sigmas"], table):
        raise ValueError(f"cannot resume {str(ckpt_dir)!r}: the schedule differs")
    if meta["step"] > steps:
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} is at step {meta['step']}, beyond "
                         f"steps={steps}")
    try:
        model.load_state_dict(unpack(tensors, "model."))
        ema.load_state_dict(unpack(tensors, "ema."))
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} does not fit the model: {e}") from None
    try:
        optimizer.load_state_dict(unflatten_state(meta["optimizer"], tensors))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: the optimizer state does not fit "
                              f"({e})") from None
    gens = [("noise", g_noise)]
    if meta.get("data_state") is None:
        gens.append(("data", stream.generator))
    else:
        stream.load_state_dict(meta["data_state"])
    for name, g in gens:
        key = f"rng.{name}.{rank}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} lacks the generator state {key!r}")
        set_generator_state(g, tensors[key])
    return meta["step"], tensors["losses"].tolist()
