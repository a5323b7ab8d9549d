"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): od.sample
on a shared batch; rank r writes what it returned to ``OUT/rank{r}.safetensors``."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import optidiff as od

out = Path(sys.argv[1])
torch.distributed.init_process_group("gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(0)  # the same network on every rank
model = od.models.TimeMLP(3, hidden=16, depth=2, emb_dim=8).eval()
sigmas = od.LogLinearSchedule().sample_sigmas(6, final_zero=True)
result = {"ddpm": od.sample(model, sigmas, batch_size=7, sampler="ddpm", seed=3, progress=False)}
x_init = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 10
result["x_init"] = od.sample(model, sigmas, x_init=x_init, sampler="ge", seed=0, progress=False)
try:
    od.sample(model, sigmas, batch_size=4, generator=torch.Generator())
except ValueError as e:
    result["refused"] = torch.tensor([int("needs seed=" in str(e))])
save_file({k: v.contiguous() for k, v in result.items()}, out / f"rank{rank}.safetensors")
torch.distributed.destroy_process_group()
