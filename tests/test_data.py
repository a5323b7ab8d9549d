"""Training from every kind of data source: tensors, datasets, memory-mapped arrays, loaders and
plain iterables; the order of the data is part of the checkpoint, so resumes are exact."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

import optidiff as od
from optidiff import rng
from optidiff.data import ArrayDataset, batch_stream

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
KW = {"steps": 12, "batch_size": 8, "seed": 4, "log_every": 4, "progress": False}


def mlp(seed=0):
    with rng.seeded(seed):
        return od.models.TimeMLP(2, hidden=16, depth=2, emb_dim=8)


class Stream(IterableDataset):
    """A deterministic iterable dataset of rows (samples, batched by optidiff)."""

    def __iter__(self):
        return iter(DATA)


def sources():
    return {
        "dataset": TensorDataset(DATA),
        "array": DATA.numpy(),
        "iterable_dataset": Stream(),
        "loader": DataLoader(TensorDataset(DATA), batch_size=8, shuffle=True,
                             generator=torch.Generator().manual_seed(1)),
        "generator": [DATA[i:i + 8] for i in range(0, 96, 8)],
    }


@pytest.mark.parametrize("kind", list(sources()))
def test_every_source_trains_and_resumes_bitwise(tmp_path, kind):
    full = od.train(mlp(), sources()[kind], **KW, run_dir=tmp_path / "a", checkpoint_every=4)
    od.train(mlp(), sources()[kind], **{**KW, "steps": 4}, run_dir=tmp_path / "b",
             checkpoint_every=4)
    resumed = od.train(mlp(1), sources()[kind], **KW, run_dir=tmp_path / "b",
                       checkpoint_every=4, resume=True)
    assert resumed.losses == full.losses  # 12 steps: the run crossed an epoch of 96 rows
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_dataset_epochs_follow_torchs_distributed_sampler():
    """Rank r of 2 reads, epoch by epoch, the order of DistributedSampler(seed, epoch): the two
    shards are disjoint and cover the data set."""
    ds = ArrayDataset(DATA.numpy(), np.arange(96, dtype=np.int64))
    seen = {}
    for rank in (0, 1):
        s = batch_stream(ds, None, batch_size=8, seed=4, rank=rank, world=2)
        idx = torch.cat([s.next()[1] for _ in range(6)])  # one epoch of 48 rows per rank
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, drop_last=True,
                                     seed=rng.derive_seed("optidiff", 4, "epochs") % 2**31)
        assert idx.tolist() == list(sampler)
        seen[rank] = set(idx.tolist())
        nxt = s.next()[1]  # the next epoch is another permutation
        sampler.set_epoch(1)
        assert nxt.tolist() == list(sampler)[:8]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(96))


def test_conditions_come_with_the_batches():
    labels = torch.arange(96) % 3
    with rng.seeded(0):
        model = od.models.TimeMLP(2, hidden=16, depth=2, emb_dim=8, num_classes=3)
    res = od.train(model, TensorDataset(DATA, labels), steps=3, batch_size=8, cond_drop=0.2,
                   progress=False)
    assert len(res.losses) == 3
    with pytest.raises(ValueError, match="needs conditions"):
        od.train(mlp(), TensorDataset(DATA), steps=2, batch_size=8, cond_drop=0.2,
                 progress=False)
    with pytest.raises(ValueError, match="a pair \\(x, cond\\)"):
        od.train(mlp(), [{"x": DATA[:8]}], steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        od.train(mlp(), TensorDataset(DATA[:4]), steps=1, batch_size=8, progress=False)


def test_memmap_training_memory_does_not_grow_with_the_file(tmp_path):
    """Train 20 steps from memory-mapped files of 8 MB and of 400 MB (rows of 512 floats) in fresh
    processes: the peak resident memory differs by far less than the 392 MB between the files (only
    the rows read are paged in; what grows with the file is the sampler's index permutation, about
    90 bytes per row, not the data)."""
    script = tmp_path / "mm.py"
    script.write_text(textwrap.dedent("""
        import resource, sys
        import numpy as np, torch
        import optidiff as od
        torch.set_num_threads(1)
        path, rows = sys.argv[1], int(sys.argv[2])
        mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, 512))
        mm[::512] = 1.0  # touch one row in 4096; the file stays mostly unread
        mm.flush()
        del mm
        data = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, 512))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = od.models.TimeMLP(512, hidden=32, depth=1, emb_dim=8)
        od.train(model, data, steps=20, batch_size=32, progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
    """))
    growth = {}
    for rows in (4_096, 204_800):  # 8 MB and 400 MB of float32 rows of 512
        out = subprocess.run([sys.executable, str(script), str(tmp_path / f"{rows}.bin"),
                              str(rows)], capture_output=True, text=True, timeout=300, check=True)
        growth[rows] = int(out.stdout.split()[-1]) / 1024  # MB (ru_maxrss is in KB on Linux)
    assert growth[204_800] - growth[4_096] < 40, growth
