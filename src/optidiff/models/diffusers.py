"""Adapters between optidiff and diffusers (the optional extra ``pip install 'optidiff[diffusers]'``).

- :func:`from_diffusers` turns a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` and its
  scheduler into an optidiff model ``model(x, sigma, cond) -> eps`` (a :class:`~optidiff.models.VPModel`),
  so every optidiff sampler and guidance runs on it.
- :class:`GradientEstimationScheduler` is the (γ, μ) sampler family of Permenter & Yuan (ICML 2024) as a diffusers
  scheduler, so every diffusers pipeline can sample with GE (or DDIM, or DDPM, or anything between).
- :func:`from_latent_pipeline` turns a latent diffusion pipeline (Stable Diffusion) into an optidiff
  model over latents, conditioned on a prompt, with its VAE decoder (:class:`LatentDiffusion`), so
  that guidance and Algorithms 1 and 2 take objectives on decoded images.

Import it explicitly (``from optidiff.models.diffusers import from_diffusers``): ``import optidiff``
never imports diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

try:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("optidiff.models.diffusers needs the optional dependency diffusers: "
                      "pip install 'optidiff[diffusers]'") from err

from ..guidance import ClassifierFree
from ..optimize.objectives import Objective
from ..sampling import check_gamma_mu, gamma_mu_step
from ..schedules import (
    CosineSchedule,
    DDPMSchedule,
    LDMSchedule,
    SigmoidSchedule,
    sigmas_from_betas,
    trailing_indices,
    vp_scale,
)
from .base import (
    VPModel,
    check_prediction_type,
    nearest_timestep,
    sigma_like,
    vp_output_to_eps,
)
from .latent import LatentDecoder, decoded_objective

__all__ = [
    "DiffusersNet",
    "GradientEstimationScheduler",
    "GradientEstimationSchedulerOutput",
    "LatentDiffusion",
    "PromptModel",
    "from_diffusers",
    "from_latent_pipeline",
]


# ------------------------------------------------------------------------------------------------
# diffusers UNet -> optidiff model


class DiffusersNet(nn.Module):
    """``net(z, t, cond=None) -> unet(z, t, **{cond_key: cond}).sample``: the VP network that
    :class:`~optidiff.models.VPModel` wraps.

    ``null_cond`` stands in for "no condition": it is used when ``cond`` is None (an empty-prompt
    embedding of shape ``(L, D)`` or ``(1, L, D)`` for a cross-attention UNet, or a class index for a
    class-conditional UNet2DModel) and, for class labels, replaces the labels < 0 (optidiff's null
    class −1). Without it, ``cond=None`` calls a UNet2DModel with no condition at all, a cross-attention
    UNet raises, and so does a label −1.
    """

    def __init__(self, unet: nn.Module, cond_key: str, null_cond: Any = None):
        super().__init__()
        self.unet, self.cond_key, self.null_cond = unet, cond_key, null_cond

    def forward(self, z: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self.cond_key == "class_labels":
            cond = self._labels(cond, len(z), z.device)
        elif cond is None and self.null_cond is not None:
            null = torch.as_tensor(self.null_cond, device=z.device, dtype=z.dtype)
            cond = null.expand(len(z), *null.shape[-2:])
        if cond is None:
            if self.cond_key == "encoder_hidden_states":
                raise ValueError("a UNet2DConditionModel needs cond (encoder_hidden_states of shape "
                                 "(B, L, cross_attention_dim)) or a null_cond for cond=None")
            return self.unet(z, t).sample
        return self.unet(z, t, **{self.cond_key: cond}).sample

    def _labels(self, cond: Any, n: int, device: torch.device) -> Tensor | None:
        if cond is None:
            return None if self.null_cond is None else torch.full((n,), int(self.null_cond),
                                                                  device=device)
        cond = torch.as_tensor(cond, device=device).long()
        if (cond < 0).any():
            if self.null_cond is None:
                raise ValueError("class label -1 (the null class) needs null_cond= (the index of "
                                 "the null class the UNet was trained with)")
            cond = torch.where(cond < 0, int(self.null_cond), cond)
        return cond


def from_diffusers(unet: nn.Module, scheduler_or_config: Any,
                   input_shape: tuple[int, ...] | None = None, *, cond_key: str | None = None,
                   null_cond: Any = None) -> VPModel:
    """Wrap a diffusers UNet as an optidiff model ``model(x, sigma, cond=None) -> eps``.

    The network sees ``z = x/√(1+σ²)`` at the training timestep nearest to σ and its output is
    turned into ε by the scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or
    ``sample``; see :class:`~optidiff.models.VPModel`).

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel`` (any module whose call
            ``unet(z, t, **kwargs)`` returns an object with ``.sample``).
        scheduler_or_config: a diffusers scheduler (its ``alphas_cumprod`` and ``config``) or a
            scheduler config mapping (its β schedule is rebuilt with ``DDPMScheduler.from_config``).
        input_shape: shape of one sample; default ``(in_channels, sample_size, sample_size)`` from
            ``unet.config``.
        cond_key: how ``cond`` reaches the UNet: ``"encoder_hidden_states"`` (the default for a
            ``UNet2DConditionModel``: text or other embeddings, ``(B, L, D)``) or ``"class_labels"``
            (the default otherwise: class-conditional ``UNet2DModel``, ``num_class_embeds`` set).
        null_cond: the "no condition" input (see :class:`DiffusersNet`); diffusers class
            embeddings have no null class, so classifier-free guidance with label −1 needs a model
            trained with an extra null index given here.
    """
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler_or_config must be a diffusers scheduler or a config mapping, "
                        f"got {type(scheduler_or_config).__name__}")
    abar = getattr(scheduler_or_config, "alphas_cumprod", None)
    if abar is None:
        abar = DDPMScheduler.from_config(dict(config)).alphas_cumprod
    if input_shape is None:
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        input_shape = (unet.config.in_channels, *size)
    if cond_key is None:
        cond_key = ("encoder_hidden_states" if isinstance(unet, UNet2DConditionModel)
                    else "class_labels")
    return VPModel(DiffusersNet(unet, cond_key, null_cond), abar,
                   prediction_type=config.get("prediction_type", "epsilon"),
                   input_shape=tuple(input_shape))


# ------------------------------------------------------------------------------------------------
# the (γ, μ) family as a diffusers scheduler


@dataclass
class GradientEstimationSchedulerOutput(BaseOutput):
    """``prev_sample``: the VP latent at the next timestep; ``pred_original_sample``: Tweedie's
    x0_hat = x − σ·ε from this step's (raw) model output."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


_BETA_SCHEDULES = {"linear": DDPMSchedule, "scaled_linear": LDMSchedule,
                   "squaredcos_cap_v2": CosineSchedule, "sigmoid": SigmoidSchedule}
_SPACINGS = ("trailing", "leading", "linspace", "log_linear")


class GradientEstimationScheduler(SchedulerMixin, ConfigMixin):
    """The (γ, μ) sampler family of Permenter & Yuan, ICML 2024 as a diffusers scheduler.

    Drop it into any diffusers pipeline (``pipe.scheduler =
    GradientEstimationScheduler.from_config(pipe.scheduler.config)``): latents stay in VP
    coordinates z as with DDIM (``init_noise_sigma = 1``, ``scale_model_input`` is the identity,
    ``add_noise`` is the VP forward process, so img2img works), and each :meth:`step`

    1. converts to VE, ``x = z/√ᾱ_t`` (σ_t² = (1 − ᾱ_t)/ᾱ_t);
    2. turns the model output into ε by ``prediction_type`` with a = √ᾱ_t, s = √(1 − ᾱ_t):
       ``epsilon`` as is, ``v_prediction`` ε = a·v + s·z, ``sample`` ε = (z − a·x0)/s;
    3. applies :func:`gamma_mu_step` with the previous step's raw ε (σ_t → σ_{t−1}, the next
       timestep in ``timesteps``; after the last one ᾱ = 1, σ = 0 if ``set_alpha_to_one`` else
       ᾱ_0, σ_min, as DDIM);
    4. converts back, ``z_{t−1} = √ᾱ_{t−1}·x_{t−1}``.

    γ = 1, μ = 0 is DDIM (``DDIMScheduler``, η = 0, when ``num_inference_steps`` divides
    ``num_train_timesteps``: DDIM steps to ``t − n//steps``, which otherwise is not the next entry of
    its own trailing grid, whereas this scheduler, like ``DDPMScheduler``, always steps to the next
    entry); γ = 1, μ = ½ is DDPM exactly (with
    ``set_alpha_to_one=True``, ``DDPMScheduler``'s ancestral step with the same noise); γ = 2, μ = 0
    is the paper's gradient-estimation sampler (the default). ``sigmas`` holds the VE grid of the
    current ``timesteps`` plus the final σ: ``od.sample(model, scheduler.sigmas, gamma=…, mu=…)``
    with ``model = from_diffusers(unet, scheduler)`` computes the same samples.

    The ε history is reset by :meth:`set_timesteps` and whenever a step does not follow the
    previous one (a new loop, or img2img starting part-way), so a stale ε is never reused.

    What diffusers' pipelines rely on behaves as in diffusers' own schedulers (tested inside
    ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` and
    ``StableDiffusionInpaintPipeline``, where γ = 1 reproduces ``DDIMScheduler``): ``add_noise`` and
    ``get_velocity`` take one timestep for the whole batch (0-d or shape (1,)) or one per sample;
    ``set_timesteps`` takes ``num_inference_steps``, ``device``, custom ``timesteps=`` (as
    ``DDPMScheduler``) or ``sigmas=`` (as ``EulerDiscreteScheduler``); ``strength`` schedules run
    ``timesteps[t_start:]`` after ``set_begin_index(t_start)``; ``order``, ``init_noise_sigma``,
    ``scale_model_input``, ``begin_index``, ``step_index``; ``save_pretrained``/``from_pretrained``
    (also of a whole pipeline: ``model_index.json`` names ``optidiff.models.diffusers``).

    Compared with the authors' ``GEScheduler`` (ToyotaResearchInstitute/gradient-estimation-sampler):
    that one accepts ``prediction_type="epsilon"`` only (it raises for ``v_prediction`` and
    ``sample``), has no μ (deterministic GE only), and keeps VE latents (``init_noise_sigma =
    1/√ᾱ_{t_N}``, ``scale_model_input`` multiplies by √ᾱ) with its own σ-based spacings; this one
    takes all three prediction types, the whole (γ, μ) family, diffusers' ``timestep_spacing`` and
    VP latents. It has no x0 clipping or thresholding.

    Args (the config, saved by ``save_pretrained``):
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training β
            schedule (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``), as diffusers.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        gamma: γ > 0 (2 is GE, 1 is DDIM/DDPM).
        mu: μ in [0, 1) (0 deterministic, ½ DDPM).
        set_alpha_to_one: end at σ = 0 (ᾱ = 1) instead of σ_min.
        timestep_spacing: ``trailing`` (default; Lin et al. 2023), ``leading``, ``linspace`` or
            ``log_linear`` (the authors' grid, see :meth:`set_timesteps`).
        steps_offset: added to ``leading`` timesteps, as diffusers.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Any = None, prediction_type: str = "epsilon",
                 gamma: float = 2.0, mu: float = 0.0, set_alpha_to_one: bool = False,
                 timestep_spacing: str = "trailing", steps_offset: int = 0):
        check_prediction_type(prediction_type)
        check_gamma_mu(gamma, mu)
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        if trained_betas is not None:
            self.betas = torch.as_tensor(trained_betas, dtype=torch.float64)
        elif beta_schedule in _BETA_SCHEDULES:
            kwargs = {} if beta_schedule == "squaredcos_cap_v2" else dict(beta_start=beta_start,
                                                                          beta_end=beta_end)
            self.betas = _BETA_SCHEDULES[beta_schedule](n=num_train_timesteps, **kwargs).betas
        else:
            raise ValueError(f"beta_schedule must be one of {list(_BETA_SCHEDULES)}, got "
                             f"{beta_schedule!r}")
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64
        self.train_sigmas = sigmas_from_betas(self.betas)             # VE σ of each timestep
        self.final_sigma = self.train_sigmas.new_zeros(()) if set_alpha_to_one else self.train_sigmas[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.sigmas: Tensor | None = None  # set by set_timesteps
        self._eps_prev: Tensor | None = None
        self._prev_index: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity: the network takes VP latents as they are."""
        return sample

    @property
    def step_index(self) -> int | None:
        """Index in ``timesteps`` of the next step (None before the first step), as diffusers'
        schedulers."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first index of a partial schedule, set by :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start part-way (img2img/inpainting ``strength``: the pipelines call it with
        ``t_start·order`` and loop over ``timesteps[t_start·order:]``). :meth:`step` finds each
        timestep's index by value, so this only records the start; the ε history starts empty
        there."""
        n = len(self.timesteps)
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or not 0 <= begin_index < n:
            raise ValueError(f"begin_index must be an int in [0, {n}), got {begin_index!r}")
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None, timesteps: Any = None,
                      sigmas: Any = None) -> None:
        """Choose the timesteps and reset the ε history (give exactly one of the three).

        Args:
            num_inference_steps: N steps spaced by ``timestep_spacing``.
            device: where ``timesteps`` live.
            timesteps: custom decreasing training indices (N of them), as ``DDPMScheduler``.
            sigmas: custom decreasing VE σ's, N + 1 of them (the last is the final σ, may be 0),
                as ``EulerDiscreteScheduler``; each of the first N runs the network at the training
                timestep nearest in log σ (as :func:`from_diffusers`), the step uses the σ's as
                given.

        Sets ``timesteps`` (decreasing training indices) and ``sigmas`` (their VE σ's, float64,
        plus the final σ: one more entry than ``timesteps``). When the last timestep is 0
        (``leading``/``linspace`` spacing, or as many steps as training timesteps) and
        ``set_alpha_to_one`` is False, the final σ repeats σ_min and the last step is a no-op, as
        in ``DDIMScheduler``; drop it (``sigmas[:-1]``) before handing the grid to ``od.sample``.

        ``log_linear`` is the default grid of the authors' ``GEScheduler`` (style ``"Linear"``,
        Permenter & Yuan, ICML 2024, §4 recommend σ log-linear): target σ's
        ``exp(linspace(log σ_max, log σ(⌊T/N⌋), N))`` from the largest training σ down to the σ of
        timestep ⌊T/N⌋, each rounded up to a training timestep (the smallest t with σ(t) ≥ target,
        ``searchsorted`` as theirs), then a last step to σ(0) (``set_alpha_to_one=False``, as
        theirs) or 0. Their ``step`` returns VE samples x (latent·(1/√ᾱ)), this scheduler VP
        latents z = √ᾱ·x: with γ = 2, μ = 0, ``prediction_type="epsilon"`` and their
        ``clip_sample=False``, their final sample at σ(0) is this one times √(1 + σ(0)²) (1.0004
        for Stable Diffusion's σ(0) ≈ 0.029).
        """
        n = self.config.num_train_timesteps
        given = [k for k, v in (("num_inference_steps", num_inference_steps),
                                ("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of num_inference_steps, timesteps or sigmas, got "
                             f"{given or 'none'}")
        if sigmas is not None:
            sig = self._check_sigmas(sigmas)
            idx = nearest_timestep(self.train_sigmas.log(), sig[:-1]).tolist()
        elif timesteps is not None:
            idx = torch.as_tensor(timesteps).cpu().reshape(-1).tolist()
            if not idx or any(int(t) != t or not 0 <= t < n for t in idx):
                raise ValueError(f"timesteps must be training indices in [0, {n}), got {idx}")
            idx = [int(t) for t in idx]
        else:
            idx = self._spaced(num_inference_steps)
        if any(a <= b for a, b in pairwise(idx)):
            raise ValueError(f"the timesteps must be strictly decreasing, got {idx}" + (
                " (two σ's map to one training timestep)" if sigmas is not None else
                " (log_linear spacing rounds two σ's to one training timestep: use fewer steps)"
                if timesteps is None else ""))
        if sigmas is None:
            sig = torch.cat([self.train_sigmas[idx], self.final_sigma[None]])
        self.num_inference_steps = len(idx)
        self.timesteps = torch.tensor(idx, dtype=torch.long, device=device)
        self.sigmas = sig
        self._eps_prev, self._prev_index = None, None
        self._step_index, self._begin_index = None, None

    def _spaced(self, steps: Any) -> list[int]:
        n, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
            raise ValueError(f"num_inference_steps must be an int in [1, {n}], got {steps!r}")
        if spacing == "trailing":
            return trailing_indices(n, steps)
        if spacing == "leading":
            return [k * (n // steps) + self.config.steps_offset for k in reversed(range(steps))]
        if spacing == "linspace":
            return torch.linspace(0, n - 1, steps, dtype=torch.float64).round().long().flip(0).tolist()
        ts = self.train_sigmas  # log_linear
        end = min(n // steps, n - 1)
        target = torch.linspace(ts[-1].log(), ts[end].log(), steps, dtype=torch.float64).exp()
        idx = torch.searchsorted(ts, target).clamp(max=n - 1)
        idx[0], idx[-1] = n - 1, end  # the end points exactly, whatever the rounding of exp∘log
        return idx.tolist()

    def _check_sigmas(self, sigmas: Any) -> Tensor:
        sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu().reshape(-1)
        if (len(sig) < 2 or not torch.isfinite(sig).all() or (sig[:-1] <= 0).any()
                or sig[-1] < 0 or (sig[1:] >= sig[:-1]).any()):
            raise ValueError("sigmas must be N + 1 >= 2 finite, strictly decreasing VE σ's, "
                             f"positive but the last (>= 0), got {sig.tolist()}")
        return sig

    def _index(self, timestep: Any) -> int:
        hits = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep={timestep!r} is not in scheduler.timesteps "
                             f"{self.timesteps.tolist()}; call set_timesteps first")
        return int(hits[0, 0])

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> GradientEstimationSchedulerOutput | tuple:
        """One (γ, μ) step from ``timestep`` to the next timestep of ``timesteps``.

        Args:
            model_output: the network's output at ``(sample, timestep)`` (ε, v or x0 by
                ``prediction_type``).
            timestep: an entry of ``timesteps``.
            sample: the VP latent z_t.
            generator: for the noise when μ > 0.
            return_dict: return a :class:`GradientEstimationSchedulerOutput` (else a tuple).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self._index(timestep)
        eps_prev = self._eps_prev if self._prev_index == i - 1 else None
        dev, dt = sample.device, sample.dtype
        sig, sig_next = (s.to(device=dev, dtype=dt) for s in self.sigmas[i:i + 2])
        abar = self.alphas_cumprod[self.timesteps[i].cpu()].to(device=dev, dtype=dt)
        eps = vp_output_to_eps(self.config.prediction_type, model_output, sample, abar)
        x = sample / vp_scale(sig)
        noise = (randn_tensor(sample.shape, generator=generator, device=dev, dtype=dt)
                 if self.config.mu > 0 else None)
        x_next = gamma_mu_step(x, sig.item(), sig_next.item(), eps, eps_prev, self.config.gamma,
                               self.config.mu, noise)
        self._eps_prev, self._prev_index, self._step_index = eps, i, i + 1
        prev_sample, x0_hat = x_next * vp_scale(sig_next), x - sig * eps
        if not return_dict:
            return prev_sample, x0_hat
        return GradientEstimationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat)

    def _sigma_at(self, timesteps: Any, like: Tensor) -> Tensor:
        """σ of one timestep for the whole batch (0-d, or shape (1,), as the inpainting pipeline
        passes) or of one per sample, as diffusers' schedulers broadcast."""
        t = torch.as_tensor(timesteps).detach().cpu().reshape(-1)
        n = self.config.num_train_timesteps
        if t.numel() not in (1, len(like)):
            raise ValueError(f"timesteps must be one timestep or one per sample ({len(like)}), got "
                             f"shape {tuple(torch.as_tensor(timesteps).shape)}")
        if t.is_floating_point() and (t != t.round()).any() or (t < 0).any() or (t >= n).any():
            raise ValueError(f"timesteps must be training indices in [0, {n}), got {t.tolist()}")
        t = t.long()
        sig = self.train_sigmas[t[0] if t.numel() == 1 else t]
        return sigma_like(sig.to(device=like.device, dtype=like.dtype), like)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The VP forward process z_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, written as √ᾱ_t·(x0 + σ_t·ε)."""
        sig = self._sigma_at(timesteps, original_samples)
        return (original_samples + sig * noise) * vp_scale(sig)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (Salimans & Ho 2022)."""
        sig = self._sigma_at(timesteps, sample)
        return (noise - sig * sample) * vp_scale(sig)


# ------------------------------------------------------------------------------------------------
# latent diffusion pipelines -> optidiff model over latents + decoder


class PromptModel(nn.Module):
    """A model over latents conditioned on fixed text embeddings: ``model(x, σ, cond=None)`` uses
    ``prompt_embeds`` (broadcast over the batch) when ``cond`` is None, with classifier-free
    guidance ``eps_u + w·(eps_c − eps_u)`` (Ho & Salimans 2021, diffusers' ``guidance_scale``)
    against ``negative_embeds`` when ``guidance_scale`` ≠ 1. An ``nn.Module`` holding the wrapped
    model, so Algorithm 2 fine-tunes its parameters."""

    def __init__(self, model: VPModel, prompt_embeds: Tensor, negative_embeds: Tensor | None = None,
                 guidance_scale: float = 1.0):
        super().__init__()
        if guidance_scale != 1.0 and negative_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_embeds (the "
                             "unconditional embedding)")
        self.model, self.guidance_scale = model, float(guidance_scale)
        self.input_shape = model.input_shape
        self.register_buffer("prompt_embeds", prompt_embeds.detach(), persistent=False)
        self.register_buffer("negative_embeds", None if negative_embeds is None
                             else negative_embeds.detach(), persistent=False)
        self.cfg = (None if self.guidance_scale == 1.0
                    else ClassifierFree(self.guidance_scale, null_cond=self.negative_embeds))

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if cond is None:
            cond = self.prompt_embeds.to(x.dtype).expand(len(x), *self.prompt_embeds.shape[-2:])
        if self.cfg is None:
            return self.model(x, sigma, cond)
        return self.cfg(self.model, x, sigma, cond)


@dataclass
class LatentDiffusion:
    """An optidiff model over latents and the decoder of its pipeline (:func:`from_latent_pipeline`).

    Attributes:
        model: ``model(x, sigma, cond=None) -> eps`` over VE latents (a :class:`PromptModel`).
        decoder: latents → images in [0, 1] (a :class:`~optidiff.models.latent.LatentDecoder`).
        scheduler: a :class:`GradientEstimationScheduler` with the pipeline's β schedule and
            spacing, for :meth:`sigmas`.
    """

    model: PromptModel
    decoder: LatentDecoder
    scheduler: GradientEstimationScheduler

    def sigmas(self, steps: int) -> Tensor:
        """The scheduler's VE grid of ``steps`` steps (float32), for ``od.sample`` and the
        optimizers."""
        self.scheduler.set_timesteps(steps)
        return self.scheduler.sigmas.float()

    def decode(self, z: Tensor) -> Tensor:
        """Images in [0, 1] of latents z (differentiable)."""
        return self.decoder(z)

    def objective(self, f: Callable[[Tensor], Tensor] | Objective, *,
                  name: str | None = None) -> Objective:
        """``z ↦ f(decode(z))`` as a counted objective for ``gradient_guided`` / ``adaptive``
        (:func:`~optidiff.models.latent.decoded_objective`)."""
        return decoded_objective(f, self.decoder, name=name)

    def reward(self, f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """The differentiable ``z ↦ f(decode(z))`` for ``DPS``/``RewardGuidance`` on x0_hat."""
        return self.decoder.compose(f)


def from_latent_pipeline(pipe: Any, prompt: str = "", *,
                         negative_prompt: str | None = None, guidance_scale: float = 1.0,
                         input_shape: tuple[int, ...] | None = None,
                         decoder_chunk_size: int | None = None, decoder_checkpoint: bool = False,
                         unet_checkpoint: bool = False,
                         timestep_spacing: str | None = None) -> LatentDiffusion:
    """An optidiff model over the latents of a latent diffusion pipeline (Stable Diffusion and any
    pipeline with ``unet``, ``vae``, ``scheduler`` and ``encode_prompt``), with its decoder.

    The model is :func:`from_diffusers` of ``pipe.unet`` conditioned on the encoded ``prompt``
    (classifier-free guidance with ``guidance_scale`` ≠ 1, as the pipeline's); samples are VE
    latents, ``decode`` maps them to images. All of optidiff's guidance and optimizers take it:
    ``od.optimize.gradient_guided(ld.model, ld.objective(f), ld.sigmas(50), …)`` guides toward
    ``f(decode(z))``: the gradient g of each round passes through the decoder, the look-ahead's
    ``Jᵀg`` through the UNet; ``DPS(ld.reward(A), y)`` differentiates through both at once.

    Args:
        pipe: e.g. ``StableDiffusionPipeline.from_pretrained("/path/to/local/dir")``.
        prompt: one prompt (its embedding is shared by every sample).
        negative_prompt: the unconditional prompt of classifier-free guidance (default "").
        guidance_scale: w of classifier-free guidance (1: the conditional model alone).
        input_shape: latent shape ``(C, h, w)``; default from ``pipe.unet.config`` (h = height/8).
        decoder_chunk_size, decoder_checkpoint: the memory knobs of :class:`LatentDecoder`.
        unet_checkpoint: diffusers' gradient checkpointing of the UNet blocks
            (``pipe.unet.enable_gradient_checkpointing()``; changes ``pipe.unet``), for guidance
            that backpropagates through the UNet.
        timestep_spacing: of :meth:`LatentDiffusion.sigmas` (default: the pipeline scheduler's).
    """
    for part in ("unet", "vae", "scheduler", "encode_prompt"):
        if not hasattr(pipe, part):
            raise TypeError(f"pipe must be a latent diffusion pipeline with unet, vae, scheduler "
                            f"and encode_prompt; {type(pipe).__name__} has no {part}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (shared by every sample), got {prompt!r}")
    device = pipe.unet.device
    cfg = guidance_scale != 1.0
    with torch.no_grad():
        emb, neg = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
    if unet_checkpoint:
        pipe.unet.enable_gradient_checkpointing()
    extra = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    scheduler = GradientEstimationScheduler.from_config(pipe.scheduler.config, **extra)
    model = from_diffusers(pipe.unet, scheduler, input_shape, cond_key="encoder_hidden_states")
    vae_cfg = pipe.vae.config
    decoder = LatentDecoder(pipe.vae, scaling_factor=vae_cfg.scaling_factor,
                            shift_factor=getattr(vae_cfg, "shift_factor", None) or 0.0,
                            chunk_size=decoder_chunk_size, checkpoint=decoder_checkpoint)
    prompt_model = PromptModel(model, emb, neg if cfg else None, guidance_scale).to(device)
    return LatentDiffusion(prompt_model, decoder, scheduler)
