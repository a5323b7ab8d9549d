"""SubspaceTask at other sizes (dim, latent_dim) and every place that depends on them: the cached
network's key, the SubspaceNet recipe, the config and the optimize run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from optidiff.cache import recipe_key
from optidiff.config import ConfigError, parse_config
from optidiff.models import SubspaceNet, TimeMLP
from optidiff.rng import generator, haar_orthogonal
from optidiff.runs.optimize import optimize_command
from optidiff.tasks import make_task
from optidiff.tasks.base import NetworkSpec, SubspaceNetSpec, _task_parameters, pretrained_network
from optidiff.tasks.subspace import SubspaceTask

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
TINY = {"hidden": 16, "depth": 1, "emb_dim": 8, "steps": 20, "batch_size": 32}


def test_other_sizes_follow_the_documented_construction():
    t = SubspaceTask(seed=2, dim=20, latent_dim=3)
    assert t.input_shape == (20,) and t.A.shape == (20, 3)
    torch.testing.assert_close(t.A, haar_orthogonal(20, generator(2))[:, :3])
    P = t.A @ t.A.T
    par, perp = P @ t.theta_off, t.theta_off - P @ t.theta_off
    assert (perp.norm() / par.norm()).item() == pytest.approx(9.0)
    assert (t.theta_in - P @ t.theta_in).norm() < 1e-12 and t.b2.shape == (20,)
    x = t.data(5000)
    assert x.shape == (5000, 20) and t.metrics(x)["off_subspace_ratio"] < 1e-6
    assert (x.double().pow(2).sum(1).mean() - 3).abs() < 0.2  # E‖A·u‖² = d
    assert t.data_scale == pytest.approx(math.sqrt(3 / 20))
    # the f1 optimum depends only on ‖θ∥‖ = 1/√82, not on the sizes
    assert t.reference("f1_off", increment=0.2)["regularized_value"] == pytest.approx(5.934,
                                                                                      abs=1e-3)
    assert torch.equal(SubspaceTask().A, SubspaceTask(dim=64, latent_dim=16).A)


@pytest.mark.parametrize("kwargs, match", [
    ({"latent_dim": 64}, "latent_dim must be < dim"),
    ({"dim": 8, "latent_dim": 9}, "latent_dim must be < dim"),
    ({"latent_dim": 0}, "latent_dim must be a positive integer"),
    ({"dim": 2.5}, "dim must be a positive integer"),
    ({"n_pretrain": 0}, "n_pretrain must be a positive integer"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceTask(**kwargs)


def test_cache_key_keeps_default_entries_and_separates_sizes():
    # the defaults' recipe is the one written before dim/latent_dim existed
    task, spec = SubspaceTask(), NetworkSpec()
    assert _task_parameters(task) == {}
    old = {"task": "subspace", "task_seed": 0, "dim": 64, **asdict(spec)}
    assert spec.recipe(task) == asdict(spec)
    assert _task_parameters(SubspaceTask(latent_dim=8)) == {"latent_dim": 8}
    assert _task_parameters(SubspaceTask(n_pretrain=100)) == {"n_pretrain": 100}
    new = {"task": "subspace", "task_seed": 0, "dim": 64,
           **_task_parameters(SubspaceTask(latent_dim=8)), **spec.recipe(task)}
    assert recipe_key(new) != recipe_key(old)
    sub = SubspaceNetSpec().recipe(SubspaceTask(dim=32, latent_dim=4))
    assert sub["network"] == "SubspaceNet" and sub["latent_dim"] == 4


def test_pretrained_subspace_net_trains_caches_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path))
    task = SubspaceTask(dim=12, latent_dim=3, n_pretrain=512)
    spec = SubspaceNetSpec(**TINY)
    m1, info1 = pretrained_network(task, spec, progress=False)
    assert isinstance(m1, SubspaceNet) and not info1["cached"]
    assert m1.input_shape == (12,) and m1.basis.shape == (12, 3)
    assert m1.sigma_data == pytest.approx(1.0)  # latent scale of u ~ N(0, I)
    m2, info2 = pretrained_network(task, spec, progress=False)
    assert info2["cached"] and isinstance(m2, SubspaceNet)
    x, s = torch.randn(3, 12), torch.tensor(0.5)
    assert torch.equal(m1(x, s), m2(x, s))
    # same spec, other task size: another entry, another network
    m3, info3 = pretrained_network(SubspaceTask(dim=12, latent_dim=2, n_pretrain=512), spec,
                                   progress=False)
    assert not info3["cached"] and m3.basis.shape == (12, 2)
    tm, _ = pretrained_network(task, NetworkSpec(**TINY), progress=False)
    assert isinstance(tm, TimeMLP) and tm.input_shape == (12,)
    with pytest.raises(ValueError, match="needs latent_dim"):
        SubspaceNetSpec().recipe(make_task("sphere"))


TOML = """
[task]
name = "subspace"
objective = "f1_off"
dim = 12
latent_dim = LATENT
n_pretrain = 256
[model]
kind = "subspace_net"
hidden = 16
depth = 1
emb_dim = 8
[train]
steps = 20
batch_size = 32
[sampler]
name = "ddpm"
steps = 5
batch_size = 8
[optimize]
rounds = 1
increment = 0.2
"""


def test_config_takes_sizes_and_subspace_net(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path / "cache"))
    base = {"task": {"name": "subspace", "dim": 12, "latent_dim": 3, "objective": "f1_off"}}
    assert parse_config(base, "<c>", "optimize").task.params()["latent_dim"] == 3
    with pytest.raises(ConfigError, match="latent_dim"):
        parse_config({"task": {**base["task"], "latent_dim": "x"}}, "<c>", "optimize")
    with pytest.raises(ConfigError, match="takes hidden, depth, emb_dim, num_classes"):
        parse_config({**base, "model": {"kind": "timemlp", "latent_dim": 3}}, "<c>", "optimize")
    path = tmp_path / "c.toml"
    path.write_text(TOML.replace("LATENT", "3"))
    res, run = optimize_command(path, tmp_path / "run", echo=lambda _: None, progress=False)
    assert len(res.history) == 2 and run.path.exists()
    assert json.loads((run.path / "run.json").read_text())  # the run finished and recorded
    path.write_text(TOML.replace("LATENT", "12"))
    with pytest.raises(ConfigError, match="latent_dim must be < dim"):
        optimize_command(path, tmp_path / "run2", echo=lambda _: None, progress=False)
    assert not (tmp_path / "run2").exists()
