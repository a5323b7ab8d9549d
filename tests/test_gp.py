"""The GP-sequence task, its exact denoiser, the unrolled and transformer networks, and guidance
checked against the exact Gaussian (closed forms, not benchmark numbers)."""

import math

import pytest
import torch

import optidiff as od
from optidiff.guidance import LinearObservation, LookAhead
from optidiff.models import (
    GaussianDenoiser,
    KroneckerGaussianDenoiser,
    SequenceTransformer,
    UnrolledScoreNet,
    load_model,
    save_model,
)
from optidiff.models.unrolled import heavy_ball_bound, nonnegative_spectrum
from optidiff.tasks import make_task
from optidiff.tasks.gp import GPTask, gaussian_conditional, kernel

F64 = torch.float64


def _noisy(task, n, sigma, seed=0):
    x0 = task.sample_exact(n, seed, F64)
    g = torch.Generator().manual_seed(seed + 100)
    return x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)


# ------------------------------------------------------------------------------ task and law

@pytest.mark.parametrize("kern", ["se", "ou", "matern32"])
def test_kronecker_denoiser_equals_dense_gaussian(kern):
    task = GPTask(length=12, dim=3, kernel=kern, lengthscale=2.5, mean_amplitude=0.7,
                  spatial=[[1.0, 0.3, -0.2], [0.3, 2.0, 0.5], [-0.2, 0.5, 1.5]])
    exact, dense = task.exact_model(), GaussianDenoiser(task.mean, task.cov)
    assert torch.allclose(task.cov, exact.cov)
    x = _noisy(task, 16, 0.5)
    for sigma in (torch.tensor(0.05, dtype=F64), torch.tensor(3.0, dtype=F64),
                  torch.logspace(-2, 1, 16, dtype=F64)):
        a, b = exact(x, sigma), dense(x, sigma)
        assert (a - b).abs().max() <= 1e-8 * b.abs().max()


def test_kernels_closed_form_and_stationarity():
    tau = torch.tensor([0.0, 1.0, 4.0], dtype=F64)
    assert torch.allclose(kernel("ou", tau, 4.0), torch.exp(-tau / 4))
    assert torch.allclose(kernel("se", tau, 2.0), torch.exp(-tau**2 / 8))
    r = math.sqrt(3) * tau / 3
    assert torch.allclose(kernel("matern32", tau, 3.0), (1 + r) * torch.exp(-r))
    task = GPTask(length=7, spacing=0.5)
    assert torch.allclose(task.gamma[2, 5], kernel("ou", torch.tensor(1.5), 4.0))
    assert torch.allclose(task.true_autocovariance(0)[0], task.lam)


def test_exact_draws_have_the_law_and_metrics_reach_their_floor():
    task = GPTask(length=16, mean_amplitude=0.5)
    x = task.data(4000)
    assert x.shape == (4000, 32) and x.dtype == torch.float32
    m = task.metrics(x)
    # moment-matched W2² of 4000 exact draws: the Monte-Carlo floor ≈ (N·D)²/(4·n)/tr Σ ~ 1e-3
    assert m["w2_rel"] < 4e-3 and m["autocov_error"] < 0.05
    assert (x.double().mean(0) - task.mean).abs().max() < 0.1
    assert torch.equal(task.data(10), task.data(10))
    assert not torch.equal(task.reference_draws(10), task.data(10))
    # a wrong law is far: both coordinates copies of the first (correlation 1, not 0.6):
    # expected error 0.34·mean_k g(k) ≈ 0.15
    wrong = x.view(4000, 16, 2)[:, :, torch.tensor([0, 0])].reshape(4000, 32)
    assert task.metrics(wrong)["autocov_error"] > 0.1


def test_score_error_is_the_excess_dsm_against_the_exact_eps():
    task = GPTask(length=8)
    exact = task.exact_model()
    sig = [0.1, 1.0]
    assert task.score_error(exact, sig, n=256).abs().max() < 1e-20

    def shifted(x, s, cond=None):
        return exact(x, s) + 0.1

    assert torch.allclose(task.score_error(shifted, sig, n=256), torch.full((2,), 0.01,
                                                                            dtype=F64))


def test_task_registry_and_bad_parameters():
    task = make_task("gp", length=4, dim=1)
    assert task.input_shape == (4,) and task.sequence_shape == (4, 1)
    for bad in ({"kernel": "rbf"}, {"length": 0}, {"lengthscale": -1.0},
                {"spatial": [[1.0, 2.0], [2.0, 1.0]]}, {"spatial": [[1.0]]}):
        with pytest.raises(ValueError):
            GPTask(**bad)
    with pytest.raises(ValueError, match="start"):
        task.window_mean(3, 2)


def test_gaussian_conditional_matches_the_joint_partition():
    """y observes x exactly on a block: the conditional is the Schur complement."""
    task = GPTask(length=6, dim=1)
    P = task.observe([0, 1, 2])
    y = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    m, c = gaussian_conditional(task.mean, task.cov, P, y, 1e-6)
    S = task.cov
    ref = S[3:, :3] @ torch.linalg.solve(S[:3, :3], y)
    assert torch.allclose(m[3:], ref, atol=1e-6) and torch.allclose(m[:3], y, atol=1e-6)
    schur = S[3:, 3:] - S[3:, :3] @ torch.linalg.solve(S[:3, :3], S[:3, 3:])
    assert torch.allclose(c[3:, 3:], schur, atol=1e-6)


# ------------------------------------------------------------------------------ unrolled network

@pytest.mark.parametrize("steps", [8, 32, 96])
def test_unrolled_with_the_true_operator_reproduces_the_exact_score(steps):
    """Error ≤ (2K+1)ρ^K, ρ = (√κ−1)/(√κ+1), κ = L/m (derived in optidiff.models.unrolled)."""
    task = GPTask(length=16, mean_amplitude=0.5)
    floor = torch.linalg.eigvalsh(task.cov).min().item()
    net = UnrolledScoreNet(16, 2, steps=steps, bandwidth=15).double().set_operator(
        task.kernel_values(), task.lam, task.mean, floor=floor)
    assert torch.allclose(net.temporal(), task.gamma.to(net.temporal()))
    exact = task.exact_model()
    for s in (0.05, 0.3, 2.0):
        sigma = torch.tensor(s, dtype=F64)
        x = _noisy(task, 32, s)
        e, e0 = net(x, sigma), exact(x, sigma)
        _, _, L, m = net.step_sizes(sigma, net.temporal(), net.spatial())
        bound = heavy_ball_bound(steps, (L / m).item())
        rel = ((e - e0).norm() / e0.norm()).item()
        assert rel <= max(bound, 1e-8)  # the exact Kronecker solve (eigh) is good to ~1e-8
        if bound < 1:
            assert rel < 1  # it does converge, not just stay bounded
    if steps == 96:
        assert rel < 1e-8


@pytest.mark.parametrize("operator", ["band", "circulant"])
def test_unrolled_pcg_with_the_true_operator_reproduces_the_exact_se_score(operator):
    """The squared-exponential kernel (λ_min(Γ) ≈ 1e-15, κ ≈ 1e5 at σ = 0.01), where heavy ball
    with 32 steps fails: 32 preconditioned CG steps match the exact Gaussian denoiser; the
    circulant operator fits g through a nonnegative spectrum (to ~1e-7, its clamp)."""
    task = GPTask(length=16, kernel="se", mean_amplitude=0.5)
    net = UnrolledScoreNet(16, 2, steps=32, bandwidth=15, solver="pcg",
                           operator=operator).double().set_operator(task.kernel_values(),
                                                                    task.lam, task.mean)
    assert torch.allclose(net.temporal(), task.gamma, atol=1e-6)
    ev = torch.linalg.eigvalsh(net.temporal())  # PSD up to eigh's ~1e-8 relative accuracy
    assert ev.min() >= -1e-8 * ev.abs().max()
    exact = task.exact_model()
    for s, tol in ((0.01, 1e-5 if operator == "band" else 3e-3), (0.1, 1e-4), (2.0, 1e-6)):
        sigma = torch.tensor(s, dtype=F64)
        x = _noisy(task, 32, s)
        e, e0 = net(x, sigma), exact(x, sigma)
        assert ((e - e0).norm() / e0.norm()).item() < tol, (s, operator)


def test_nonnegative_spectrum_fits_a_psd_kernel_and_projects_an_indefinite_one():
    g = kernel("se", torch.arange(16.0), 4.0)
    w = nonnegative_spectrum(g, 64)
    assert (w >= 0).all()
    assert torch.allclose(torch.fft.irfft(w, n=64)[:16], g, atol=1e-7)
    bad = torch.tensor([1.0, 0.9, 0.0, -0.9])  # not the start of any PSD Toeplitz
    toeplitz = torch.fft.irfft(nonnegative_spectrum(bad, 8), n=8)[:4]
    lag = (torch.arange(4)[:, None] - torch.arange(4)).abs()
    ev = torch.linalg.eigvalsh(toeplitz[lag])
    assert ev.min() >= -1e-8 * ev.abs().max()
    with pytest.raises(ValueError, match="size"):
        nonnegative_spectrum(g, 20)


@pytest.mark.parametrize("operator", ["band", "circulant"])
def test_unrolled_set_moments_recovers_the_kernel_from_exact_draws(operator):
    task = GPTask(length=12, kernel="ou", mean_amplitude=0.5)
    net = UnrolledScoreNet(12, 2, bandwidth=11, operator=operator, solver="pcg")
    net.set_moments(task.sample_exact(8192, 0))
    g, lam = net.kernel().detach().double(), net.spatial().detach().double()
    assert torch.allclose(g * lam[0, 1], task.kernel_values() * task.lam[0, 1], atol=0.03)
    assert torch.allclose(net.mean.detach().double().reshape(-1), task.mean, atol=0.05)
    with pytest.raises(ValueError, match="data"):
        net.set_moments(torch.zeros(4, 10))


@pytest.mark.parametrize(("solver", "operator"), [("heavy_ball", "band"), ("pcg", "circulant")])
def test_unrolled_per_sample_sigma_and_round_trip(tmp_path, solver, operator):
    net = UnrolledScoreNet(8, 2, steps=4, bandwidth=3, solver=solver, operator=operator)
    x = torch.randn(5, 16)
    sig = torch.logspace(-1, 1, 5)
    rows = torch.cat([net(x[i:i + 1], sig[i]) for i in range(5)])
    assert torch.allclose(net(x, sig), rows, atol=1e-6)
    save_model(tmp_path / "m", net)
    again = load_model(tmp_path / "m")
    assert torch.equal(again(x, sig), net(x, sig))
    assert net.kernel().shape == ((4,) if operator == "band" else (8,))
    with pytest.raises(ValueError, match="steps"):
        UnrolledScoreNet(8, 2, steps=0)
    with pytest.raises(ValueError, match="operator"):
        UnrolledScoreNet(8, 2, operator="dense")


# ------------------------------------------------------------------------------ transformer

def test_transformer_shapes_attention_and_any_length(tmp_path):
    torch.manual_seed(0)
    net = SequenceTransformer(12, 2, width=16, depth=2, heads=2, emb_dim=16)
    for b in net.blocks:  # leave adaLN-Zero's identity start so the blocks act
        torch.nn.init.normal_(b.ada.weight, std=0.1)
    x, sig = torch.randn(3, 24), torch.tensor([0.1, 1.0, 5.0])
    eps = net(x, sig)
    assert eps.shape == x.shape
    maps = net.attention_maps(x, sig)
    assert len(maps) == 2 and maps[1].shape == (3, 2, 12, 12)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 2, 12))
    # the fused attention of forward equals the explicit softmax(QKᵀ/√d)V of attention_maps
    blk = net.blocks[0]
    tokens, emb = net._embed(x, sig)
    h = net.inp(tokens) + net.pos(net.pe)
    s1, c1 = blk._modulation(emb)[:2]
    _, _, v = blk._qkv(h, s1, c1)
    fused = torch.nn.functional.scaled_dot_product_attention(*blk._qkv(h, s1, c1))
    assert torch.allclose(fused, blk.attention(h, emb) @ v, atol=1e-5)
    # the weights do not depend on the length: a longer model takes the same state dict
    longer = SequenceTransformer(20, 2, width=16, depth=2, heads=2, emb_dim=16)
    longer.load_state_dict(net.state_dict())
    assert longer(torch.randn(2, 40), torch.tensor(1.0)).shape == (2, 40)
    save_model(tmp_path / "t", net)
    assert torch.allclose(load_model(tmp_path / "t")(x, sig), eps)


def test_transformer_output_is_not_capped_by_a_final_norm():
    """ε must scale with x (at large σ, ε ≈ x/σ); a final LayerNorm would bound it per token."""
    net = SequenceTransformer(8, 2, width=16, depth=1, heads=2, emb_dim=16)
    x = torch.randn(4, 16)
    small, big = net(x, torch.tensor(1.0)), net(1e3 * x, torch.tensor(1.0))
    assert big.abs().max() > 100 * small.abs().max()


# ------------------------------------------------------------------------------ guidance

def test_lookahead_on_the_exact_model_is_the_gaussian_conditional_score():
    """Lemma 1 (Guo et al.): with beta='lemma1' the guided ε of the exact denoiser equals the
    exact denoiser of the conditional law given y = gᵀx0 + N(0, σ_y²), at every (x, σ)."""
    task = GPTask(length=16, mean_amplitude=0.3)
    g = task.window_mean(12, 16)
    cond = task.conditional(g, torch.tensor([1.2]), 0.1)
    guide = LookAhead(g, 1.2, noise_std=0.1)
    for s in (0.02, 0.5, 5.0):
        x = _noisy(task, 8, s)
        sigma = torch.tensor(s, dtype=F64)
        a, b = guide(task.exact_model(), x, sigma), cond(x, sigma)
        # float64 eigh-based solves are good to ~1e-8 relative; ε divides x0 errors by σ
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_linear_observation_forecasts_with_the_gaussian_conditional():
    """Forecasting: observe the first 6 tokens; the guided exact model is the conditional
    law's exact denoiser, and DPM-Solver++ samples have its moments."""
    task = GPTask(length=10, dim=2)
    P = task.observe(range(6))
    y = task.sample_exact(1, 7, F64)[0] @ P.T
    cond = task.conditional(P, y, 0.05)
    guide = LinearObservation(P, y, noise_std=0.05)
    for s in (0.03, 0.7, 8.0):
        x = _noisy(task, 4, s)
        sigma = torch.tensor(s, dtype=F64)
        a, b = guide(task.exact_model(), x, sigma), cond(x, sigma)
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    sigmas = od.LogLinearSchedule(0.005, 20.0, 1000).sample_sigmas(30, final_zero=True)
    xs = od.sample(task.exact_model(), sigmas.double(), batch_size=1000, sampler="dpmpp_2m",
                   guidance=guide, generator=torch.Generator().manual_seed(0))
    free = slice(12, 20)
    assert (xs.mean(0)[free] - cond.mean[free]).abs().max() < 0.1
    cov = torch.cov(xs[:, free].T)
    assert (cov - cond.cov[free, free]).abs().max() < 0.12
    assert (xs[:, :12] - y).abs().max() < 0.3  # the observed tokens are reproduced
    one = LinearObservation(task.window_mean(6, 10)[None], torch.tensor([0.5]), noise_std=0.1)
    la = LookAhead(task.window_mean(6, 10), 0.5, noise_std=0.1)
    x = _noisy(task, 4, 0.4)
    assert torch.allclose(one(task.exact_model(), x, torch.tensor(0.4, dtype=F64)),
                          la(task.exact_model(), x, torch.tensor(0.4, dtype=F64)))


def test_linear_observation_bad_shapes():
    task = GPTask(length=4, dim=1)
    with pytest.raises(ValueError, match="y has shape"):
        LinearObservation(task.observe([0, 1]), torch.zeros(3))(task.exact_model(),
                                                                torch.zeros(2, 4, dtype=F64),
                                                                torch.tensor(1.0))
    with pytest.raises(ValueError, match="noise_std"):
        LinearObservation(task.observe([0]), torch.zeros(1), noise_std=0)


def test_kronecker_denoiser_checks_shapes():
    with pytest.raises(ValueError, match="mean"):
        KroneckerGaussianDenoiser(torch.zeros(5), torch.eye(2), torch.eye(2))


# ------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("kind", ["transformer", "unrolled"])
def test_train_and_sample_a_gp_model_from_the_example_config(tmp_path, kind):
    from pathlib import Path

    from typer.testing import CliRunner

    from optidiff.checkpoint import read_jsonl
    from optidiff.cli import app

    text = (Path(__file__).resolve().parents[1] / "examples" / "train_gp.toml").read_text()
    text = (text.replace("length = 32", "length = 8").replace("n = 16384", "n = 256")
            .replace("steps = 2000", "steps = 4").replace("batch_size = 2000", "batch_size = 64")
            .replace("log_every = 100", "log_every = 2"))
    if kind == "unrolled":
        text = text.replace('kind = "transformer"\nwidth = 32\ndepth = 2\nheads = 2',
                            'kind = "unrolled"\nunroll = 4\nbandwidth = 3')
    cfg = tmp_path / "gp.toml"
    cfg.write_text(text)
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(cfg), "--run-dir", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    rec = read_jsonl(run / "metrics.jsonl")[-1]
    assert rec["event"] == "sample" and rec["w2_rel"] > 0 and rec["autocov_error"] > 0
    plots = {p.stem for p in (run / "plots").iterdir()}
    assert {"paths", "autocovariance", "loss"} <= plots
    assert ("attention" in plots) == (kind == "transformer")
    out = tmp_path / "s"
    res = runner.invoke(app, ["sample", "--checkpoint", str(run), "--sampler", "dpmpp_2m",
                              "--steps", "5", "--batch-size", "32", "--run-dir", str(out),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "w2_rel" in read_jsonl(out / "metrics.jsonl")[0]
    assert (out / "plots" / "paths.png").is_file()


def test_gp_config_errors_name_the_field(tmp_path):
    from optidiff.config import ConfigError, parse_config

    base = {"task": {"name": "gp", "length": 8}, "model": {"kind": "transformer"}}
    assert parse_config({**base}, "train").model.kind == "transformer"
    with pytest.raises(ConfigError, match="multiple of heads"):
        parse_config({**base, "model": {"kind": "transformer", "width": 30, "heads": 4}}, "train")
    with pytest.raises(ConfigError, match="unroll"):
        parse_config({**base, "model": {"kind": "transformer", "unroll": 3}}, "train")
    with pytest.raises(ConfigError, match="kernel"):
        from optidiff.runs.common import build_task
        build_task(parse_config({"task": {"name": "gp", "kernel": "rbf"}}, "train"), "cfg")
