"""Training data as a resumable stream of minibatches, whatever its source.

:func:`batch_stream` turns what :func:`optidiff.train` is given into a stream with ``next()``
(one minibatch ``(x0, cond or None)``) and a ``state_dict()`` that makes the order of the data part
of the checkpoint, so a resumed run sees the batches an uninterrupted run would have seen:

- a **tensor** (with an aligned ``cond`` tensor): ``batch_size`` rows drawn uniformly with
  replacement from a seeded generator (rank r of a distributed run draws from rows ``r::world``);
  the generator's state is the stream's state;
- a **map-style** ``torch.utils.data.Dataset`` (items ``x`` or ``(x, cond)``), or a NumPy array or
  ``numpy.memmap`` (wrapped in :class:`ArrayDataset`, rows read lazily: what memory grows with
  is the sampler's index permutation, about 90 bytes per row, not the data): epochs in the seeded order of torch's own ``DistributedSampler`` (``shuffle``,
  ``drop_last``; rank r reads its shard), fetched by a ``DataLoader`` with ``num_workers``
  processes; the state is (epoch, batches read in it);
- an ``IterableDataset`` (samples, batched here) or a ``DataLoader`` or any other iterable of
  batches (``x`` or ``(x, cond)``): read in order and restarted when exhausted (``set_epoch`` of a
  DataLoader's sampler is called with the epoch); the state is (epoch, batches read), and a resume
  replays the iterable up to that point, which is exact when the iterable is deterministic. A
  distributed run must shard such a source itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from . import rng
from .checkpoint import CheckpointError, set_generator_state

__all__ = ["ArrayDataset", "batch_stream", "first_batch", "sample_shape"]


class ArrayDataset(Dataset):
    """A NumPy array (or ``numpy.memmap``) of shape (N, *dims) as a map-style dataset, with an
    optional aligned ``cond`` array; a batch of rows is read with one fancy index (``__getitems__``),
    so a memory-mapped file is read row by row as needed."""

    def __init__(self, array: np.ndarray, cond: np.ndarray | None = None):
        if array.ndim < 2 or len(array) == 0:
            raise ValueError(f"data array must have shape (N, *dims) with N >= 1, got "
                             f"{array.shape}")
        if cond is not None and len(cond) != len(array):
            raise ValueError(f"cond has {len(cond)} rows, data {len(array)}")
        self.array, self.cond = array, cond

    def __len__(self) -> int:
        return len(self.array)

    def _rows(self, idx: Any) -> Any:
        x = torch.from_numpy(np.ascontiguousarray(self.array[idx]))
        return x if self.cond is None else (x, torch.from_numpy(np.asarray(self.cond[idx])))

    def __getitem__(self, i: int) -> Any:
        return self._rows(i)

    def __getitems__(self, indices: list[int]) -> Any:
        order = np.argsort(indices)  # read the file forward, return in the sampler's order
        rows = self._rows(np.asarray(indices)[order])
        inv = torch.from_numpy(np.argsort(order))
        return rows[inv] if self.cond is None else (rows[0][inv], rows[1][inv])


def _first_collate(batch: Any) -> Any:
    """The collate of :meth:`ArrayDataset.__getitems__` batches: they are already stacked."""
    return batch


def _split(batch: Any, where: str) -> tuple[Tensor, Tensor | None]:
    """``x``, ``(x,)`` or ``(x, cond)`` → ``(x, cond or None)``, checked."""
    if isinstance(batch, (tuple, list)) and len(batch) == 1:  # e.g. a TensorDataset of x only
        batch = batch[0]
    if isinstance(batch, Tensor):
        x, c = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, c = batch
        c = None if c is None else torch.as_tensor(c)
    else:
        raise ValueError(f"{where}: a batch must be a tensor x or a pair (x, cond), got "
                         f"{type(batch).__name__}")
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"{where}: x must be a float tensor of shape (B, *dims), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    return x, c


class _TensorStream:
    """Rows drawn with replacement from a tensor shard (the stream of optidiff 0.1, unchanged)."""

    kind = "tensor"

    def __init__(self, data: Tensor, cond: Tensor | None, batch_size: int, seed: int,
                 rank: int, world: int):
        if len(data) < world:
            raise ValueError(f"data has {len(data)} rows, fewer than the {world} ranks")
        self.shard = data[rank::world]
        self.cond = None if cond is None else cond[rank::world]
        self.batch_size = batch_size
        self.generator = rng.generator(rng.derive_seed("optidiff", seed, rank, "data"),
                                       self.shard.device)
        self.describe = {"kind": "tensor", "shape": list(data.shape),
                         "cond": None if cond is None else str(cond.dtype)}

    def next(self) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(len(self.shard), (self.batch_size,), generator=self.generator,
                            device=self.shard.device)
        return self.shard[idx], None if self.cond is None else self.cond[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_state(self.generator, state["generator"])


class _IterStream:
    """Batches read in order from an iterable, restarted at each epoch (see the module doc)."""

    def __init__(self, make: Any, describe: dict[str, Any], set_epoch: Any = None):
        self.make, self.describe, self.set_epoch = make, describe, set_epoch
        self.epoch, self.read = 0, 0
        self._it: Iterator | None = None

    def _start(self, skip: int) -> None:
        if self.set_epoch is not None:
            self.set_epoch(self.epoch)
        self._it = iter(self.make())
        for _ in range(skip):
            if next(self._it, None) is None:
                raise CheckpointError(f"the data source has fewer than {skip} batches in epoch "
                                      f"{self.epoch}; it cannot be replayed to the checkpoint")

    def next(self) -> tuple[Tensor, Tensor | None]:
        if self._it is None:
            self._start(self.read)
        batch = next(self._it, None)
        if batch is None:  # the epoch is over
            self.epoch, self.read = self.epoch + 1, 0
            self._start(0)
            batch = next(self._it, None)
            if batch is None:
                raise ValueError("the data source yields no batch")
        self.read += 1
        return _split(batch, f"data batch {self.read} of epoch {self.epoch}")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "read": self.read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.read, self._it = int(state["epoch"]), int(state["read"]), None


def batch_stream(data: Any, cond: Tensor | None, *, batch_size: int, seed: int, rank: int,
                 world: int, num_workers: int = 0) -> Any:
    """The resumable minibatch stream of ``data`` (see the module docstring)."""
    if isinstance(data, Tensor):
        return _TensorStream(data, cond, batch_size, seed, rank, world)
    if cond is not None and not isinstance(data, np.ndarray):
        raise ValueError("cond= goes with a tensor or array of data; a dataset or loader yields "
                         "(x, cond) pairs itself")
    if isinstance(data, np.ndarray):
        data = ArrayDataset(data, None if cond is None else np.asarray(cond))
    if isinstance(data, IterableDataset):
        ds = data
        return _IterStream(lambda: DataLoader(ds, batch_size=batch_size, num_workers=num_workers),
                           {"kind": "iterable_dataset", "class": type(ds).__name__})
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) < world * batch_size:
            raise ValueError(f"the dataset has {len(data)} items, fewer than one batch of "
                             f"{batch_size} per rank for {world} rank(s)")
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                     seed=rng.derive_seed("optidiff", seed, "epochs") % 2**31,
                                     drop_last=True)
        collate = _first_collate if isinstance(data, ArrayDataset) else None
        loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_workers, collate_fn=collate)
        return _IterStream(lambda: loader, {"kind": "dataset", "len": len(data)},
                           sampler.set_epoch)
    if isinstance(data, Iterable):
        sampler = getattr(data, "sampler", None)
        return _IterStream(lambda: data, {"kind": "iterable", "class": type(data).__name__},
                           getattr(sampler, "set_epoch", None))
    raise ValueError(f"data must be a tensor, a NumPy array, a Dataset, a DataLoader or an "
                     f"iterable of batches, got {type(data).__name__}")


def first_batch(stream: Any) -> tuple[Tensor, Tensor | None]:
    """A batch of ``stream`` without advancing it (its state is restored), for checks."""
    state = stream.state_dict()
    saved = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
    batch = stream.next()
    stream.load_state_dict(saved)
    return batch


def sample_shape(data: Any) -> tuple[int, ...] | None:
    """The shape of one sample of ``data`` (a tensor or array: its rows; a map-style dataset or a
    loader over one: its first item's ``x``), or None when it cannot be known without iterating."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (Tensor, np.ndarray)):
        return tuple(data.shape[1:])
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) \
            and hasattr(data, "__len__") and len(data) > 0:
        item = data[0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return tuple(np.shape(x))
    return None

