"""Training: DSM loss, learning an exact Gaussian denoiser, bitwise resume, DDP under torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import optidiff as od
from optidiff.models.base import x0_hat

pytestmark = pytest.mark.usefixtures("single_thread")


def small_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return od.models.TimeMLP(2, hidden=32, depth=2, emb_dim=16, **kw)


DATA = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))


class Interrupted(Exception):
    pass


class Flaky(nn.Module):
    """Wraps a model; raises Interrupted (or returns NaN) from forward call ``at`` (1-based)."""

    def __init__(self, inner, at, nan=False):
        super().__init__()
        self.inner, self.at, self.nan, self.calls = inner, at, nan, 0

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        out = self.inner(x, sigma, cond)
        if self.calls >= self.at:
            if not self.nan:
                raise Interrupted("simulated interruption")
            out = out * math.nan
        return out


class Spy(nn.Module):
    """A trainable model that records the conditions it is given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.seen = []

    def forward(self, x, sigma, cond=None):
        self.seen.append(cond.clone())
        return x * self.w


def test_dsm_loss_matches_hand_computation():
    model = small_mlp()
    x0, sigma = torch.randn(8, 2), torch.rand(8) + 0.1
    loss = od.dsm_loss(model, x0, sigma, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    pred = model(x0 + sigma[:, None] * eps, sigma)
    expected = sum(((pred[i] - eps[i]) ** 2).sum() for i in range(8)) / 16
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_training_learns_the_exact_gaussian_denoiser(tmp_path):
    mean = torch.tensor([1.0, -0.5])
    chol = torch.tensor([[1.2, 0.0], [0.6, 0.5]])
    data = mean + torch.randn(4096, 2, generator=torch.Generator().manual_seed(0)) @ chol.T
    exact = od.models.GaussianDenoiser(mean, chol @ chol.T)

    def rel_error(model, sigma):
        """E‖x0_hat − exact‖² / E‖x − exact‖²: 1 for the identity denoiser, 0 when exact."""
        g = torch.Generator().manual_seed(1)
        x0 = mean + torch.randn(1024, 2, generator=g) @ chol.T
        x = x0 + sigma * torch.randn(1024, 2, generator=g)
        s = torch.tensor(sigma)
        with torch.no_grad():
            ref, got = x0_hat(exact, x, s), x0_hat(model, x, s)
        return ((got - ref).pow(2).sum(1).mean() / (x - ref).pow(2).sum(1).mean()).item()

    torch.manual_seed(0)
    model = od.models.TimeMLP(2, hidden=64, depth=2, emb_dim=32)
    assert min(rel_error(model, s) for s in (0.5, 1.0)) > 0.9
    result = od.train(model, data, steps=300, lr=3e-3, ema_decay=0.99, progress=False,
                      run_dir=tmp_path, log_every=100)
    assert len(result.losses) == 300
    assert sum(result.losses[-50:]) / 50 < 0.8 * sum(result.losses[:20]) / 20
    for sigma in (0.5, 1.0):
        assert rel_error(result.ema, sigma) < 0.05, sigma
    # the EMA is a plain copy of weights: no autograd history, no gradient requirement
    assert all(p.grad_fn is None and not p.requires_grad for p in result.ema.parameters())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200, 300]
    assert records[-1]["loss"] == pytest.approx(sum(result.losses[200:]) / 100)
    loaded = od.load_model(tmp_path / "checkpoint")  # EMA weights of the training checkpoint
    x, s = torch.randn(4, 2), torch.full((4,), 0.7)
    assert torch.equal(loaded(x, s), result.ema(x, s))


def _logged_steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _state(result):
    opt = result.optimizer.state_dict()["state"]
    return ({k: v.clone() for k, v in result.model.state_dict().items()},
            {k: v.clone() for k, v in result.ema.state_dict().items()},
            {(i, n): v.clone() for i, st in opt.items() for n, v in st.items()})


def _assert_bitwise_equal(a, b):
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), k


@pytest.mark.parametrize("interrupt", ["clean_stop", "crash"])
def test_resume_is_bitwise_exact(tmp_path, interrupt):
    kw = {"batch_size": 32, "seed": 5, "checkpoint_every": 10, "log_every": 10,
          "progress": False, "cond": torch.arange(256) % 3, "cond_drop": 0.2}
    full = od.train(small_mlp(0, num_classes=3), DATA, steps=40, run_dir=tmp_path / "a", **kw)

    run_b = tmp_path / "b"
    if interrupt == "clean_stop":
        od.train(small_mlp(0, num_classes=3), DATA, steps=20, run_dir=run_b, **kw)
    else:  # killed during step 25: the checkpoint of step 20 is used, metrics of step 25 dropped
        with pytest.raises(Interrupted):
            od.train(Flaky(small_mlp(0, num_classes=3), at=25), DATA, steps=40, run_dir=run_b,
                     **kw)
        with (run_b / "metrics.jsonl").open("a") as f:  # a record past the checkpoint
            f.write(json.dumps({"step": 25, "loss": 0.0}) + '\n{"step": 2')  # + a torn line
    fresh = Flaky(small_mlp(1, num_classes=3), at=10**9) if interrupt == "crash" \
        else small_mlp(1, num_classes=3)  # different init: everything must come from the checkpoint
    resumed = od.train(fresh, DATA, steps=40, run_dir=run_b, resume=True, **kw)
    if interrupt == "crash":
        resumed.model, resumed.ema = resumed.model.inner, resumed.ema.inner
    _assert_bitwise_equal(_state(full), _state(resumed))
    assert resumed.losses == full.losses
    assert _logged_steps(run_b) == [10, 20, 30, 40]


def test_resume_in_the_middle_of_a_log_interval_logs_the_same_losses(tmp_path):
    """Checkpoints every 10 steps, a log record every 15: the run resumed at step 20 logs, at
    step 30, the mean of steps 16–30 (five of them before the resume), as the uninterrupted run."""
    kw = {"batch_size": 32, "seed": 3, "checkpoint_every": 10, "log_every": 15, "progress": False}
    od.train(small_mlp(0), DATA, steps=40, run_dir=tmp_path / "a", **kw)
    od.train(small_mlp(0), DATA, steps=20, run_dir=tmp_path / "b", **kw)
    od.train(small_mlp(0), DATA, steps=40, run_dir=tmp_path / "b", resume=True, **kw)

    def logged(run):
        return [(r["step"], r["loss"]) for r in od.checkpoint.read_jsonl(run / "metrics.jsonl")]

    assert [s for s, _ in logged(tmp_path / "b")] == [15, 30, 40]
    assert logged(tmp_path / "b") == logged(tmp_path / "a")


def test_resume_checks(tmp_path):
    od.train(small_mlp(), DATA, steps=5, batch_size=8, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint; pass resume=True"):
        od.train(small_mlp(), DATA, steps=10, batch_size=8, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different settings .*'lr': \(0.001, 0.01\)"):
        od.train(small_mlp(), DATA, steps=10, batch_size=8, lr=1e-2, run_dir=tmp_path,
                 resume=True, progress=False)
    with pytest.raises(ValueError, match="beyond steps=3"):
        od.train(small_mlp(), DATA, steps=3, batch_size=8, run_dir=tmp_path, resume=True,
                 progress=False)
    with pytest.raises(ValueError, match="does not fit the model"):
        od.train(od.models.TimeMLP(2, hidden=8), DATA, steps=10, batch_size=8, run_dir=tmp_path,
                 resume=True, progress=False)
    fresh = od.train(small_mlp(), DATA, steps=5, batch_size=8, run_dir=tmp_path / "new",
                     resume=True, progress=False)  # resume with no checkpoint: starts afresh
    assert len(fresh.losses) == 5


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    model = Flaky(small_mlp(), at=8, nan=True)
    with pytest.raises(FloatingPointError, match="non-finite at step 8"):
        od.train(model, DATA, steps=20, batch_size=8, run_dir=tmp_path, checkpoint_every=5,
                 progress=False)
    _, meta = od.checkpoint.load_checkpoint(tmp_path / "checkpoint")
    assert meta["step"] == 5


@pytest.mark.parametrize("cond", [torch.arange(256) % 4, torch.randn(256, 3)])
def test_condition_dropout(cond):
    spy = Spy()
    od.train(spy, DATA, steps=20, batch_size=64, cond=cond, cond_drop=0.3, progress=False)
    seen = torch.cat(spy.seen)
    dropped = (seen == -1) if not cond.is_floating_point() else seen.isnan().all(1)
    assert 0.2 < dropped.float().mean() < 0.4
    if cond.is_floating_point():
        assert not seen[~dropped].isnan().any()
    kept = seen[~dropped].reshape(-1, 1, *cond.shape[1:])
    assert (kept == cond).reshape(len(kept), len(cond), -1).all(-1).any(1).all()  # rows of cond


def test_cosine_lr_schedule_matches_torch_cosine_annealing(monkeypatch, tmp_path):
    """The learning rate of every AdamW step against torch's own CosineAnnealingLR (T_max =
    steps, eta_min = 0), and a cosine run resumed half-way ends bitwise as the uninterrupted one."""
    seen, step = [], torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    kw = {"batch_size": 16, "lr": 0.01, "lr_schedule": "cosine", "progress": False,
          "checkpoint_every": 4}
    full = od.train(small_mlp(), DATA, steps=8, run_dir=tmp_path / "a", **kw)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=8)
    expected = []
    for _ in range(8):
        expected.append(ref.get_last_lr()[0])
        ref_opt.step()
        ref.step()
    assert seen == pytest.approx(expected, rel=1e-12)
    with pytest.raises(Interrupted):  # killed during step 6: resumes from step 4
        od.train(Flaky(small_mlp(), at=6), DATA, steps=8, run_dir=tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="lr_schedule"):  # the schedule spans the steps
        od.train(Flaky(small_mlp(), at=10**9), DATA, steps=12, run_dir=tmp_path / "b",
                 resume=True, **kw)
    resumed = od.train(Flaky(small_mlp(1), at=10**9), DATA, steps=8, run_dir=tmp_path / "b",
                       resume=True, **kw)
    resumed.model, resumed.ema = resumed.model.inner, resumed.ema.inner
    _assert_bitwise_equal(_state(full), _state(resumed))


@pytest.mark.parametrize("kwargs, name", [
    ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"),
    ({"lr": math.inf}, "lr"), ({"ema_decay": 1.0}, "ema_decay"), ({"cond_drop": 1.0}, "cond_drop"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"grad_clip": 0.0}, "grad_clip"),
    ({"log_every": 0}, "log_every"), ({"checkpoint_every": 5}, "run_dir"),
    ({"resume": True}, "run_dir"), ({"cond_drop": 0.1}, "needs cond"),
    ({"cond": torch.zeros(3, dtype=torch.long)}, "cond"), ({"seed": 1.5}, "seed"),
    ({"data": torch.zeros(0, 2)}, "data"), ({"data": torch.tensor([[0.0, math.nan]])}, "data"),
    ({"data": torch.zeros(4, 2, dtype=torch.long)}, "data"),
    ({"schedule": torch.zeros(3)}, "schedule"), ({"lr_schedule": "linear"}, "lr_schedule"),
])
def test_bad_arguments(kwargs, name):
    args = {"steps": 5, "data": DATA, **kwargs}
    with pytest.raises(ValueError, match=name):
        od.train(small_mlp(), args.pop("data"), progress=False, **args)


def test_torchrun_two_processes(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(worker), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP kept the replicas identical
    assert info[0]["losses"] != info[1]["losses"]  # but each rank saw its own batches
    assert [i["saves"] for i in info] == [1, 0]  # only rank 0 writes
    run = tmp_path / "run"
    assert len(list((run / "checkpoint").glob("tensors-*.safetensors"))) == 1
    tensors, meta = od.checkpoint.load_checkpoint(run / "checkpoint")
    assert meta["step"] == 6 and meta["settings"]["world_size"] == 2
    assert not torch.equal(tensors["rng.noise.0"], tensors["rng.noise.1"])
    assert _logged_steps(run) == [2, 4, 6]
