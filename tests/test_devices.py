"""Devices and mixed precision: the device option everywhere, autocast training and sampling,
checkpoints that move between devices. The tests marked ``cuda`` run only where CUDA is."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import optidiff as od
from optidiff import rng
from optidiff.cli import app
from optidiff.device import resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DATA = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))


def mlp():
    with rng.seeded(0):
        return od.models.TimeMLP(2, hidden=32, depth=2, emb_dim=8)


def test_resolve_device_names_what_it_refuses():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1': CUDA is not available"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_one_error_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nsteps = 1\n")
    result = CliRunner().invoke(app, ["train", str(cfg), "--device", "cuda", "--run-dir",
                                      str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 2 and "error: device 'cuda'" in result.output
    assert not (tmp_path / "r").exists()


def test_bf16_autocast_training_on_the_cpu_learns():
    """bf16 forward passes, float32 parameters and loss: the DSM loss still falls."""
    res = od.train(mlp(), DATA, steps=200, batch_size=64, lr=3e-3, precision="bf16",
                   progress=False)
    assert next(res.model.parameters()).dtype == torch.float32
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    assert last < 0.9 * first, (first, last)
    with pytest.raises(ValueError, match="precision must be one of"):
        od.train(mlp(), DATA, steps=1, precision="half", progress=False)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_and_sampling_on_cuda(tmp_path, precision):
    res = od.train(mlp(), DATA, steps=100, batch_size=64, lr=3e-3, device="cuda",
                   precision=precision, run_dir=tmp_path / "r", progress=False)
    assert next(res.ema.parameters()).is_cuda and all(map(lambda v: v == v, res.losses))
    x = od.sample(res.ema, od.LogLinearSchedule().sample_sigmas(10, final_zero=True),
                  batch_size=64, device="cuda", precision=precision,
                  generator=torch.Generator("cuda").manual_seed(0))
    assert x.is_cuda and x.dtype == torch.float32 and torch.isfinite(x).all()
    # a checkpoint written on the GPU loads on the CPU with the same weights
    cpu = od.load_model(tmp_path / "r" / "checkpoint")
    for a, b in zip(res.ema.state_dict().values(), cpu.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b)


@cuda
def test_algorithm_1_on_cuda_matches_its_cpu_law():
    from optidiff.tasks.subspace import SubspaceTask

    task = SubspaceTask()
    sig = od.LogLinearSchedule(0.002, 20).sample_sigmas(20, final_zero=True)
    res = od.optimize.gradient_guided(task.exact_model().to("cuda"), task.objective("f1_in"),
                                      sig, rounds=3, batch_size=64, increment=0.2,
                                      device="cuda", metrics=task.metrics)
    assert res.samples.is_cuda
    assert res.history[-1]["reward_mean"] > res.history[0]["reward_mean"]


def test_torch_threads_sets_and_restores_the_count_even_on_error():
    from optidiff.device import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
