"""Several processes on torch's own engine: ``torchrun`` and ``torch.distributed``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init` starts the process group (gloo on CPU, nccl on
CUDA with device ``cuda:LOCAL_RANK``). Then

- ``od.train`` wraps the model in DistributedDataParallel and gives rank r its own batches;
- ``od.sample`` (``distributed=None``: whenever the group has more than one process) draws rank r's
  shard of the batch, rows :func:`shard` ``(B, r, world)``, with its own generator stream seeded
  :func:`rank_seed` ``(seed, r)``, and returns the whole batch gathered in rank order on every
  rank; so the gathered result equals one process drawing the shards one after the other with
  the same streams;
- ``od.optimize.gradient_guided`` and ``adaptive`` sample, score and differentiate the objective
  on each rank's shard with the rank's own stream, gather the round's samples, rewards and
  targets for the records (the same on every rank, written by rank 0 only), and fine-tune
  (Algorithm 2) under DistributedDataParallel (see :func:`optidiff.optimize.gradient_guided`).

Launch a script that calls them with ``torchrun --nproc-per-node 2 script.py`` (one node; add
``--nnodes``/``--rdzv-endpoint`` for several).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import rng

__all__ = ["barrier", "broadcast", "gather", "init", "rank_seed", "rank_world", "session",
           "shard"]


def init(device: torch.device) -> tuple[int, int, bool, torch.device]:
    """(rank, world size, whether this call created the process group, device) from torchrun's
    environment; (0, 1, False, device) on a single process."""
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    rank, world = rank_world()
    return rank, world, created, device


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """``with session(device) as (rank, world, device)``: :func:`init`, and the process group
    destroyed on exit if this call created it."""
    rank, world, created, device = init(device)
    ok = False
    try:
        yield rank, world, device
        ok = True
    finally:
        if created:
            _close(ok)


def _close(ok: bool) -> None:
    """Destroy the process group this process created. After a successful run (``ok``) first
    free unreachable objects (a DDP wrapper's reducer sits in a reference cycle and must not
    outlive the group) and wait for every rank, so no rank tears the group down while another
    still uses it; the 2-process gloo test once aborted at exit ("terminate called without an
    active exception") without this. After an error only destroy: a barrier could wait forever
    for a rank that failed."""
    if ok:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing on a single process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous rows of a batch of ``n``: the first ``n % world`` ranks get one
    more than ``n // world``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator stream for a run seeded ``seed``."""
    return rng.derive_seed("optidiff", seed, "rank", rank)


def gather(x: Tensor) -> Tensor:
    """The rows of ``x`` from every rank, concatenated in rank order, on every rank (shards may
    differ in length by one; a single process returns ``x``)."""
    rank, world = rank_world()
    if world == 1:
        return x
    comm = x if dist.get_backend() != "nccl" else x.cuda()
    sizes = torch.zeros(world, dtype=torch.long, device=comm.device)
    sizes[rank] = len(x)
    dist.all_reduce(sizes)
    pad = int(sizes.max())
    padded = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=comm.device)
    padded[:len(x)] = comm
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes.tolist())]).to(x.device)


def broadcast(x: Tensor | None, like: Tensor) -> Tensor:
    """Rank 0's ``x`` (converted to the dtype and device of ``like``) on every rank; the other
    ranks pass ``None`` and ``like`` gives the shape (a single process returns ``x``)."""
    if rank_world()[1] == 1:
        return x
    buf = x.to(like).reshape(like.shape).clone() if x is not None else torch.empty_like(like)
    comm = buf if dist.get_backend() != "nccl" else buf.cuda()
    dist.broadcast(comm, 0)
    return comm.to(like.device)
