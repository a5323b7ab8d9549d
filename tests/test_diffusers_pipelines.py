"""GradientEstimationScheduler inside diffusers' Stable Diffusion pipelines (text-to-image,
image-to-image, inpainting), and guidance through the VAE decoder of such a pipeline.

Every component is tiny and randomly initialised here (UNet2DConditionModel, AutoencoderKL, a CLIP
text model and a tokenizer written from a 50-token vocabulary to tmp_path): nothing is downloaded.
Latents are 4×8×8, images 3×16×16.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import optidiff as od
from optidiff.models.diffusers import (
    GradientEstimationScheduler,
    PromptModel,
    from_diffusers,
    from_latent_pipeline,
)
from optidiff.schedules import vp_scale

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red cat"
#: Stable Diffusion's scheduler config (scaled-linear β, leading spacing with offset 1), no clipping
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False,
                 "clip_sample": False}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokenizer(tmp):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"),
                                      model_max_length=16)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    tok = _tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tok.get_vocab()),
        max_position_embeddings=16)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, sample_size=16).eval()
    return {"vae": vae, "text_encoder": text, "tokenizer": tok, "unet": unet, "safety_checker": None,
                "feature_extractor": None, "requires_safety_checker": False}


def _pipe(cls, components, scheduler):
    pipe = cls(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    """The pipeline's final latents (output_type="latent"), seed 0, 2 images of 16×16."""
    kwargs = {"num_inference_steps": 4, "num_images_per_prompt": 2, "guidance_scale": 3.0,
              **kwargs}
    return pipe(PROMPT, generator=_gen(0), output_type="latent", **kwargs).images


def _close(a, b, rtol=2e-5):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"max error {err:.3g} for values of size {scale:.3g}"


def _image(seed: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=_gen(seed))


# ------------------------------------------------------------------------------ item 5: pipelines

@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_gamma1_equals_ddim_in_text_to_image(components, spacing):
    ddim = diffusers.DDIMScheduler(**{**SD_CONFIG, "timestep_spacing": spacing})
    ref = _run(_pipe(diffusers.StableDiffusionPipeline, components, ddim))
    ge = GradientEstimationScheduler.from_config(ddim.config, gamma=1.0)
    pipe = _pipe(diffusers.StableDiffusionPipeline, components, ge)
    _close(_run(pipe), ref)
    assert ref.shape == (2, 4, 8, 8) and ref.std() > 0.1
    # and images: the decoded output of both is the same picture
    images = pipe(PROMPT, generator=_gen(0), num_inference_steps=4, output_type="pt").images
    assert images.shape == (1, 3, 16, 16)
    # γ = 2 (the paper's sampler) is another sampler: different latents
    pipe.scheduler = GradientEstimationScheduler.from_config(ddim.config)
    assert (_run(pipe) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_gamma1_equals_ddim_in_image_to_image(components, strength):
    # img2img: add_noise(latents, noise, timesteps[:1].repeat(B)), then timesteps[t_start:] with
    # set_begin_index(t_start) where the scheduler has it
    ddim = diffusers.DDIMScheduler(**SD_CONFIG)
    kwargs = {"image": _image(1), "strength": strength, "num_images_per_prompt": 1,
                  "prompt": [PROMPT] * 2}
    ref = _pipe(diffusers.StableDiffusionImg2ImgPipeline, components, ddim)(
        generator=_gen(0), output_type="latent", num_inference_steps=4, guidance_scale=3.0,
        **kwargs).images
    ge = GradientEstimationScheduler.from_config(ddim.config, gamma=1.0)
    pipe = _pipe(diffusers.StableDiffusionImg2ImgPipeline, components, ge)
    out = pipe(generator=_gen(0), output_type="latent", num_inference_steps=4, guidance_scale=3.0,
               **kwargs).images
    _close(out, ref)
    start = 4 - int(4 * strength)
    assert ge.begin_index == start and ge.step_index == 4
    assert ge.timesteps.tolist() == ddim.timesteps.tolist()


def test_gamma1_equals_ddim_in_inpainting(components):
    # a 4-channel UNet: the inpainting pipeline blends re-noised image latents into the unmasked
    # region after every step with add_noise(latents, noise, tensor([t])), one timestep for the batch
    ddim = diffusers.DDIMScheduler(**SD_CONFIG)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1.0
    kwargs = {"image": _image(2), "mask_image": mask, "num_images_per_prompt": 1, "prompt": [PROMPT] * 2,
                  "height": 16, "width": 16, "num_inference_steps": 4, "guidance_scale": 3.0,
                  "output_type": "latent"}
    for strength in (1.0, 0.5):
        ref = _pipe(diffusers.StableDiffusionInpaintPipeline, components, ddim)(
            generator=_gen(0), strength=strength, **kwargs).images
        ge = GradientEstimationScheduler.from_config(ddim.config, gamma=1.0)
        out = _pipe(diffusers.StableDiffusionInpaintPipeline, components, ge)(
            generator=_gen(0), strength=strength, **kwargs).images
        _close(out, ref)
        assert ref.std() > 0.1


def test_custom_timesteps_and_sigmas_in_a_pipeline(components):
    unet, ge = components["unet"], GradientEstimationScheduler(**{
        k: v for k, v in SD_CONFIG.items() if k != "clip_sample"})
    pipe = _pipe(diffusers.StableDiffusionPipeline, components, ge)
    spaced = _run(pipe)
    ts, sig = ge.timesteps.tolist(), ge.sigmas.clone()
    _close(_run(pipe, num_inference_steps=None, timesteps=ts), spaced, rtol=1e-6)
    _close(_run(pipe, num_inference_steps=None, sigmas=sig.tolist()), spaced, rtol=1e-6)
    # σ's off the training grid: the network runs at the nearest timestep, the step uses the
    # σ's as given, which is what od.sample does with from_diffusers(unet, scheduler)
    sigmas = torch.tensor([14.0, 5.0, 1.5, 0.4, 0.0], dtype=torch.float64)
    out = _run(pipe, num_inference_steps=None, sigmas=sigmas.tolist(), guidance_scale=1.0)
    assert ge.sigmas.tolist() == sigmas.tolist() and len(ge.timesteps) == 4
    emb = pipe.encode_prompt(PROMPT, "cpu", 2, False)[0]
    z = torch.randn(2, 4, 8, 8, generator=_gen(0))  # the pipeline's initial latents
    x = od.sample(from_diffusers(unet, ge), sigmas.float(), x_init=z / vp_scale(sigmas[0].float()),
                  sampler="ge", cond=emb)
    _close(out, x, rtol=1e-4)  # final σ = 0: the VP latent is the VE sample


def test_pipeline_save_and_load_keeps_the_scheduler(components, tmp_path):
    ge = GradientEstimationScheduler.from_config(diffusers.DDIMScheduler(**SD_CONFIG).config,
                                                 gamma=2.5, mu=0.2, timestep_spacing="log_linear")
    pipe = _pipe(diffusers.StableDiffusionPipeline, components, ge)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, GradientEstimationScheduler)
    public = [{k: v for k, v in c.items() if not k.startswith("_")}
              for c in (loaded.scheduler.config, ge.config)]
    assert public[0] == public[1] and public[0]["gamma"] == 2.5
    _close(_run(loaded), _run(pipe), rtol=1e-6)


# ------------------------------------------------------------------------------ item 6: latents

def _bright(images: torch.Tensor) -> torch.Tensor:
    """Mean brightness of the top-left quarter of images in [0, 1]: a pixel-space reward."""
    return images[:, :, :8, :8].mean((1, 2, 3))


@pytest.fixture(scope="module")
def sd(components):
    return _pipe(diffusers.StableDiffusionPipeline, components,
                 diffusers.DDIMScheduler(**{**SD_CONFIG, "timestep_spacing": "trailing"}))


def test_latent_model_is_the_pipeline_with_classifier_free_guidance(sd):
    # od.sample with DDIM on the adapter's model = the pipeline's own loop (DDIMScheduler, CFG
    # batching, its text encoder): same initial latents, same final latents
    ref = _run(sd)
    ld = from_latent_pipeline(sd, PROMPT, guidance_scale=3.0)
    sigmas = ld.sigmas(4)
    assert ld.scheduler.timesteps.tolist() == sd.scheduler.timesteps.tolist()
    z = torch.randn(2, 4, 8, 8, generator=_gen(0))
    x = od.sample(ld.model, sigmas, x_init=z / vp_scale(sigmas[0]), sampler="ddim")
    _close(x * vp_scale(sigmas[-1]), ref)
    # the decoder is the pipeline's decoding (before its clamp to [0, 1])
    images = sd(PROMPT, generator=_gen(0), num_inference_steps=4, num_images_per_prompt=2,
                guidance_scale=3.0, output_type="pt").images
    _close(ld.decode(ref).clamp(0, 1), images, rtol=1e-5)
    # guidance_scale 1: the conditional model alone
    plain = from_latent_pipeline(sd, PROMPT).model
    emb = sd.encode_prompt(PROMPT, "cpu", 1, False)[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(z, torch.tensor(3.0)),
                                   from_diffusers(sd.unet, sd.scheduler)(z, torch.tensor(3.0),
                                                                         emb.expand(2, -1, -1)))


def test_decoder_chunks_and_checkpointing(sd):
    ld = from_latent_pipeline(sd, PROMPT)
    z = torch.randn(3, 4, 8, 8, generator=_gen(3))
    lean = from_latent_pipeline(sd, PROMPT, decoder_chunk_size=1, decoder_checkpoint=True).decoder

    def grad_and_saved(decoder):
        saved = []
        zg = z.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = _bright(decoder(zg)).sum()
        (g,) = torch.autograd.grad(loss, zg)
        return g, sum(saved)

    (g_full, mem_full), (g_lean, mem_lean) = grad_and_saved(ld.decoder), grad_and_saved(lean)
    torch.testing.assert_close(g_lean, g_full, rtol=1e-5, atol=1e-8)
    assert g_full.abs().max() > 0
    # checkpointing keeps the chunk inputs for the backward pass, not the decoder's activations
    assert mem_lean < 0.1 * mem_full, (mem_lean, mem_full)
    with torch.no_grad():
        torch.testing.assert_close(lean(z), ld.decode(z), rtol=1e-5, atol=1e-6)
        # the VAE runs in its dtype (float32 here), the images come back in the latents' dtype
        out64 = ld.decode(z.double())
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), ld.decode(z))
    with pytest.raises(ValueError, match="chunk_size"):
        from_latent_pipeline(sd, PROMPT, decoder_chunk_size=0)
    with pytest.raises(TypeError, match="encode_prompt"):
        from_latent_pipeline(diffusers.DDPMPipeline(unet=sd.unet, scheduler=sd.scheduler))
    with pytest.raises(TypeError, match="one string"):
        from_latent_pipeline(sd, [PROMPT, PROMPT])
    with pytest.raises(ValueError, match="negative_embeds"):
        PromptModel(ld.model.model, ld.model.prompt_embeds, guidance_scale=2.0)


def test_gradient_through_unet_and_decoder_matches_finite_differences(components):
    # float64 copies: F(z) = f(decode(x0_hat(z))) with x0_hat(z) = z − σ·ε̂(z) (CFG w = 2)
    import copy

    comp = {k: (copy.deepcopy(v).double() if isinstance(v, torch.nn.Module) else v)
            for k, v in components.items()}
    pipe = _pipe(diffusers.StableDiffusionPipeline, comp, diffusers.DDIMScheduler(**SD_CONFIG))
    ld = from_latent_pipeline(pipe, PROMPT, guidance_scale=2.0)
    sigma = torch.tensor(1.5, dtype=torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=_gen(4), dtype=torch.float64)
    reward = ld.reward(_bright)

    def F(x):
        return reward(x - sigma * ld.model(x, sigma))

    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F(zg).sum(), zg)
    with torch.no_grad():
        for seed in range(3):
            v = torch.randn(z.shape, generator=_gen(10 + seed), dtype=torch.float64)
            h = 1e-4
            fd = (F(z + h * v) - F(z - h * v)) / (2 * h)
            torch.testing.assert_close((grad * v).flatten(1).sum(1), fd, rtol=1e-6, atol=1e-10)
    # the guidance terms take the same gradient: RewardGuidance's correction is s·∇F
    from optidiff.guidance import DPS, RewardGuidance
    G = RewardGuidance(reward, grad_through_model=True).eps_and_correction(ld.model, z, sigma)[1]
    torch.testing.assert_close(G, grad)
    # and DPS with the decoded measurement: G = −∇½‖y − A(decode(x0_hat))‖²
    y = torch.full((1,), 0.9, dtype=torch.float64)  # a measurement of shape (m,) = (1,)
    G = DPS(lambda x0: reward(x0)[:, None], y, normalize=False).eps_and_correction(
        ld.model, z, sigma)[1]
    with torch.no_grad():
        r = y - F(z)
    torch.testing.assert_close(G, grad * r.view(-1, 1, 1, 1))
    # the decoded objective's gradient for Algorithm 1: J_decodeᵀ∇f
    obj = ld.objective(_bright)
    zg = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(_bright(ld.decode(zg)).sum(), zg)
    torch.testing.assert_close(obj.grad(z), gz)
    assert obj.grad_queries == 2 and obj.name == "_bright∘decode"
    # a black-box image reward (gradient oracle on images) is chained through the decoder
    oracle = od.optimize.Objective(_bright, grad=lambda im: torch.autograd.functional.vjp(
        _bright, im, torch.ones(len(im), dtype=im.dtype))[1])
    torch.testing.assert_close(ld.objective(oracle).grad(z), gz)


def _alg1(ld, guidance):
    return od.optimize.gradient_guided(
        ld.model, ld.objective(_bright), ld.sigmas(4), rounds=3, batch_size=4, increment=0.02,
        noise_std=1e-3, guidance=guidance, sampler="ddim", seed=0, progress=False)


def test_algorithm1_raises_a_decoded_reward(sd):
    # Algorithm 1 with look-ahead guidance toward the brightness of the decoded images; the
    # control runs the same loop and seeds unguided (the same initial noise every round)
    ld = from_latent_pipeline(sd, PROMPT, guidance_scale=3.0)
    guided, plain = _alg1(ld, "lookahead"), _alg1(ld, lambda g, y: None)
    rg, rp = guided.curve("reward_mean"), plain.curve("reward_mean")
    assert rg[0] == rp[0]
    base = rg[0]
    assert all(r > base + 0.004 for r in rg[1:]), rg
    assert all(abs(r - base) < 0.004 for r in rp[1:]), rp
    # paired: every last-round sample is brighter than its unguided twin
    assert (guided.rewards > plain.rewards).all(), (guided.rewards, plain.rewards)
    assert guided.objective.grad_queries == 3 * 4


def test_algorithm2_finetunes_the_unet_on_latents(components):
    # Algorithm 2 on copies (it fine-tunes the UNet): the DSM steps move the UNet's weights, and the
    # guided rounds beat the same loop run unguided (same seeds, same fine-tuning steps)
    import copy

    def run(guidance):
        comp = {k: (copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v)
                for k, v in components.items()}
        pipe = _pipe(diffusers.StableDiffusionPipeline, comp, diffusers.DDIMScheduler(
            **{**SD_CONFIG, "timestep_spacing": "trailing"}))
        ld = from_latent_pipeline(pipe, PROMPT, guidance_scale=3.0)
        before = [p.detach().clone() for p in pipe.unet.parameters()]
        # one gentle step per round on the newest round with Lemma 1's β: the network defaults
        # (4 Adam steps of 1e-3 over every round, the bounded β) are tuned on the subspace task
        res = od.optimize.adaptive(ld.model, ld.objective(_bright), ld.sigmas(4), rounds=3,
                                   batch_size=4, increment=0.02, noise_std=1e-3, lr=1e-4,
                                   steps_per_round=1, optimizer="adamw", replay_decay=0.0,
                                   beta="lemma1",
                                   guidance=guidance, sampler="ddim", seed=0, progress=False)
        moved = max((p - q).abs().max().item() for p, q in zip(pipe.unet.parameters(), before))
        return res, moved

    (guided, moved), (plain, _) = run("lookahead"), run(lambda g, y: None)
    assert moved > 1e-5
    assert all(torch.isfinite(torch.tensor(v)) for v in guided.curve("finetune_loss")[1:])
    rg, rp = guided.curve("reward_mean"), plain.curve("reward_mean")
    assert rg[0] == rp[0]
    assert sum(rg[1:]) / 3 > sum(rp[1:]) / 3 + 0.003, (rg, rp)


def test_readme_stable_diffusion_example_runs(components, monkeypatch):
    """The README's Stable Diffusion block on the tiny pipeline (one round, few steps) instead of
    weights from a local directory."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [b.split("\n", 1)[1] for b in text.split("```")[1::2]
               if b.startswith("python\n") and "from_latent_pipeline" in b]
    tiny = _pipe(diffusers.StableDiffusionPipeline, components, diffusers.DDIMScheduler(**SD_CONFIG))
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, path: tiny))
    code = re.sub(r"rounds=\d+", "rounds=1", code.replace("ld.sigmas(50)", "ld.sigmas(4)"))
    code = code.replace("num_inference_steps=10", "num_inference_steps=4")
    ns: dict = {}
    exec("import torch, optidiff as od\n" + code, ns)
    assert ns["images"].shape == (4, 3, 16, 16) and torch.isfinite(ns["images"]).all()
    assert len(ns["res"].history) == 2
