"""Offline reward maximization (the Wang & Chen tutorial; Yuan et al. 2023): reward models, DDOM
weights, reward guidance, the pipeline on a small linear-subspace problem, and configured runs."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import optidiff as od
from optidiff import optimize as O
from optidiff.config import ConfigError
from optidiff.guidance import RewardGuidance
from optidiff.metrics import off_subspace_distance
from optidiff.models.analytic import SubspaceGaussianDenoiser
from optidiff.models.conditional import ConditionalMLP
from optidiff.runs.offline import offline_command
from optidiff.tasks.subspace import LinearSubspaceTask

pytestmark = pytest.mark.usefixtures("single_thread")

# a problem small enough to train three conditional models in a few seconds each:
# x = A·u in R^8 with u ~ N(0, I_2), f*(x) = θᵀx ~ N(0, 1) on the data, label noise 2
PROBLEM = {"D": 8, "d": 2, "n_unlabeled": 4000, "noise": 2.0, "seed": 0}
FIT = {"reward": "ridge", "model_kwargs": {"hidden": 64}, "steps": 1200, "batch_size": 512, "lr": 3e-3,
           "ema_decay": 0.99, "sample_steps": 25, "seed": 0}
BUDGETS = (4, 64, 4096)


@pytest.fixture(scope="module")
def runs(single_thread):
    out = {}
    for n in BUDGETS:
        p = LinearSubspaceTask(n_labeled=n, label_seed=10, **PROBLEM)
        out[n] = (p, O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, **FIT))
    return out


def _mean_reward(p, res, a, seed=1, n=512):
    return float(p.reward(res.generate(a, n, seed=seed)).mean())


# ---------------------------------------------------------------------------- the pipeline

def test_higher_target_gives_higher_true_reward(runs):
    p, res = runs[BUDGETS[-1]]
    targets = [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    means = [_mean_reward(p, res, a) for a in targets]
    # monotone: each 0.5 step of the target raises the true mean reward (by far more than the
    # ~0.05 standard error of a 512-sample mean)
    assert all(m2 - m1 > 0.2 for m1, m2 in itertools.pairwise(means)), means
    # on the data's support (f* ~ N(0, 1)) the reward tracks the target
    for a, m in zip(targets, means):
        if abs(a) <= 1.0:
            assert abs(O.subopt(a, torch.tensor([m]))) < 0.25, (a, m)


def test_subopt_falls_as_labels_grow(runs):
    targets = [-1.0, -0.5, 0.5, 1.0]
    err = {}
    for n, (p, res) in runs.items():
        err[n] = sum(abs(a - _mean_reward(p, res, a)) for a in targets) / len(targets)
    e = [err[n] for n in BUDGETS]
    assert e[0] > e[1] > e[2], err
    assert e[2] < 0.15, err
    # the reward model's error falls the same way (the Wang & Chen tutorial: the off-policy-bandit term)
    th = [(runs[n][1].reward_model.theta - runs[n][0].theta).norm() for n in BUDGETS]
    assert th[0] > th[1] > th[2]


def test_samples_stay_on_the_subspace(runs):
    p, res = runs[BUDGETS[-1]]
    x = res.generate(1.0, 512, seed=2)
    on = (x.double() @ p.A).norm(dim=1)
    assert float(off_subspace_distance(x, p.A).mean()) < 0.1 * float(on.mean())


def test_generation_is_seeded_and_cfg_runs(runs):
    p, res = runs[BUDGETS[-1]]
    a = res.generate(0.5, 64, seed=3)
    assert torch.equal(a, res.generate(0.5, 64, seed=3))
    assert not torch.equal(a, res.generate(0.5, 64, seed=4))
    # classifier-free guidance (optidiff.guidance.ClassifierFree with the NaN null condition)
    g = res.generate(1.0, 256, seed=3, cfg_scale=2.0)
    assert torch.isfinite(g).all()
    assert not torch.equal(g, res.generate(1.0, 256, seed=3))
    # w = 2 pushes further along the condition than w = 1 (extrapolation of p(y|x))
    assert float(p.reward(g).mean()) > _mean_reward(p, res, 1.0, seed=3, n=256) - 0.1


def test_targets_resolve(runs):
    _, res = runs[BUDGETS[-1]]
    assert res.resolve_target("max") == pytest.approx(float(res.labels.max()))
    assert res.resolve_target("q50") == pytest.approx(float(res.labels.double().median()), abs=1e-3)
    for bad in ("best", "q101", math.nan):
        with pytest.raises(ValueError):
            res.resolve_target(bad)


def test_pipeline_is_reproducible_and_reweights():
    p = LinearSubspaceTask(D=4, d=2, n_unlabeled=300, n_labeled=50, seed=1)
    kw = {"steps": 20, "batch_size": 32, "model_kwargs": {"hidden": 16}, "sample_steps": 5,
          "seed": 5, "reweight": True, "cond_drop": 0.2, "cfg_scale": 1.5}
    r1 = O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, **kw)
    r2 = O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, **kw)
    x1 = r1.generate("max", 8, seed=5)
    assert torch.equal(x1, r2.generate("max", 8, seed=5))
    assert torch.equal(r1.weights, O.ddom_weights(r1.labels))
    assert x1.shape == (8, 4) and len(r1.labels) == 350
    # the spellings of optidiff 0.1 still work, warn, and mean the same
    old = {**{k: v for k, v in kw.items() if k != "cfg_scale"}, "cfg_weight": 1.5,
           "target": "max", "n_samples": 8}
    with pytest.warns(DeprecationWarning):
        r3 = O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, **old)
    assert torch.equal(r3.samples, x1) and r3.target == pytest.approx(float(r1.labels.max()))


def test_observed_labels_only_and_bad_arguments():
    p = LinearSubspaceTask(D=4, d=2, n_unlabeled=100, n_labeled=40, seed=1)
    r = O.reward_conditioned(None, p.x_labeled, p.y_labeled, reward=None, steps=5,
                             batch_size=8, model_kwargs={"hidden": 8}, sample_steps=3)
    assert r.reward_model is None and torch.equal(r.labels, p.y_labeled)
    with pytest.raises(ValueError, match="data=None"):
        O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, reward=None)
    with pytest.raises(ValueError, match="cond_drop"):
        O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, cfg_scale=3.0, cond_drop=0.0)
    with pytest.raises(ValueError, match="sampler"):
        O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled, sampler="euler")
    with pytest.raises(ValueError, match="y_labeled"):
        O.reward_conditioned(p.unlabeled, p.x_labeled, p.y_labeled[:-1])
    with pytest.raises(ValueError, match="reward model"):
        r.generate(1.0, 4, reward_scale=1.0)


# ---------------------------------------------------------------------------- reward models

def test_ridge_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = x @ torch.arange(1.0, 7.0, dtype=torch.float64) + 0.3 + torch.randn(40, generator=g,
                                                                          dtype=torch.float64)
    ref = sklearn.Ridge(alpha=2.5).fit(x.numpy(), y.numpy())
    f = O.fit_reward(x, y, kind="ridge", alpha=2.5)
    torch.testing.assert_close(f.theta, torch.from_numpy(ref.coef_))
    torch.testing.assert_close(f.bias, torch.tensor(ref.intercept_, dtype=torch.float64))
    torch.testing.assert_close(f(x), torch.from_numpy(ref.predict(x.numpy())))


def test_mlp_and_ensemble_rewards():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(512, 2, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2
    f = O.fit_reward(x, y, kind="mlp", steps=1500, hidden=64, lr=3e-3, seed=0)
    assert float(((f(x) - y) ** 2).mean()) < 0.05 * float(y.var())
    ens = O.fit_reward(x, y, kind="mlp", ensemble=3, steps=50, hidden=16, seed=0)
    assert isinstance(ens, O.EnsembleReward) and ens.members(x).shape == (3, 512)
    torch.testing.assert_close(ens(x), ens.members(x).mean(0))
    again = O.fit_reward(x, y, kind="mlp", ensemble=3, steps=50, hidden=16, seed=0)
    assert torch.equal(ens(x), again(x))  # seeded: bootstrap draws and initialisations
    with pytest.raises(ValueError, match="kind"):
        O.fit_reward(x, y, kind="gp")
    with pytest.raises(ValueError, match="alpha only"):
        O.fit_reward(x, y, kind="ridge", hidden=3)


def test_pseudo_label_noise_is_seeded():
    f = O.RidgeReward(3)
    f.theta.copy_(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    clean = O.pseudo_label(f, x)
    torch.testing.assert_close(clean, (x.double() @ f.theta).float())
    noisy = O.pseudo_label(f, x, noise_std=0.5, generator=torch.Generator().manual_seed(1))
    assert abs(float((noisy - clean).std()) - 0.5) < 0.05


def test_ddom_weights_by_hand():
    # y = [0, 0, 0, 1], 2 bins: h = [3/4, 1/4], upper edges [0.5, 1];
    # τ = |quantile_0.9(y − 1)| = |−1 + 0.7| = 0.3; p ∝ softmax([0.5, 1]/0.3)·h/(h + 1e-3)
    soft = [1 / (1 + math.exp(0.5 / 0.3)), 1 / (1 + math.exp(-0.5 / 0.3))]
    h = [0.75, 0.25]
    dist = [s * hb / (hb + 1e-3) for s, hb in zip(soft, h)]
    dist = [d / (sum(dist) + 1e-7) for d in dist]
    expected = [dist[0] / (h[0] + 1e-7)] * 3 + [dist[1] / (h[1] + 1e-7)]
    w = O.ddom_weights(torch.tensor([0.0, 0.0, 0.0, 1.0]), bins=2)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32))
    # high y is up-weighted, weights clipped to [0, clip]
    y = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    w = O.ddom_weights(y)
    assert w.max() <= 5.0 and w.min() >= 0
    assert float(w[y > 1.5].mean()) > 1.0 > float(w[y < 0].mean())


def test_ddom_schedule_is_the_vp_sde():
    s = O.ddom_schedule()
    # σ(T=1)² = exp(β_min + (β_max − β_min)/2) − 1 with β = (0.01, 2)
    assert float(s.sigmas[-1]) == pytest.approx(math.sqrt(math.exp(0.01 + 0.995) - 1))
    assert len(s.sigmas) == 1000 and bool((s.sigmas[1:] > s.sigmas[:-1]).all())


# ------------------------------------------------------------------------ guidance & ascent

def _gaussian_model(D=3, v=2.0):
    return SubspaceGaussianDenoiser(torch.eye(D, dtype=torch.float64),
                                    latent_cov=v * torch.eye(D, dtype=torch.float64))


def test_reward_guidance_formula():
    """Linear f̂ = θᵀx on N(0, v·I): x̂0 = v/(v+σ²)·x, G = s(a − θᵀx̂0)·θ (x̂0 held fixed) or
    s(a − θᵀx̂0)·Jᵀθ with J = v/(v+σ²)·I (through the model); guided ε = ε − σG."""
    v, s, a = 2.0, 0.7, 1.5
    model = _gaussian_model(v=v)
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    f = lambda x: x @ theta
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor(0.8, dtype=torch.float64)
    eps = model(x, sigma)
    x0 = v / (v + 0.64) * x
    r = (a - x0 @ theta).unsqueeze(1)
    for through, jac in ((False, 1.0), (True, v / (v + 0.64))):
        out = RewardGuidance(f, a, scale=s, grad_through_model=through)(model, x, sigma, None)
        torch.testing.assert_close(out, eps - 0.8 * s * r * jac * theta)
    asc = RewardGuidance(f, None, scale=s)(model, x, sigma, None)
    torch.testing.assert_close(asc, eps - 0.8 * s * theta.expand(5, 3))
    # the clip caps the move σ²·G of x̂0
    clipped = RewardGuidance(f, a, scale=1e6, max_move=0.1)(model, x, sigma, None)
    move = ((eps - clipped) * 0.8).norm(dim=1)
    torch.testing.assert_close(move, torch.full((5,), 0.1, dtype=torch.float64))


def test_classifier_guidance_tracks_the_target():
    """Reward gradient as guidance on an (exact) unconditional subspace model: a higher target
    gives a higher reward, and the samples stay on the subspace. (Without the clip a constant scale
    overshoots at large σ, where σ²·G is huge, and the samples diverge.)"""
    p = LinearSubspaceTask(D=8, d=2, n_unlabeled=10, n_labeled=10, seed=3)
    model = SubspaceGaussianDenoiser(p.A)
    f = lambda x: x @ p.theta
    sig = od.LogLinearSchedule(0.01, 20, 1000).sample_sigmas(40, final_zero=True)
    means = []
    for a in (-1.0, 0.0, 1.0, 2.0):
        x = od.sample(model, sig, batch_size=512, sampler="ddpm", dtype=torch.float64,
                      guidance=RewardGuidance(f, a, scale=20.0, max_move=1.0),
                      generator=torch.Generator().manual_seed(0))
        means.append(float(p.reward(x).mean()))
        assert float(off_subspace_distance(x, p.A).mean()) < 1e-3
    assert means == sorted(means) and all(abs(m - a) < 0.1 for m, a in zip(means, (-1, 0, 1))), means


def test_gradient_ascent_linear_step():
    theta = torch.tensor([1.0, 2.0])
    f = lambda x: x @ theta
    x0 = torch.zeros(3, 2)
    x = O.gradient_ascent(f, x0, steps=10, lr=0.01, x_std=torch.tensor([1.0, 0.5]), y_std=2.0)
    # x ← x + η·s_x²·θ/s_y with η = 0.01·√2
    step = 0.01 * math.sqrt(2) * torch.tensor([1.0, 0.25]) * theta / 2.0
    torch.testing.assert_close(x, 10 * step.expand(3, 2))
    with pytest.raises(ValueError, match="x_init"):
        O.gradient_ascent(f, torch.zeros(2))


# ------------------------------------------------------------------------ conditional model

def test_conditional_mlp_null_condition_and_config(tmp_path):
    torch.manual_seed(0)
    m = ConditionalMLP(5, hidden=16, depth=2)
    x, sig = torch.randn(4, 5), torch.full((4,), 0.7)
    y = torch.tensor([0.1, math.nan, -1.0, 2.0])
    out = m(x, sig, y)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    null = m(x, sig, None)
    torch.testing.assert_close(out[1], null[1])  # a NaN row is the null condition
    assert not torch.allclose(out[0], null[0])
    torch.testing.assert_close(m(x, sig, torch.tensor(0.3)), m(x, sig, torch.full((4,), 0.3)))
    # a 0-d σ with a scalar or no condition embeds one row for the batch: the same outputs
    s0 = torch.tensor(0.7)
    torch.testing.assert_close(m(x, s0, torch.tensor(0.3)), m(x, sig, torch.full((4,), 0.3)))
    torch.testing.assert_close(m(x, s0, None), null)
    with pytest.raises(ValueError, match="cond must have shape"):
        m(x, sig, torch.zeros(3))
    m2 = ConditionalMLP(5, cond_dim=2, hidden=8)
    assert m2(x, sig, torch.zeros(4, 2)).shape == (4, 5)
    assert ConditionalMLP(**m.config).config == m.config and m.input_shape == (5,)
    od.save_model(tmp_path / "m", m)  # registered by optidiff.optimize.offline
    loaded = od.load_model(tmp_path / "m")
    torch.testing.assert_close(loaded(x, sig, y), out)


# ----------------------------------------------------------------------------- configured runs

TINY = """name = "t"
[task]
name = "linear_subspace"
D = 6
d = 2
n_unlabeled = 200
n_labeled = 30
[reward]
kind = "ridge"
[method]
{method}
[model]
hidden = 16
depth = 2
emb_dim = 16
{model_extra}
[train]
steps = 10
batch_size = 16
[sampler]
batch_size = 16
steps = 4
[generate]
targets = {targets}
seeds = [0, 1]
{generate_extra}
"""


def _run(tmp_path, name="run", method="", targets='[0.5, "max"]', model_extra="cond_emb_dim = 8",
         generate_extra="", resume=False):
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(TINY.format(method=method, targets=targets, model_extra=model_extra,
                               generate_extra=generate_extra))
    return offline_command(cfg, tmp_path / name, resume=resume, progress=False,
                           echo=lambda _: None)


def test_offline_run_writes_records_samples_and_report(tmp_path):
    out, run = _run(tmp_path)
    assert [(r["target"], r["seed"]) for r in out["records"]] == [
        ("0.5", 0), ("0.5", 1), ("max", 0), ("max", 1)]
    task = LinearSubspaceTask(D=6, d=2, n_unlabeled=200, n_labeled=30)
    from optidiff.checkpoint import load_tensors, read_jsonl
    for rec in read_jsonl(run.path / "metrics.jsonl"):  # the oracle's metrics of what was saved
        x = load_tensors(run.path / "samples" / f"{rec['target']}_seed{rec['seed']}.safetensors")
        f = task.reward(x["samples"])
        assert rec["reward_mean"] == pytest.approx(f.mean().item(), rel=1e-6)
        assert rec["off_support"] == pytest.approx(
            off_subspace_distance(x["samples"], task.A).mean().item(), rel=1e-6)
    assert json.loads((run.path / "summary.json").read_text())["method"] == "reward_conditioned"
    assert (run.path / "report.html").is_file() and (run.path / "plots" / "metrics.png").is_file()


def test_offline_gradient_ascent_and_classifier_guidance_runs(tmp_path):
    ga, _ = _run(tmp_path, "ga", method='name = "gradient_ascent"')
    assert [r["target"] for r in ga["records"]] == ["ascent"]
    cg, _ = _run(tmp_path, "cg", method='name = "classifier_guidance"', targets="[1.0]",
                 model_extra="", generate_extra="reward_scale = 1.0\nreward_clip = 1.0")
    assert len(cg["records"]) == 2


def test_offline_config_of_optidiff_0_1_still_runs(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "toml"\n[task]\nname = "subspace"\nD = 4\nd = 2\nn_unlabeled = 50\n'
                   'n_labeled = 10\n[reward]\n[model]\nhidden = 8\n[train]\nsteps = 3\n'
                   'batch_size = 8\n[sample]\ntargets = [0.0]\nn = 4\nsteps = 2\n'
                   'cfg_weight = 1.0\n')
    with pytest.warns(DeprecationWarning, match="linear_subspace"):
        out, _ = offline_command(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    assert out["name"] == "toml" and len(out["records"]) == 1


@pytest.mark.parametrize("patch, match", [
    ({"train": {"stepz": 3}}, r"train\.stepz: unknown key"),
    ({"task": {"name": "gfp"}}, r"task\.name"),
    ({"task": {"D": 2, "d": 3}}, "need 1 <= d <= D"),
    ({"generate": {"targets": ["best"]}}, "'max' or 'qXX'"),
    ({"sampler": {"name": "euler"}}, "unknown sampler"),
    ({"method": {"name": "gradient_ascent"}, "reward": {"kind": "none"}}, "needs a reward model"),
    ({"generate": {"cfg_scale": 2.0}, "method": {"cond_drop": 0.0}}, "cond_drop > 0"),
    ({"train": {"lr": -1.0}}, r"train\.lr"),
    ({"task": {"name": "sphere"}}, "not an offline task"),
])
def test_bad_configs_fail_before_work(tmp_path, patch, match):
    import tomllib

    data = tomllib.loads(TINY.format(method="", targets="[0.5]", model_extra="",
                                     generate_extra=""))
    for k, v in patch.items():
        data[k] = {**data.get(k, {}), **v}
    if patch.get("task", {}).get("name") == "sphere":
        data["task"] = {"name": "sphere"}
    cfg = tmp_path / "bad.toml"
    cfg.write_text("\n".join(f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                    for k, v in body.items())
                             for sec, body in data.items() if isinstance(body, dict)))
    with pytest.raises(ConfigError, match=match):
        offline_command(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    assert not (tmp_path / "run").exists()
