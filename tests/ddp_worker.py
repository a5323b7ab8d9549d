"""Run by tests/test_training.py under ``torchrun --nproc_per_node=2``: each rank trains a TimeMLP
(initialised differently per rank, so DDP's broadcast is exercised) and writes its final weights,
losses and checkpoint-save count to ``OUT/rank{r}.*``."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import optidiff as od
from optidiff import training

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
saves = []
real_save = training.save_checkpoint


def counting_save(*args, **kwargs):
    saves.append(1)
    return real_save(*args, **kwargs)


training.save_checkpoint = counting_save

torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
model = od.models.TimeMLP(2, hidden=16, depth=2, emb_dim=8)
data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
result = od.train(model, data, steps=6, batch_size=16, seed=0, run_dir=out / "run", log_every=2,
                  progress=False)
tensors = {**{f"model.{k}": v for k, v in result.model.state_dict().items()},
           **{f"ema.{k}": v for k, v in result.ema.state_dict().items()}}
save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"rank{rank}.safetensors")
(out / f"rank{rank}.json").write_text(json.dumps({"saves": len(saves), "losses": result.losses}))
