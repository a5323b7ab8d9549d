"""Sampling and optimization under torchrun: 2 CPU processes (gloo) against one process drawing
the same per-rank streams."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import optidiff as od
from optidiff.distributed import rank_seed, shard


def test_shards_cover_the_batch_in_order():
    for n, world in ((7, 2), (8, 4), (5, 3), (3, 3)):
        parts = [shard(n, r, world) for r in range(world)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def _torchrun(worker, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(Path(__file__).with_name(worker)), str(out)],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]


def test_sample_under_torchrun_equals_one_process_with_the_same_streams(tmp_path):
    ranks = _torchrun("dist_worker.py", tmp_path)
    torch.manual_seed(0)
    model = od.models.TimeMLP(3, hidden=16, depth=2, emb_dim=8).eval()
    sigmas = od.LogLinearSchedule().sample_sigmas(6, final_zero=True)
    ddpm = torch.cat([od.sample(model, sigmas, batch_size=n, sampler="ddpm",
                                seed=rank_seed(3, r), progress=False)
                      for r, n in enumerate((4, 3))])
    x_init = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 10
    ge = torch.cat([od.sample(model, sigmas, x_init=x_init[shard(5, r, 2)], sampler="ge",
                              seed=rank_seed(0, r), progress=False) for r in (0, 1)])
    for got in ranks:  # every rank returns the gathered batch
        assert torch.equal(got["ddpm"], ddpm) and torch.equal(got["x_init"], ge)
        assert got["refused"].item() == 1  # a generator cannot be shared out by rank
    assert not torch.equal(ddpm[:3], ddpm[4:])  # the two ranks drew different streams
