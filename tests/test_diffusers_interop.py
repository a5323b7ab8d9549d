"""diffusers interop: the UNet wrapper and the (γ, μ) scheduler against diffusers' own DDIM and DDPM.

Every model here is a tiny randomly initialised diffusers UNet built from a config (no hub access).
Comparisons are in VP coordinates z (what diffusers loops carry): an od.sample result x at σ maps to
z = x/√(1+σ²). Float32 throughout, so tolerances are relative to the size of z.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import optidiff as od
from optidiff.models import VPModel
from optidiff.models.diffusers import GradientEstimationScheduler, from_diffusers
from optidiff.sampling import gamma_mu_step
from optidiff.schedules import Schedule, alpha_bar_to_sigma, vp_scale

STEPS = 10  # divides 1000: DDIMScheduler's "t − n//steps" previous timestep is then the trailing grid
PRED_TYPES = ("epsilon", "v_prediction", "sample")


pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_unet(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
               layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
               up_block_types=("UpBlock2D",) * 2)
    return diffusers.UNet2DModel(**{**cfg, **kwargs}).eval()


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


@pytest.fixture(scope="module")
def z_init():
    return torch.randn(3, 1, 8, 8, generator=_gen(1))


@torch.no_grad()
def _diffusers_loop(unet, sched, z, steps=STEPS, generator=None):
    """The plain diffusers denoising loop."""
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        kw = {} if generator is None else {"generator": generator}
        z = sched.step(unet(z, t).sample, t, z, **kw).prev_sample
    return z


def _od_vp(model, sigmas, z_init, **kwargs):
    """od.sample from the VP latent z_init at σ_N, returned as the VP latent at σ_0."""
    sigmas = sigmas.float()
    x = od.sample(model, sigmas, x_init=z_init / vp_scale(sigmas[0]), **kwargs)
    return x * vp_scale(sigmas[-1])


def _close(a, b, rtol=2e-5):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"max error {err:.3g} for values of size {scale:.3g}"


def _ddim(prediction_type):
    return diffusers.DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False,
                                   clip_sample=False, prediction_type=prediction_type)


# ------------------------------------------------------------------------------ the wrapper

@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_wrapper_ddim_equals_diffusers_ddim(unet, z_init, prediction_type):
    ddim = _ddim(prediction_type)
    ref = _diffusers_loop(unet, ddim, z_init)
    model = from_diffusers(unet, ddim)
    assert isinstance(model, VPModel) and model.prediction_type == prediction_type
    assert model.input_shape == (1, 8, 8)
    sigmas = Schedule(alpha_bar_to_sigma(ddim.alphas_cumprod.double())).sample_sigmas(STEPS)
    out = _od_vp(model, sigmas, z_init, sampler="ddim")
    _close(out, ref)
    # and the trajectory really moved: the prediction type matters
    other = "epsilon" if prediction_type != "epsilon" else "v_prediction"
    assert (_od_vp(from_diffusers(unet, _ddim(other)), sigmas, z_init, sampler="ddim")
            - ref).abs().max() > 1e-2


def test_wrapper_from_config_mapping_and_timestep_lookup(unet):
    ddim = _ddim("v_prediction")
    a, b = from_diffusers(unet, ddim), from_diffusers(unet, dict(ddim.config))
    assert b.prediction_type == "v_prediction"
    torch.testing.assert_close(a.alphas_cumprod, b.alphas_cumprod)
    # σ of training index t is mapped back to t; the net sees z = x/√(1+σ²) and t
    sig = alpha_bar_to_sigma(ddim.alphas_cumprod.double())[[999, 500, 0]]
    assert a.timestep(sig).tolist() == [999, 500, 0]
    x = torch.randn(3, 1, 8, 8, generator=_gen(2))
    with torch.no_grad():
        out = unet(x * vp_scale(sig.float()).view(-1, 1, 1, 1), torch.tensor([999, 500, 0])).sample
        abar = ddim.alphas_cumprod[[999, 500, 0]].view(-1, 1, 1, 1)
        z = x * vp_scale(sig.float()).view(-1, 1, 1, 1)
        torch.testing.assert_close(a(x, sig.float()), abar.sqrt() * out + (1 - abar).sqrt() * z,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="scheduler_or_config"):
        from_diffusers(unet, 3)


def test_wrapper_class_labels_and_null_class():
    unet = _tiny_unet(num_class_embeds=4)
    ddim = _ddim("epsilon")
    x, sig = torch.randn(2, 1, 8, 8, generator=_gen(3)), torch.tensor(2.0)
    t = from_diffusers(unet, ddim).timestep(sig).expand(2)
    z = x * vp_scale(sig)
    with torch.no_grad():
        model = from_diffusers(unet, ddim)
        labels = torch.tensor([1, 2])
        torch.testing.assert_close(model(x, sig, labels), unet(z, t, class_labels=labels).sample)
        assert (model(x, sig, labels) - model(x, sig, torch.tensor([0, 0]))).abs().max() > 1e-4
        # label −1 (optidiff's null class) and cond=None map to null_cond
        nulled = from_diffusers(unet, ddim, null_cond=3)
        ref = unet(z, t, class_labels=torch.tensor([3, 2])).sample
        torch.testing.assert_close(nulled(x, sig, torch.tensor([-1, 2])), ref)
        torch.testing.assert_close(nulled(x, sig)[0], ref[0])
        with pytest.raises(ValueError, match="null_cond"):
            model(x, sig, torch.tensor([-1, 2]))


def test_wrapper_cross_attention_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=6, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    ddim = _ddim("epsilon")
    model = from_diffusers(unet, ddim)
    x, sig = torch.randn(2, 1, 8, 8, generator=_gen(4)), torch.tensor(3.0)
    emb = torch.randn(2, 5, 6, generator=_gen(5))
    t = model.timestep(sig).expand(2)
    with torch.no_grad():
        ref = unet(x * vp_scale(sig), t, encoder_hidden_states=emb).sample
        torch.testing.assert_close(model(x, sig, emb), ref)
        with pytest.raises(ValueError, match="encoder_hidden_states"):
            model(x, sig)
        empty = torch.zeros(1, 5, 6)  # stands for the empty-prompt embedding
        torch.testing.assert_close(
            from_diffusers(unet, ddim, null_cond=empty)(x, sig),
            unet(x * vp_scale(sig), t, encoder_hidden_states=empty.expand(2, 5, 6)).sample)


# ------------------------------------------------------------------------------ the scheduler

@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_ge_scheduler_loop_equals_od_sample(unet, z_init, prediction_type):
    sched = GradientEstimationScheduler(prediction_type=prediction_type)  # γ = 2, μ = 0
    ref = _diffusers_loop(unet, sched, z_init)
    model = from_diffusers(unet, sched)
    out = _od_vp(model, sched.sigmas, z_init, sampler="ge")
    _close(ref, out)
    assert (ref - _diffusers_loop(unet, _ddim(prediction_type), z_init)).abs().max() > 1e-2


def test_ge_scheduler_stochastic_equals_od_sample(unet, z_init):
    sched = GradientEstimationScheduler(prediction_type="v_prediction", gamma=1.5, mu=0.3)
    ref = _diffusers_loop(unet, sched, z_init, generator=_gen(7))
    out = _od_vp(from_diffusers(unet, sched), sched.sigmas, z_init, sampler="gamma_mu",
                 gamma=1.5, mu=0.3, generator=_gen(7))
    _close(ref, out)
    assert (ref - _diffusers_loop(unet, sched, z_init, generator=_gen(8))).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_ge_scheduler_gamma1_equals_ddim_scheduler(unet, z_init, prediction_type):
    sched = GradientEstimationScheduler(prediction_type=prediction_type, gamma=1.0)
    ddim = _ddim(prediction_type)
    _close(_diffusers_loop(unet, sched, z_init), _diffusers_loop(unet, ddim, z_init))
    # step by step, pred_original_sample is DDIM's x0 estimate too (at σ ≈ 157 it is x − σ·ε in
    # float32, a cancellation: hence the looser tolerance)
    sched.set_timesteps(STEPS)
    ddim.set_timesteps(STEPS)
    z = z_init
    for t in ddim.timesteps:
        with torch.no_grad():
            out = unet(z, t).sample
        ours, ref = sched.step(out, t, z), ddim.step(out, t, z)
        _close(ours.prev_sample, ref.prev_sample)
        _close(ours.pred_original_sample, ref.pred_original_sample, rtol=1e-4)
        z = ref.prev_sample


@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction"))
def test_ge_scheduler_ddpm_point_equals_ddpm_scheduler(unet, z_init, prediction_type):
    # γ = 1, μ = ½ is DDPM's ancestral step exactly; DDPMScheduler ends at ᾱ = 1 (σ = 0) and draws
    # one noise per step (scaled by 1e-10 at the last), as the (γ, μ) loop does: same generator
    # stream, same samples.
    sched = GradientEstimationScheduler(prediction_type=prediction_type, gamma=1.0, mu=0.5,
                                        set_alpha_to_one=True)
    ddpm = diffusers.DDPMScheduler(timestep_spacing="trailing", clip_sample=False,
                                   prediction_type=prediction_type)
    ref = _diffusers_loop(unet, ddpm, z_init, generator=_gen(11))
    ours = _diffusers_loop(unet, sched, z_init, generator=_gen(11))
    assert sched.sigmas[-1] == 0
    _close(ours, ref, rtol=5e-5)
    _close(_od_vp(from_diffusers(unet, sched), sched.sigmas, z_init, sampler="ddpm",
                  generator=_gen(11)), ref, rtol=5e-5)


def test_ge_scheduler_in_a_diffusers_pipeline(unet):
    # DDPMPipeline draws the initial latent from the generator, then calls step(..., generator=…)
    sched = GradientEstimationScheduler(prediction_type="v_prediction")  # keeps z of size O(1)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=_gen(5), num_inference_steps=STEPS, output_type="np").images
    z = torch.randn(2, 1, 8, 8, generator=_gen(5))
    ref = (_od_vp(from_diffusers(unet, sched), sched.sigmas, z, sampler="ge") / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 8, 8, 1) and ((ref > 0) & (ref < 1)).float().mean() > 0.5
    _close(torch.from_numpy(images).permute(0, 3, 1, 2), ref, rtol=1e-4)


def test_ge_scheduler_history_and_errors(unet, z_init):
    sched = GradientEstimationScheduler()
    first = _diffusers_loop(unet, sched, z_init)
    # a second loop without set_timesteps restarts its ε history at the first timestep
    z = z_init
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t).sample, t, z).prev_sample
    torch.testing.assert_close(z, first)
    # a step that does not follow the previous one (img2img starting part-way) uses no stale ε
    t = sched.timesteps[3]
    out = torch.randn(3, 1, 8, 8, generator=_gen(9))
    fresh = GradientEstimationScheduler()
    fresh.set_timesteps(STEPS)
    torch.testing.assert_close(sched.step(out, t, z_init).prev_sample,
                               fresh.step(out, t, z_init).prev_sample)
    with pytest.raises(ValueError, match="timestep=5"):
        sched.step(out, 5, z_init)
    with pytest.raises(ValueError, match="set_timesteps"):
        GradientEstimationScheduler().step(out, 999, z_init)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(1001)
    for bad in (dict(mu=1.0), dict(gamma=0.0), dict(prediction_type="flow"),
                dict(beta_schedule="exotic"), dict(timestep_spacing="random")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GradientEstimationScheduler(**bad)


def test_ge_scheduler_config_round_trip_and_schedules(tmp_path):
    sched = GradientEstimationScheduler(gamma=2.4, mu=0.1, prediction_type="v_prediction")
    sched.save_pretrained(tmp_path)
    loaded = GradientEstimationScheduler.from_pretrained(tmp_path)
    assert (loaded.config.gamma, loaded.config.mu, loaded.config.prediction_type) == (
        2.4, 0.1, "v_prediction")
    # from_config of another scheduler keeps its β schedule, prediction type and spacing
    ldm = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, prediction_type="v_prediction",
                                  timestep_spacing="leading", steps_offset=1)
    ge = GradientEstimationScheduler.from_config(ldm.config)
    assert ge.config.prediction_type == "v_prediction" and ge.config.gamma == 2.0
    torch.testing.assert_close(ge.alphas_cumprod.float(), ldm.alphas_cumprod, rtol=1e-5, atol=0)
    for spacing in ("leading", "linspace", "trailing"):
        ge = GradientEstimationScheduler.from_config(ldm.config, timestep_spacing=spacing)
        ref = diffusers.DDIMScheduler.from_config(ldm.config, timestep_spacing=spacing)
        ge.set_timesteps(7)
        ref.set_timesteps(7)
        assert ge.timesteps.tolist() == ref.timesteps.tolist()
        assert len(ge.sigmas) == 8
    for name in ("squaredcos_cap_v2", "sigmoid"):
        ref = diffusers.DDPMScheduler(beta_schedule=name)
        torch.testing.assert_close(GradientEstimationScheduler(beta_schedule=name).alphas_cumprod
                                   .float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    betas = torch.linspace(1e-4, 0.05, 50)
    ge = GradientEstimationScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    torch.testing.assert_close(ge.alphas_cumprod, torch.cumprod(1 - betas.double(), 0))


def test_ge_scheduler_add_noise_and_velocity_equal_ddpm():
    ge, ddpm = GradientEstimationScheduler(), diffusers.DDPMScheduler()
    x0, noise = torch.randn(4, 1, 8, 8, generator=_gen(1)), torch.randn(4, 1, 8, 8, generator=_gen(2))
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ge.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ge.get_velocity(x0, noise, t), ddpm.get_velocity(x0, noise, t),
                               rtol=1e-5, atol=1e-5)


def test_ge_scheduler_add_noise_and_velocity_broadcast_one_timestep():
    # diffusers' img2img/inpainting pipelines pass one timestep for a batch: 0-d, an int, or (1,)
    ge, ddpm = GradientEstimationScheduler(), diffusers.DDPMScheduler()
    x0, noise = torch.randn(4, 1, 8, 8, generator=_gen(1)), torch.randn(4, 1, 8, 8, generator=_gen(2))
    for t in (torch.tensor(500), 500, torch.tensor([500]), torch.tensor([500.0]),
              torch.full((4,), 500)):
        torch.testing.assert_close(ge.add_noise(x0, noise, t),
                                   ddpm.add_noise(x0, noise, torch.full((4,), 500)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ge.get_velocity(x0, noise, t),
                                   ddpm.get_velocity(x0, noise, torch.full((4,), 500)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"one per sample \(4\), got shape \(3,\)"):
        ge.add_noise(x0, noise, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"timesteps must be training indices in \[0, 1000\)"):
        ge.get_velocity(x0, noise, 1000)


@pytest.mark.parametrize("beta", [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012}])
def test_ge_scheduler_log_linear_grid_closed_form(beta):
    # the authors' grid: target σ_i = σ_max·(σ(⌊T/N⌋)/σ_max)^{i/(N−1)}, i = 0 … N−1, each taken
    # up to the first training σ ≥ it; then σ(0) (or 0 with set_alpha_to_one)
    for steps in (1, 2, 4, 10, 50):
        ge = GradientEstimationScheduler(timestep_spacing="log_linear", **beta)
        ts = ge.train_sigmas
        ge.set_timesteps(steps)
        t = ge.timesteps.tolist()
        assert len(t) == steps and t[0] == 999 and ge.sigmas[-1] == ts[0]
        if steps == 1:
            continue
        assert t[-1] == 1000 // steps
        for i, ti in enumerate(t[1:-1], start=1):
            target = ts[-1] * (ts[1000 // steps] / ts[-1]) ** (i / (steps - 1))
            assert ts[ti - 1] < target <= ts[ti], (steps, i, ti)
        torch.testing.assert_close(ge.sigmas[:-1], ts[t])
    ge = GradientEstimationScheduler(timestep_spacing="log_linear", set_alpha_to_one=True, **beta)
    ge.set_timesteps(10)
    assert ge.sigmas[-1] == 0 and len(ge.sigmas) == 11
    # the grid is geometric up to the rounding to training timesteps: log σ steps nearly equal
    d = ge.sigmas[:-1].log().diff()
    assert (d.max() - d.min()) < 0.3 * d.abs().mean()
    with pytest.raises(ValueError, match="use fewer steps"):
        ge.set_timesteps(200)


def test_ge_scheduler_set_timesteps_options_and_step_index(unet, z_init):
    ge = GradientEstimationScheduler()
    ge.set_timesteps(timesteps=[900, 500, 100])
    assert ge.timesteps.tolist() == [900, 500, 100] and ge.num_inference_steps == 3
    torch.testing.assert_close(ge.sigmas, torch.cat([ge.train_sigmas[[900, 500, 100]],
                                                     ge.train_sigmas[:1]]))
    # sigmas=: the network's timestep is the training σ nearest in log σ
    ge.set_timesteps(sigmas=[50.0, 2.0, 0.1, 0.0])
    assert ge.sigmas.tolist() == [50.0, 2.0, 0.1, 0.0]
    for t, s in zip(ge.timesteps.tolist(), [50.0, 2.0, 0.1]):
        logs = ge.train_sigmas.log()
        assert (logs[t] - torch.tensor(s).log()).abs() <= (logs - torch.tensor(s).log()).abs().min()
    assert ge.step_index is None and ge.begin_index is None
    ge.set_begin_index(1)
    with torch.no_grad():
        for t in ge.timesteps[1:]:
            ge.step(unet(z_init, t).sample, t, z_init)
            assert ge.step_index == ge._index(t) + 1
    assert ge.begin_index == 1 and ge.step_index == 3
    for bad, match in (({}, "exactly one"), ({"num_inference_steps": 3, "timesteps": [5]},
                                                 "exactly one"),
                       ({"timesteps": [100, 500]}, "strictly decreasing"),
                       ({"timesteps": [1000, 5]}, r"\[0, 1000\)"),
                       ({"sigmas": [1.0, 2.0]}, "strictly decreasing VE"),
                       ({"sigmas": [5.0]}, "N \\+ 1 >= 2"),
                       ({"sigmas": [100.0, 99.9, 0.0]}, "two σ's map to one"),
                       ({"num_inference_steps": 0}, "num_inference_steps")):
        with pytest.raises(ValueError, match=match):
            ge.set_timesteps(**bad)
    with pytest.raises(ValueError, match="begin_index"):
        ge.set_begin_index(7)


def test_gamma_mu_step_is_the_samplers_step():
    # od.sample's (γ, μ) loop, one step at a time through gamma_mu_step, on a plain function model
    def model(x, sigma, cond=None):
        return torch.tanh(x) + 0.1 * sigma

    sigmas = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.05])
    x0 = torch.randn(4, 3, generator=_gen(0)) * 8
    ref = od.sample(model, sigmas, x_init=x0, gamma=2.2, mu=0.4, generator=_gen(3))
    x, eps_prev, g = x0, None, _gen(3)
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        eps = model(x, torch.tensor(s))
        x = gamma_mu_step(x, s, s_next, eps, eps_prev, 2.2, 0.4, torch.randn(x.shape, generator=g))
        eps_prev = eps
    torch.testing.assert_close(x, ref)


# ------------------------------------------------------------------------------ guidance

def test_lookahead_guidance_through_a_diffusers_unet(unet, z_init):
    guidance = pytest.importorskip("optidiff.guidance")
    sched = GradientEstimationScheduler()
    sched.set_timesteps(STEPS)
    model = from_diffusers(unet, sched)
    sigmas = sched.sigmas  # γ = 2 GE on the trailing grid, as the scheduler would run it
    g = torch.zeros(1, 8, 8)
    g[0, 2:6, 2:6] = 0.25  # a unit-norm direction

    def final_x(**kwargs):  # VE sample at σ_min
        return _od_vp(model, sigmas, z_init, sampler="ge", **kwargs) / vp_scale(sigmas[-1].float())

    plain = final_x()
    y = (plain * g).flatten(1).sum(1) + 5.0  # ask for gᵀx0 five units above the unguided sample
    guided = final_x(guidance=guidance.LookAhead(g, y))
    gain = ((guided - plain) * g).flatten(1).sum(1)
    assert ((gain - 5.0).abs() < 0.5).all(), gain
    # the guidance backpropagated through the UNet: with x0_hat held constant (J = I) the
    # samples differ
    const = final_x(guidance=guidance.LookAhead(g, y, grad_through_model=False))
    assert (const - guided).abs().max() > 0.1


# ------------------------------------------------------------------------------ laziness

def test_import_optidiff_does_not_import_diffusers():
    code = ("import sys, optidiff, optidiff.models, optidiff.models.unet, optidiff.sampling; "
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
