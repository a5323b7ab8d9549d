"""Tests of the ``subspace`` and ``sphere`` tasks (seeding, objectives, metrics, closed-form
references), the cached score network, and the ``optidiff optimize`` configuration and run."""

import json
import math

import pytest
import torch

from optidiff.config import ConfigError, load_config, parse_config
from optidiff.optimize import reference as ref
from optidiff.rng import haar_orthogonal
from optidiff.runs.demo import demo
from optidiff.runs.optimize import optimize_command
from optidiff.tasks import TASKS, make_task, task_class
from optidiff.tasks.base import SubspaceNetSpec
from optidiff.tasks.sphere import SphereTask
from optidiff.tasks.subspace import NetworkSpec, SubspaceTask, pretrained_network


def load_optimize_config(path):
    return load_config(path, "optimize")


def parse_optimize_config(data):
    return parse_config(data, "<config>", "optimize")


def run_optimize(config, run_dir=None, **kw):
    return optimize_command(config, run_dir, echo=lambda _: None, **kw)

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def test_subspace_task_is_seeded_as_documented():
    t = SubspaceTask(seed=0)
    g = torch.Generator().manual_seed(0)
    Q = haar_orthogonal(64, g)
    torch.testing.assert_close(t.A, Q[:, :16])
    torch.testing.assert_close(t.A.T @ t.A, torch.eye(16, dtype=F64), atol=1e-12, rtol=0)
    P = t.A @ t.A.T
    par, perp = P @ t.theta_off, t.theta_off - P @ t.theta_off
    assert t.theta_off.norm().item() == pytest.approx(1.0)
    assert (perp.norm() / par.norm()).item() == pytest.approx(9.0)
    assert t.theta_in.norm().item() == pytest.approx(1.0)
    assert (t.theta_in - P @ t.theta_in).norm() < 1e-12
    assert torch.equal(t.b1, torch.full((64,), 4.0, dtype=F64))
    same, other = SubspaceTask(seed=0), SubspaceTask(seed=1)
    assert torch.equal(same.b2, t.b2) and not torch.equal(other.b2, t.b2)
    assert not torch.allclose(other.A, t.A)
    x = t.data(1000)
    assert x.shape == (1000, 64) and torch.equal(x, t.data(1000))
    assert t.metrics(x)["off_subspace_ratio"] < 1e-6
    # u ~ N(0, I16): E‖x‖² = 16
    assert (t.data(20000).double().pow(2).sum(1).mean() - 16).abs() < 0.3


def test_haar_orthogonal_is_orthogonal_and_sign_fixed():
    Q = haar_orthogonal(8, torch.Generator().manual_seed(3))
    torch.testing.assert_close(Q.T @ Q, torch.eye(8, dtype=F64), atol=1e-12, rtol=0)
    # the first columns of Haar matrices are uniform on the sphere: mean of many first entries ≈ 0
    first = torch.stack([haar_orthogonal(8, torch.Generator().manual_seed(s))[0, 0]
                         for s in range(400)])
    assert first.mean().abs() < 0.1


def test_subspace_objectives_and_references():
    t = SubspaceTask()
    x = torch.randn(5, 64, dtype=F64, generator=torch.Generator().manual_seed(0))
    f1 = t.objective("f1_off")
    torch.testing.assert_close(f1.value(x), 10 - (x @ t.theta_off - 3) ** 2)
    torch.testing.assert_close(t.objective("f2_b2").value(x), 5 - 0.5 * (x - t.b2).norm(dim=1))
    assert f1.maximum == 10 and t.objective("f2_b1").maximum == 5
    with pytest.raises(ValueError, match="unknown objective 'f3'.*f1_off"):
        t.objective("f3")
    # f1: closed-form x_λ* agrees with the generic Newton solver and with λ = σ_y²/δ
    for name in ("f1_off", "f1_in", "f2_b1", "f2_b2"):
        lam = ref.increment_to_lambda(0.2, 0.1)
        x_star = t.regularized_optimum(name, lam)
        newton = ref.regularized_optimum(t.objective_fn(name), t.mean, t.cov, lam)
        torch.testing.assert_close(x_star, newton, atol=1e-8, rtol=0)
        assert (x_star - t.A @ (t.A.T @ x_star)).norm() < 1e-10       # in span(A)
        # stationarity: ∇f(x*) = λ·Σ⁺(x* − 0), projected on span(A)
        gr = torch.func.grad(lambda z, n=name: t.objective_fn(n)(z[None])[0])(x_star)
        torch.testing.assert_close(t.A.T @ gr, lam * (t.A.T @ x_star), atol=1e-7, rtol=0)
    r = t.reference("f1_off", increment=0.2)
    # θ_2, δ = 0.2, σ_y = 0.1 → f(x_λ*) = 5.934 (independent of the seed: only
    # ‖θ∥‖ = 1/√82 matters)
    assert r["regularized_value"] == pytest.approx(5.934, abs=1e-3)
    assert r["in_subspace_max"] == pytest.approx(10.0)
    assert r["in_subspace_argmax_norm"] == pytest.approx(3 * math.sqrt(82), rel=1e-6)
    r2 = t.reference("f2_b1")
    perp = t.b1 - t.A @ (t.A.T @ t.b1)
    assert r2["in_subspace_max"] == pytest.approx(5 - 0.5 * perp.norm().item(), abs=1e-6)
    assert r2["pretrain_mean_value"] == pytest.approx(5 - 0.5 * 4 * 8)


def test_sphere_task():
    s = SphereTask(seed=0)
    assert s.theta.norm().item() == pytest.approx(1.0)
    x = s.data(500)
    assert x.shape == (500, 64) and s.metrics(x)["norm_deviation"] < 1e-6
    assert s.objective().value(s.theta[None]).item() == pytest.approx(1.0)
    assert s.metrics(2 * x)["norm_minus_one"] == pytest.approx(1.0, abs=1e-5)
    # the cosine reward does not credit the norm: 2x scores as x, θ itself scores 1
    assert s.metrics(2 * x)["cosine_reward"] == pytest.approx(s.metrics(x)["cosine_reward"])
    assert s.metrics(3 * s.theta[None].float())["cosine_reward"] == pytest.approx(1.0, abs=1e-6)
    assert s.reference(increment=0.2)["global_max"] == 1.0
    assert not torch.equal(SphereTask(seed=1).theta, s.theta)
    with pytest.raises(ValueError, match="unknown objective"):
        s.objective("f1_off")


def test_pretrained_network_trains_caches_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path))
    task = SubspaceTask()
    spec = NetworkSpec(hidden=16, depth=2, emb_dim=8, steps=20, batch_size=32)
    m1, info1 = pretrained_network(task, spec, progress=False)
    assert not info1["cached"] and info1["pretrain_seconds"] > 0
    m2, info2 = pretrained_network(task, spec, progress=False)
    assert info2["cached"]
    x, s = torch.randn(3, 64), torch.tensor(0.5)
    assert torch.equal(m1(x, s), m2(x, s))
    assert any((tmp_path / "networks").iterdir())


def test_registry_resolves_every_task_and_rejects_unknown_names():
    for name in TASKS:
        assert task_class(name).name == name
    assert make_task("sphere", seed=3).theta.shape == (64,)
    with pytest.raises(ValueError, match="unknown task 'moons'; choose one of subspace"):
        task_class("moons")


def test_projections_are_the_documented_coordinates():
    task = SubspaceTask()
    x = task.data(5).double()
    p, _, ylabel = task.projection("f1_off", x + 0.1 * task.theta_off)
    perp = task.theta_off - task.A @ (task.A.T @ task.theta_off)
    expected = torch.full((5,), 0.1 * perp.norm().item(), dtype=torch.float64)
    assert torch.allclose(p[:, 1], expected, atol=1e-6)  # float32 data: off-part ~1e-7
    assert "I − AAᵀ" in ylabel
    s = SphereTask()
    q, _, _ = s.projection("linear", s.data(4).double())
    assert torch.allclose(q[:, 1], torch.ones(4, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------- configs and runs

def _write(tmp_path, text):
    p = tmp_path / "opt.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ('[task]\nname = "moons"\n', r"task\.name: unknown task.*subspace, sphere"),
    ('[task]\nname = "toy2d"\n', "this is a train config"),
    ('[task]\nname = "sphere"\nobjective = "f1_off"\n', "not an objective of task 'sphere'"),
    ("[optimize]\nrounds = 0\n", r"optimize\.rounds"),
    ("[optimize]\nincrement = -1.0\n", r"optimize\.increment"),
    ("[optimize]\nincrement = 0.2\ntarget = 3.0\n", "not both"),
    ('[optimize]\nguidance = "dps"\n', r"optimize\.guidance"),
    ('[optimize]\nbeta = "magic"\n', r"optimize\.beta"),
    ("[sampler]\nsteps = 0\n", r"sampler\.steps"),
    ('[sampler]\nname = "euler"\n', "unknown sampler"),
    ('[model]\nkind = "load"\n', "needs checkpoint"),

    ("[finetune]\nlr = 1e-5\n", "only with optimize.algorithm = 'adaptive'"),
    ('[optimize]\nalgorithm = "adaptive"\n[finetune]\nreplay_decay = 2.0\n',
     r"finetune\.replay_decay"),
    ("[optimize]\nbatchsize = 3\n", r"optimize\.batchsize: unknown key"),
    ("[optimize\n", "malformed TOML"),
    ('[data]\nname = "rings"\n[model]\nhidden = 4\n', "this is a train config.*optidiff train"),
    ('[model]\nkind = "unet"\n[optimize]\n', "optimize runs pre-train a 'timemlp'"),
])
def test_config_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_optimize_config(_write(tmp_path, text))


def test_config_defaults():
    cfg = parse_optimize_config({})
    assert cfg.task.name == "subspace" and cfg.task.objective == "f1_off"
    assert cfg.optimize.increment == 0.2 and cfg.optimize.guidance == "lookahead"
    assert parse_optimize_config({"task": {"name": "sphere"}}).task.objective == "linear"


def test_run_optimize_exact_model_writes_run_dir(tmp_path):
    cfg = _write(tmp_path, """name = "t"
[task]
name = "subspace"
objective = "f1_in"
[model]
kind = "exact"
[sampler]
name = "ddpm"
steps = 10
batch_size = 8
[optimize]
rounds = 3
increment = 0.05
beta = "lemma1"
""")
    res, run = run_optimize(cfg, run_dir=tmp_path / "run", progress=False)
    assert [r["round"] for r in res.history] == [0, 1, 2, 3]
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2, 3]
    assert (run.path / "run.json").exists() and (run.path / "state" / "meta.json").exists()
    assert (run.path / "report.html").exists() and (run.path / "config.toml").exists()
    assert {p.name for p in (run.path / "plots").iterdir()} == {"curves.png", "projection.png"}
    assert len(list((run.path / "samples").iterdir())) == 4
    assert max(res.curve("off_subspace_ratio")) < 1e-6     # exact subspace score + G_loss
    # resume to more rounds continues the same directory
    cfg.write_text(cfg.read_text().replace("rounds = 3", "rounds = 5"))
    res2, _ = run_optimize(cfg, run_dir=tmp_path / "run", resume=True, progress=False)
    assert [r["round"] for r in res2.history] == list(range(6))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in res2.history[:4]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in res.history]


def test_run_optimize_adaptive_exact(tmp_path):
    cfg = _write(tmp_path, """
[model]
kind = "exact"
[sampler]
steps = 10
batch_size = 32
[optimize]
algorithm = "adaptive"
rounds = 2
[finetune]
replay_decay = 1.0
""")
    res, _run = run_optimize(cfg, run_dir=tmp_path / "run", progress=False)
    assert res.history[-1]["finetune_rounds"] == 2


def test_demo_smoke(tmp_path, monkeypatch):
    """The demo's machinery on a tiny cached network (the real demo trains NetworkSpec())."""
    import optidiff.runs.demo as run_mod
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path / "cache"))
    tiny = NetworkSpec(hidden=16, depth=2, emb_dim=8, steps=20, batch_size=32)
    monkeypatch.setattr(run_mod, "NetworkSpec", lambda: tiny)
    monkeypatch.setattr(run_mod, "SUBSPACE_NET", SubspaceNetSpec(hidden=8, depth=1, emb_dim=8,
                                                                 steps=20, batch_size=32))
    monkeypatch.setitem(run_mod.DEMO, "steps", 5)
    lines = []
    res = demo(run_dir=tmp_path / "demo", rounds=2, progress=False, echo=lines.append)
    assert [r["round"] for r in res.table] == [0, 1, 2]
    assert set(res.table[0]) == {"round", "reward_naive", "ratio_naive", "reward_lookahead",
                                 "ratio_lookahead", "reward_alg1_delta0.05",
                                 "reward_alg1_delta0.2", "reward_alg1_delta0.8", "reward_alg2",
                                 "ratio_alg2"}
    assert set(res.readings) == {"a", "b", "c"} and all(t in lines for t in res.readings.values())
    assert res.report.exists()
    for panel in "abc":
        assert (res.run_dir / "plots" / f"{panel}_curves.png").is_file()
    assert "reading" in res.report.read_text()
