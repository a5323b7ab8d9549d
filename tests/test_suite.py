"""The offline sequence suite: baselines against brute force, the held-out-top selection, the
metrics, the Ehrlich task against pytorch-holo, and a configured suite run end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from optidiff.optimize import baselines as B
from optidiff.optimize import selection as S
from optidiff.optimize import suite as U
from optidiff.optimize.rewards import EnsembleReward, RidgeReward
from optidiff.tasks.tfbind8 import to_integers, to_logits


def _additive(C: int, L: int, seed: int = 0) -> tuple[torch.Tensor, object]:
    """An additive score table w (L, C) and f̂ on logits equal to Σ_i w[i, x_i] (exact: the
    logits are an affine function of the one-hot rows)."""
    w = torch.randn(L, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        x = to_integers(z, C)
        return w.gather(1, x.T).sum(0).to(z.dtype)

    return w, f


def _problem(C: int = 3, L: int = 5, n_visible: int = 60) -> tuple[U.SequenceProblem, torch.Tensor]:
    w, _ = _additive(C, L, seed=1)
    allx = torch.tensor(list(itertools.product(range(C), repeat=L)))
    score = w.gather(1, allx.T).sum(0)
    order = torch.argsort(score)
    vis = allx[order[:n_visible]]

    def oracle(x: torch.Tensor) -> torch.Tensor:
        s = w.gather(1, torch.as_tensor(x).long().T).sum(0)
        return (s - score.min()) / (score.max() - score.min())

    seen = set(B.seq_keys(vis))
    held = torch.stack([x for x in allx if B.seq_keys(x[None])[0] not in seen])
    return U.SequenceProblem("toy", vis, oracle(vis).float(), C, oracle, held), allx


def test_relaxed_round_trips_for_any_alphabet():
    x = torch.randint(20, (7, 6), generator=torch.Generator().manual_seed(0))
    z = B.relaxed(x, 20)
    assert z.shape == (7, 6 * 19)
    assert torch.equal(to_integers(z, 20), x)
    torch.testing.assert_close(z.reshape(7, 6, 19), to_logits(x, num_classes=20))


def test_enumeration_is_the_brute_force_top_outside_the_visible_set():
    C, L, n = 3, 4, 10
    w, f = _additive(C, L)
    allx = torch.tensor(list(itertools.product(range(C), repeat=L)))
    s = w.gather(1, allx.T).sum(0)
    best = allx[torch.argsort(s, descending=True)]
    exclude = set(B.seq_keys(best[:3]))  # the three best are "visible"
    out = B.enumeration(f, L, C, n, exclude)
    assert torch.equal(out, best[3:3 + n])
    with pytest.raises(ValueError, match="exceeds"):
        B.enumeration(f, 30, 20, n, set())


def test_uniform_random_is_seeded():
    a, b = B.uniform_random(50, 8, 4, seed=3), B.uniform_random(50, 8, 4, seed=3)
    assert torch.equal(a, b) and a.shape == (50, 8) and set(a.unique().tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(a, B.uniform_random(50, 8, 4, seed=4))
    with pytest.raises(ValueError, match="n must be"):
        B.uniform_random(0, 8, 4, seed=0)


def test_evolution_reaches_the_known_optimum_of_an_additive_reward():
    C, L = 4, 6
    w, f = _additive(C, L, seed=2)
    x = torch.randint(C, (300, L), generator=torch.Generator().manual_seed(0))
    y = f(B.relaxed(x, C)).float()
    opt = w.argmax(1)  # the optimum of an additive score, in closed form
    out = B.evolution(f, x, y, C, 5, set(B.seq_keys(x)), seed=0, generations=40, particles=64)
    assert torch.equal(out[0], opt)
    assert not set(B.seq_keys(out)) & set(B.seq_keys(x))
    again = B.evolution(f, x, y, C, 5, set(B.seq_keys(x)), seed=0, generations=40, particles=64)
    assert torch.equal(out, again)


def test_surrogate_gradient_ascent_moves_toward_a_linear_optimum():
    C, L = 4, 5
    w, _ = _additive(C, L, seed=3)
    x = torch.randint(C, (200, L), generator=torch.Generator().manual_seed(1))
    z = B.relaxed(x, C)
    y = w.gather(1, x.T).sum(0).float()
    ridge = RidgeReward.fit(z.double(), y.double(), alpha=1e-6)  # exact: y is linear in z
    out = B.surrogate_gradient_ascent(ridge, x, y, C, 16, steps=100, lr=0.05)
    assert out.shape == (16, L)
    assert w.gather(1, out.T).sum(0).mean() > y.sort(descending=True).values[:16].mean()


def test_holdout_split_and_selection_use_no_oracle():
    x = torch.zeros(20, 3, dtype=torch.long)
    x[:, 0] = torch.arange(20) % 2  # designs (0, 0, 0) and (1, 0, 0)
    y = torch.arange(20, dtype=torch.float32)
    xi, yi = S.holdout_split(x, y, 0.25)
    assert torch.equal(yi, y[:15]) and torch.equal(xi, x[:15])
    with pytest.raises(ValueError, match="holdout"):
        S.holdout_split(x, y, 1.0)

    def validator(z):  # f̂_val = the sum of the integer tokens
        return to_integers(z, 4).sum(1).float()

    feat = lambda s: B.relaxed(s, 4)
    low = torch.zeros(4, 3, dtype=torch.long)
    low[:, 1] = 1  # (0, 1, 0): new, validator value 1
    cands = {"copy": xi[:4], "low": low, "high": torch.full((4, 3), 3)}
    best, table = S.select_setting(["copy", "low", "high"], cands.__getitem__, xi, validator,
                                   feat)
    assert best == "high"
    assert table[0]["validation_p50"] == -np.inf  # copying its data loses
    assert table[1]["validation_p50"] == 1.0 and table[2]["validation_p50"] == 9.0


def test_evaluate_deduplicates_and_counts_novelty_and_feasibility():
    p, _ = _problem()
    cands = torch.cat([p.x[:2], p.x[:2], p.heldout[-3:]])  # 2 visible twice, 3 new
    p.feasible = lambda s: s[:, 0] != 0
    m = U.evaluate(p, cands, set(B.seq_keys(p.x)))
    assert (m["generated"], m["unique"], m["duplicates"]) == (7, 5, 2)
    assert m["novel"] == pytest.approx(3 / 5)
    u = torch.cat([p.x[:2], p.heldout[-3:]])
    s = p.oracle(u).double().numpy()
    assert m["p50"] == pytest.approx(np.percentile(s, 50)) and m["p100"] == pytest.approx(s.max())
    assert m["feasible"] == pytest.approx(float((u[:, 0] != 0).double().mean()))


def test_penalised_ensemble_is_a_lower_confidence_bound():
    ms = [RidgeReward(3) for _ in range(3)]
    for k, m in enumerate(ms):
        m.bias.fill_(float(k))
    ens = EnsembleReward(ms)
    z = torch.zeros(2, 3, dtype=torch.float64)
    torch.testing.assert_close(U.penalised(ens, 0.0)(z), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(U.penalised(ens, 2.0)(z), torch.full((2,), 1.0 - 2.0,
                                                                   dtype=torch.float64))


def test_log_density_matches_the_gaussian_closed_form():
    """The denoising bound of the exact Gaussian denoiser is log N(x; μ, Σ) up to a constant."""
    from optidiff.models.analytic import GaussianDenoiser
    from optidiff.optimize.likelihood import log_density

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    d = GaussianDenoiser(m, a @ a.T + 0.3 * torch.eye(3, dtype=torch.float64))
    x = m + 1.5 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    est = log_density(d, x, sigma_min=1e-3, sigma_max=1e3, levels=48)
    ref = d.log_density(x, torch.tensor(0.0, dtype=torch.float64))
    assert float(ref.max() - ref.min()) > 5  # a spread of several nats to match
    # antithetic pairs + shared noise: exact for a Gaussian up to quadrature and float32
    torch.testing.assert_close(est - est[0], ref - ref[0], atol=5e-3, rtol=0)
    assert torch.equal(est, log_density(d, x, sigma_min=1e-3, sigma_max=1e3, levels=48))
    with pytest.raises(ValueError, match="sigma_min"):
        log_density(d, x, sigma_min=0.0)
    with pytest.raises(ValueError, match="levels"):
        log_density(d, x, levels=1)


def test_prior_objective_standardises_surrogate_and_density():
    """J_β = z(f̂) + β·z(log p̂): both terms standardised on the reference set; the density term
    follows the exact log-density of a Gaussian prior; β = 0 ranks as enumeration does."""
    from optidiff.models.analytic import GaussianDenoiser

    p, allx = _problem(C=3, L=4, n_visible=40)
    _, f = _additive(3, 4, seed=2)
    z = p.features(p.x).double()
    d = GaussianDenoiser(z.mean(0), torch.cov(z.T) + 0.1 * torch.eye(z.shape[1]))
    obj = U.PriorObjective(f, d, 3, p.x, levels=24, seed=0)
    t = obj.terms(p.x)
    assert list(t) == ["f", "density"]  # no top: no classifier term
    for v in t.values():
        assert abs(float(v.mean())) < 1e-6 and float(v.std()) == pytest.approx(1.0)
    x, t = obj.space(4)
    sf, sl = t["f"], t["density"]
    assert torch.equal(x, allx)
    from scipy.stats import spearmanr
    exact = d.log_density(p.features(x).double(), torch.tensor(0.0, dtype=torch.float64))
    assert spearmanr(sl.numpy(), exact.numpy()).statistic > 0.95
    torch.testing.assert_close(obj.of(0.5)(p.features(x)), sf + 0.5 * sl)
    visible = set(B.seq_keys(p.x))
    assert torch.equal(B.top_new(x, sf, 8, visible), B.enumeration(f, 4, 3, 8, visible))
    with pytest.raises(ValueError, match="term='classifier'"):
        obj.of(0.5, "classifier")


def test_implicit_classifier_is_the_difference_of_two_log_densities():
    """r(x) = log p̂(x | top) − log p̂(x | ∅): the classifier term equals two independent
    log_density calls (same seed) subtracted, standardised on the reference set; of(β,
    "classifier") is z(f̂) + β·z(r)."""
    from optidiff.models import ConditionalMLP
    from optidiff.optimize.likelihood import log_density

    p, _ = _problem(C=3, L=4, n_visible=40)
    _, f = _additive(3, 4, seed=2)
    z_ref, z = p.features(p.x), p.features(p.x[:7])
    torch.manual_seed(0)
    model = ConditionalMLP(z.shape[1], hidden=16, depth=1).eval()
    obj = U.PriorObjective(f, model, 3, p.x, levels=4, seed=3, top=1.5)
    r_ref, r = (log_density(model, v, levels=4, seed=3, cond=1.5)
                - log_density(model, v, levels=4, seed=3, cond=math.nan) for v in (z_ref, z))
    expected = (r - r_ref.mean()) / r_ref.std()
    torch.testing.assert_close(obj.terms(p.x[:7])["classifier"], expected)
    torch.testing.assert_close(obj.of(0.5, "classifier")(z),
                               obj.terms(p.x[:7])["f"] + 0.5 * expected)
    assert not torch.equal(obj.terms(p.x[:7])["classifier"], obj.terms(p.x[:7])["density"])


def test_ddom_row_has_the_papers_settings():
    """The DDOM row (Krishnamoorthy et al., ICML 2023): observed labels and no reward model,
    the training set drawn by DDOM's weights, its VP noise levels and prior, classifier-free
    guidance γ = 2 (w = 3) at the largest visible label, Heun's sampler; the row's candidates are
    that model's samples."""
    from optidiff.optimize.offline import ddom_schedule
    from optidiff.optimize.rewards import ddom_weights

    p, _ = _problem(C=3, L=4, n_visible=40)
    st = U.SuiteSettings(n=6, diffusion_steps=5, batch_size=16, sample_steps=3,
                         model_kwargs={"hidden": 8, "depth": 1}, methods=("DDOM",))
    res = U.ddom(p, st, seed=2)
    assert res.reward_model is None and torch.equal(res.labels, p.y.float())
    assert torch.equal(res.weights, ddom_weights(p.y.float()))
    assert res.cfg_scale == 3.0 and res.prior == "vp" and res.sampler == "heun"
    torch.testing.assert_close(res.sigmas, ddom_schedule().sample_sigmas(3, final_zero=True))
    assert res.resolve_target("max") == float(p.y.max())
    rec = U.run_seed(p, st, 2, None)["records"]
    assert [r["method"] for r in rec] == ["DDOM"]
    x = to_integers(res.generate("max", 6, seed=2), 3)
    expected = U.evaluate(p, x, set(B.seq_keys(p.x)))
    assert {k: v for k, v in rec[0].items() if k in expected} == expected


def test_run_problem_every_method_on_a_tiny_space():
    p, _ = _problem(C=3, L=5, n_visible=120)
    st = U.SuiteSettings(n=8, seeds=(0,), ensemble=2, reward_kwargs={
        "hidden": 16, "depth": 1, "steps": 150, "batch_size": 64}, diffusion_steps=30,
        batch_size=32, model_kwargs={"hidden": 16, "depth": 1}, sample_steps=4, pool=2,
        reward_scales=(0.0, 10.0), penalties=(0.0, 1.0), evolution_generations=3)
    res = U.run_problem(p, st, progress=False)
    methods = [r["method"] for r in res["records"]]
    assert methods == list(U.METHODS)
    assert set(res["setting"]) == {"reward_scale", "trust_scale", "penalty", "prior_weight",
                                   "classifier_weight"}
    # scales (0, 10); trust: the same × λ (0, 1); the default β grid for both prior rows
    assert len(res["selection"]) == 2 + 2 * 2 + 2 * len(st.prior_weights)
    for r in res["records"]:   # the reported metrics are those of the distinct candidates' scores
        s = np.asarray(r["scores"])
        assert r["unique"] == len(s) >= 1 and r["unique"] + r["duplicates"] == r["generated"]
        assert r["p100"] == s.max() and r["p50"] == pytest.approx(np.median(s))
        assert ((0 <= s) & (s <= 1)).all()
    enum = next(r for r in res["records"] if r["method"] == "enumeration")
    assert enum["novel"] == 1.0 and enum["duplicates"] == 0
    assert -1 <= res["rank_correlation"][0] <= 1 and -1 <= res["prior_rank_correlation"][0] <= 1
    with pytest.raises(ValueError, match="unknown methods"):
        U.SuiteSettings(methods=("magic",))


def test_prior_weights_take_any_finite_value():
    """Negative β (novelty: J penalises the prior's density) is a valid setting; NaN and ±inf
    are rejected with the argument and the value named, by SuiteSettings and by the config."""
    assert U.SuiteSettings(prior_weights=(0.0, -0.5)).prior_weights == (0.0, -0.5)
    assert min(U.SuiteSettings().prior_weights) < 0 < max(U.SuiteSettings().prior_weights)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=rf"prior_weights must be finite, got {bad}"):
            U.SuiteSettings(prior_weights=(0.0, bad))
    with pytest.raises(ValueError, match="prior_weights must hold at least one value"):
        U.SuiteSettings(prior_weights=())


def test_parallel_cells_equal_the_serial_run():
    """run_problems in 2 spawned workers (selection, then one cell per seed) gives the serial
    run's records, settings and rank correlations; only the seconds differ."""
    pytest.importorskip("holo")
    st = U.SuiteSettings(n=8, seeds=(0, 1), methods=("uniform random", "evolution",
                                                     "RCD prior-regularised"),
                         ensemble=2, reward_kwargs={"hidden": 8, "depth": 1, "steps": 20},
                         diffusion_steps=10, batch_size=32, model_kwargs={"hidden": 8,
                                                                          "depth": 1},
                         sample_steps=2, pool=1, reward_scales=(10.0,), penalties=(0.0,),
                         prior_weights=(0.0, 0.5), likelihood_levels=2,
                         evolution_generations=2)
    params = {"lengths": [32], "n_offline": 256}

    def strip(results):
        return [{**r, "records": [{k: v for k, v in rec.items() if k != "seconds"}
                                  for rec in r["records"]],
                 "selection": [{k: v for k, v in row.items() if k != "seconds"}
                               for row in r["selection"]]} for r in results]

    serial = U.run_problems("ehrlich", params, st)
    parallel = U.run_problems("ehrlich", params, st, workers=2)
    assert [r["seed"] for r in serial[0]["records"]] == [0, 0, 0, 1, 1, 1]
    assert strip(parallel) == strip(serial)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        U.run_problems("ehrlich", params, st, workers=0)


# ------------------------------------------------------------------------------------ Ehrlich

def test_ehrlich_task_matches_pytorch_holo():
    pytest.importorskip("holo")
    from holo.test_functions.closed_form import Ehrlich

    from optidiff.tasks import make_task

    task = make_task("ehrlich", lengths=[32], n_offline=256)
    (p,) = task.problems()
    ref = Ehrlich(num_states=20, dim=32, num_motifs=2, motif_length=4, quantization=4,
                  random_seed=0)
    torch.testing.assert_close(p.oracle(p.x), ref(p.x).double())
    assert p.feasible(p.x).all() and (p.y <= p.info["threshold"]).all()
    assert len(p.x) >= 128  # at or below the median: at least half
    opt = ref.optimal_solution()
    assert float(p.oracle(opt[None])) == 1.0
    rnd = B.uniform_random(512, 32, 20, seed=0)
    feas = p.feasible(rnd)
    assert feas.double().mean() < 0.1  # random sequences are mostly infeasible ...
    assert (p.oracle(rnd[~feas]) == 0).all()  # ... and score 0, not −inf
    assert torch.isinf(ref(rnd[~feas])).all()
    with pytest.raises(ValueError, match="Ehrlich sizes"):
        make_task("ehrlich", lengths=[33])


def test_ehrlich_suite_run_from_a_config(tmp_path):
    pytest.importorskip("holo")
    from optidiff.runs.offline import offline_command

    cfg = tmp_path / "e.toml"
    cfg.write_text('name = "e"\n[task]\nname = "ehrlich"\nlengths = [32]\nn_offline = 400\n'
                   '[reward]\nkind = "mlp"\nensemble = 2\nhidden = 16\ndepth = 1\nsteps = 30\n'
                   '[method]\nname = "suite"\n[suite]\nn = 8\nseeds = [0]\ndiffusion_steps = 20\n'
                   'hidden = 16\ndepth = 1\nsample_steps = 3\npool = 2\nreward_scales = [10.0]\n'
                   'penalties = [0.0]\nprior_weights = [0.0, 0.5]\nlikelihood_levels = 4\n'
                   'evolution_generations = 2\n')
    out, run = offline_command(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    methods = {r["method"] for r in out["records"]}
    assert "enumeration" not in methods and "evolution" in methods  # 20^32: no enumeration
    assert "RCD prior-regularised" in methods  # by evolution here
    assert out["results"][0]["setting"]["prior_weight"] in (0.0, 0.5)
    assert {r["problem"] for r in out["table"]} == {"ehrlich L=32"}
    assert (run.path / "plots" / "scores.png").is_file() and (run.path / "report.html").is_file()
    events = {json.loads(line).get("event") for line in
              (run.path / "metrics.jsonl").read_text().splitlines()}
    assert events == {"candidates", "selection", "table"}


@pytest.mark.parametrize("name", ["offline_tfbind8", "offline_tfsuite", "offline_ehrlich"])
def test_example_offline_configs_validate(name):
    from pathlib import Path

    from optidiff.config import load_config
    from optidiff.runs.offline import suite_settings

    cfg = load_config(Path(__file__).parents[1] / "examples" / f"{name}.toml", "offline")
    if cfg.method.name == "suite":  # the benchmark's settings
        assert suite_settings(cfg).reward_kwargs["steps"] == U.SuiteSettings().reward_kwargs["steps"]
        assert suite_settings(cfg).diffusion_steps == U.SuiteSettings().diffusion_steps


def test_suite_config_errors(tmp_path):
    from optidiff.config import ConfigError, load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('[task]\nname = "linear_subspace"\n[reward]\nkind = "mlp"\n[method]\n'
                   'name = "suite"\n')
    with pytest.raises(ConfigError, match="sequence task"):
        load_config(cfg, "offline")
    cfg.write_text('[task]\nname = "ehrlich"\n[reward]\nkind = "mlp"\n[method]\nname = "suite"\n'
                   '[suite]\nmethods = ["magic"]\n')
    with pytest.raises(ConfigError, match="unknown"):
        load_config(cfg, "offline")
    cfg.write_text('[task]\nname = "ehrlich"\n[reward]\nkind = "mlp"\n[method]\nname = "suite"\n'
                   '[suite]\nprior_weights = [0.0, nan]\n')
    with pytest.raises(ConfigError, match="prior_weights must be finite, got nan"):
        load_config(cfg, "offline")
