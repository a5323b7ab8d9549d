"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): od.sample,
Algorithm 1 (``gradient_guided``: per-sample and batch-mean gradients, a run directory, a resumed
run) and Algorithm 2 (``adaptive`` with a TimeMLP fine-tuned under DDP). Rank r writes what it got
to ``OUT/rank{r}.safetensors`` and ``OUT/rank{r}.json``. The settings are shared with the test's
one-process emulation (imported from this file)."""

import json
import os
import sys
from pathlib import Path

import torch

import optidiff as od

SIGMAS = od.LogLinearSchedule().sample_sigmas(6, final_zero=True)
#: Algorithm 1 runs: 7 samples (shards of 4 and 3 rows) and 6 with the gradient at the batch mean
GG = {"sample": {"rounds": 3, "batch_size": 7, "increment": 0.5, "seed": 5},
      "mean": {"rounds": 2, "batch_size": 6, "target": 1.0, "gradient_at": "mean", "seed": 6}}
#: Algorithm 2: a TimeMLP fine-tuned by DSMFinetune (2 Adam steps per round, under DDP)
AD = {"rounds": 2, "batch_size": 6, "increment": 0.5, "steps_per_round": 2, "seed": 7}
WRITERS = ("save_tensors", "append_jsonl", "write_jsonl", "save_state", "write_text")


def objective(x):
    return -((x - 2.0) ** 2).sum(1)


def gaussian():
    return od.models.GaussianDenoiser(torch.zeros(3), torch.diag(torch.tensor([1.0, 0.5, 0.2])))


def mlp():
    torch.manual_seed(0)  # the same network on every rank
    return od.models.TimeMLP(3, hidden=16, depth=2, emb_dim=8)


def record(result):
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in result.history]


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from optidiff import checkpoint
    from optidiff.optimize import adaptive, gradient_guided

    writes = {name: 0 for name in WRITERS}

    def counting(name, real):
        def write(*args, **kwargs):
            writes[name] += 1
            return real(*args, **kwargs)
        return write

    for name in WRITERS:  # count the run-directory writes of each rank
        setattr(checkpoint, name, counting(name, getattr(checkpoint, name)))

    torch.distributed.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    model = mlp().eval()
    result = {"ddpm": od.sample(model, SIGMAS, batch_size=7, sampler="ddpm", seed=3, progress=False)}
    x_init = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 10
    result["x_init"] = od.sample(model, SIGMAS, x_init=x_init, sampler="ge", seed=0, progress=False)
    try:
        od.sample(model, SIGMAS, batch_size=4, generator=torch.Generator())
    except ValueError as e:
        result["refused"] = torch.tensor([int("needs seed=" in str(e))])
    histories = {}
    for name, kw in GG.items():
        res = gradient_guided(gaussian(), objective, SIGMAS, progress=False,
                              run_dir=out / f"gg_{name}", **kw)
        result[f"gg_{name}.samples"], result[f"gg_{name}.best"] = res.samples, res.best_samples
        histories[f"gg_{name}"] = record(res)
    # a run stopped after round 1 and resumed to round 3 continues as the uninterrupted one
    kw = {**GG["sample"], "rounds": 1}
    gradient_guided(gaussian(), objective, SIGMAS, progress=False, run_dir=out / "resumed", **kw)
    kw["rounds"] = GG["sample"]["rounds"]
    res = gradient_guided(gaussian(), objective, SIGMAS, progress=False, run_dir=out / "resumed",
                          resume=True, **kw)
    result["resumed.samples"], histories["resumed"] = res.samples, record(res)
    net = mlp()
    res = adaptive(net, objective, SIGMAS, progress=False, run_dir=out / "adaptive", **AD)
    result["adaptive.samples"], histories["adaptive"] = res.samples, record(res)
    result.update({f"adaptive.weights.{k}": v for k, v in net.state_dict().items()})
    try:
        gradient_guided(gaussian(), objective, SIGMAS, rounds=1, batch_size=4, increment=0.5,
                        generator=torch.Generator(), progress=False)
    except ValueError as e:
        result["gg_refused"] = torch.tensor([int("give seed=" in str(e))])
    save_file({k: v.contiguous() for k, v in result.items()}, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"histories": histories, "writes": writes}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
