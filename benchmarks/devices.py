"""Throughput per device and precision: od.train steps/s and od.sample network evaluations/s.

On whatever machine it runs: every device present (the CPU always; CUDA and MPS when torch sees
them) and every precision that device runs (fp32; bf16 autocast, which PyTorch also supports on
CPUs; fp16 autocast, with a gradient scaler in training, on CUDA). Two networks: the vector
``TimeMLP(dim=64, hidden=256, depth=3)`` of the subspace task, batch 256 for training and 1,024
samples for sampling, and the image ``UNet`` of the digits task (28×28, channels 32, multipliers
(1, 2, 2)), batch 64 / 128. Training: ``od.train`` on random data (throughput does not depend on the
data), a warm-up call, then ``steps`` steps; sampling: ``od.sample`` with the GE sampler for
``nfe`` steps (one network evaluation each) from a warmed-up call. Speed-ups are ratios to fp32
on the same device, measured in the same run. Numbers on a shared CPU vary by tens of percent
between runs; GPU rows come only from a machine that has one (the file records the machine).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import markdown_table, set_threads, simple_main

import optidiff as od

NAME = "devices"


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def precisions(device: str) -> list[str]:
    return {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "bf16", "fp16"],
            "mps": ["fp32", "fp16"]}[device]


def networks(quick: bool) -> dict[str, dict]:
    torch.manual_seed(0)
    mlp = {"make": lambda: od.models.TimeMLP(64, hidden=256, depth=3), "shape": (64,),
           "train_batch": 256, "sample_batch": 1024}
    unet = {"make": lambda: od.models.UNet(image_size=28, in_channels=1, channels=32,
                                           channel_mult=(1, 2, 2), attention=False),
            "shape": (1, 28, 28), "train_batch": 64, "sample_batch": 128}
    if quick:
        mlp.update(train_batch=64, sample_batch=128)
        unet.update(make=lambda: od.models.UNet(image_size=8, in_channels=1, channels=8,
                                                channel_mult=(1, 2), attention=False, groups=4),
                    shape=(1, 8, 8), train_batch=8, sample_batch=8)
    return {"TimeMLP": mlp, "UNet": unet}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def train_rate(net: dict, device: str, precision: str, steps: int) -> float:
    data = torch.randn(4096, *net["shape"], generator=torch.Generator().manual_seed(0))
    kw = {"batch_size": net["train_batch"], "device": device, "precision": precision,
          "progress": False}
    od.train(net["make"](), data, steps=2, **kw)  # warm-up
    model = net["make"]()
    _sync(device)
    t0 = time.perf_counter()
    od.train(model, data, steps=steps, **kw)
    _sync(device)
    return steps / (time.perf_counter() - t0)


def sample_rate(net: dict, device: str, precision: str, nfe: int) -> float:
    model = net["make"]().to(device).eval()
    model.input_shape = net["shape"]
    sigmas = od.LogLinearSchedule().sample_sigmas(nfe, final_zero=True)
    kw = {"batch_size": net["sample_batch"], "sampler": "ge", "device": device,
          "precision": precision, "progress": False}
    od.sample(model, sigmas[-3:], seed=0, **kw)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    od.sample(model, sigmas, seed=0, **kw)
    _sync(device)
    return nfe / (time.perf_counter() - t0)


def run(quick: bool = False, threads: int = 1) -> dict:
    set_threads(threads)
    steps, nfe = (5, 4) if quick else (200, 50)
    rows = []
    for name, net in networks(quick).items():
        for device in devices():
            base = {}
            for precision in precisions(device):
                tr = train_rate(net, device, precision, steps if name == "TimeMLP" or quick
                                else steps // 4)
                sr = sample_rate(net, device, precision, nfe)
                base.setdefault("train", tr)
                base.setdefault("sample", sr)
                rows.append({"network": name, "device": device, "precision": precision,
                             "train steps/s": round(tr, 1),
                             "train vs fp32": round(tr / base["train"], 2),
                             "sample NFE/s": round(sr, 1),
                             "sample vs fp32": round(sr / base["sample"], 2),
                             "train batch": net["train_batch"],
                             "sample batch": net["sample_batch"]})
                print(rows[-1], file=sys.stderr, flush=True)
    md = [f"Threads: {threads}. Devices found: {', '.join(devices())}.", "",
          markdown_table(rows)]
    return {"threads": threads, "rows": rows, "markdown": "\n".join(md)}


if __name__ == "__main__":
    simple_main(NAME, __doc__, run)
