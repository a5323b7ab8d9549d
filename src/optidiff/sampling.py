"""Samplers in VE σ coordinates: the (γ, μ) family of Permenter & Yuan and its peers.

A *model* is any callable ``model(x, sigma, cond=None) -> eps`` (VE convention); a *guidance* is any
callable ``guidance(model, x, sigma, cond) -> eps_guided`` (see :class:`Guidance`). Every sampler
is a loop over a decreasing σ grid that calls :func:`_eps` once per network evaluation (NFE), so any
guidance composes with any sampler.

The (γ, μ) family (Permenter & Yuan (ICML 2024), Algorithm 2 and its stochastic generalisation, eq. 12)::

    ebar_t  = eps_t  (first step),   γ·eps_t + (1−γ)·eps_{t+1}  (afterwards; eps_{t+1}: previous output)
    σ'      = (σ_{t−1} / σ_t^μ)^{1/(1−μ)}
    x_{t−1} = x_t − (σ_t − σ')·ebar_t + √(σ_{t−1}² − σ'²)·w,    w ~ N(0, I)

DDIM = (1, 0), DDPM = (1, ½) exactly, GE = (2, 0); one NFE per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed as _distributed
from . import rng
from .device import autocast, check_precision

__all__ = ["PRESETS", "SAMPLERS", "Guidance", "Step", "check_gamma_mu", "check_sigmas",
           "gamma_mu_step", "progress_off", "resolve_sampler", "sample", "sample_iter"]

Model = Callable[..., Tensor]

#: names of the (γ, μ) family: sampler -> (γ, μ)
PRESETS = {"ddim": (1.0, 0.0), "ddpm": (1.0, 0.5), "ge": (2.0, 0.0)}
SAMPLERS = ("gamma_mu", *PRESETS, "dpmpp_2m", "heun", "reverse_sde")


class Guidance(Protocol):
    """The guidance protocol: return the guided ε at ``(x, sigma)``.

    A score correction G(x, σ) gives ``eps − σ·G``; classifier-free guidance replaces
    ε altogether. The guidance calls ``model`` itself (it may need gradients through it), and is
    called inside ``torch.no_grad()``: it enables gradients where it needs them.
    """

    def __call__(self, model: Model, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


@dataclass
class Step:
    """One sampler step: ε (guided, if guidance is on) was evaluated at ``(x_t, sigma)``; the new
    state is ``x`` at ``sigma_next``; ``x0_hat = x_t − sigma·eps`` (computed on access); ``nfe``
    counts network evaluations so far."""

    index: int
    sigma: Tensor
    sigma_next: Tensor
    x: Tensor
    eps: Tensor
    x_t: Tensor
    nfe: int

    @property
    def x0_hat(self) -> Tensor:
        """Tweedie's denoised estimate at (x_t, sigma); not computed unless asked for."""
        return self.x_t - self.sigma * self.eps


def progress_off(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for optidiff's ``progress`` option: True shows a bar, False hides it,
    None (the default of every optidiff function and command) shows it when stderr is a terminal."""
    return None if progress is None else not progress


def check_sigmas(sigmas: Tensor) -> Tensor:
    """Validate a sampling grid: 1-D, ≥ 2 entries, finite, strictly decreasing, positive except a
    final 0."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape "
                         f"{tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    if sigmas[-1] < 0:
        raise ValueError(f"sigmas must be >= 0, got final sigma {sigmas[-1].item()}")
    return sigmas


def check_gamma_mu(gamma: float, mu: float) -> tuple[float, float]:
    """(γ, μ) as floats if γ is finite and > 0 and μ ∈ [0, 1); a ValueError naming them otherwise."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be finite and > 0, got gamma={gamma!r}")
    if not (isinstance(mu, (int, float)) and 0.0 <= mu < 1.0):
        raise ValueError(f"mu must be in [0, 1), got mu={mu!r}")
    return float(gamma), float(mu)


def resolve_sampler(sampler: str, gamma: float | None, mu: float | None) -> tuple[float, float]:
    """(γ, μ) for ``sampler`` (a preset's point, or the given values); ValueError on an unknown
    name, a preset contradicted by γ/μ, γ ≤ 0 or μ ∉ [0, 1). Peers return (1, 0), unused."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "gamma_mu":
        gamma = 1.0 if gamma is None else gamma
        mu = 0.0 if mu is None else mu
    elif sampler == "ge":
        gamma = PRESETS["ge"][0] if gamma is None else gamma
        if mu not in (None, 0.0):
            raise ValueError(f"sampler='ge' is deterministic (mu=0), got mu={mu}; "
                             "use sampler='gamma_mu' for a stochastic variant")
        mu = 0.0
    elif sampler in PRESETS:
        g0, m0 = PRESETS[sampler]
        if gamma not in (None, g0) or mu not in (None, m0):
            raise ValueError(f"sampler={sampler!r} fixes gamma={g0}, mu={m0}; got gamma={gamma}, "
                             f"mu={mu}. Use sampler='gamma_mu' for other values")
        gamma, mu = g0, m0
    else:
        if gamma is not None or mu is not None:
            raise ValueError(f"gamma and mu belong to the (gamma, mu) family; sampler={sampler!r} "
                             f"takes neither (got gamma={gamma}, mu={mu})")
        return 1.0, 0.0
    return check_gamma_mu(gamma, mu)


def _initial_x(model: Model, sigma_max: Tensor, batch_size: int | None, x_init: Tensor | None,
               generator: torch.Generator | None, dtype: torch.dtype | None,
               device: torch.device | str | None) -> Tensor:
    if x_init is not None:
        if batch_size is not None and batch_size != len(x_init):
            raise ValueError(f"batch_size={batch_size} disagrees with x_init of batch {len(x_init)}")
        if x_init.ndim < 2:
            raise ValueError(f"x_init must have shape (B, *dims), got {tuple(x_init.shape)}")
        return x_init
    if batch_size is None or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"give x_init, or batch_size as a positive int (got batch_size={batch_size!r})")
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("the model has no input_shape attribute; pass x_init to od.sample")
    w = torch.randn((batch_size, *shape), generator=generator, dtype=dtype or torch.float32,
                    device=device)
    return sigma_max.to(w) * w


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _chunk(cond: Any, rows: slice) -> Any:
    return cond[rows] if isinstance(cond, Tensor) and cond.ndim > 0 else cond


def _eps(model: Model, x: Tensor, sigma: Tensor, cond: Any, guidance: Guidance | None,
         chunk_size: int | None, precision: str = "fp32") -> Tensor:
    """One network evaluation (guided if ``guidance`` is given), optionally in batch chunks, under
    ``precision``'s autocast; ε comes back in the dtype of ``x``."""
    if precision != "fp32":
        with autocast(x.device, precision):
            return _eps(model, x, sigma, cond, guidance, chunk_size).to(x.dtype)
    if guidance is not None:
        eps = guidance(model, x, sigma, cond)
    elif chunk_size is None or chunk_size >= len(x):
        eps = model(x, sigma, cond)
    else:
        eps = torch.cat([model(x[i:i + chunk_size], sigma, _chunk(cond, slice(i, i + chunk_size)))
                         for i in range(0, len(x), chunk_size)])
    if eps.shape != x.shape:
        raise ValueError(f"the model returned eps of shape {tuple(eps.shape)} for x of shape "
                         f"{tuple(x.shape)}")
    # a NaN or ±inf anywhere makes the sum non-finite: one cheap reduction instead of an
    # elementwise isfinite pass (which costs as much as ~5 vector ops); the exact check runs only
    # to rule out a false alarm from an overflowing sum of huge finite values
    if not torch.isfinite(eps.sum()) and not torch.isfinite(eps).all():
        raise FloatingPointError(f"the model (or guidance) returned a non-finite eps at "
                                 f"sigma={sigma.item():.6g}")
    return eps


def sample_iter(model: Model, sigmas: Tensor, *, batch_size: int | None = None,
                x_init: Tensor | None = None, gamma: float | None = None, mu: float | None = None,
                sampler: str | None = None, guidance: Guidance | None = None, cond: Any = None,
                generator: torch.Generator | None = None, seed: int | None = None,
                chunk_size: int | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None,
                progress: bool | None = None, precision: str = "fp32") -> Iterator[Step]:
    """Run a sampler and yield a :class:`Step` after every step (see :func:`sample` for arguments)."""
    if sampler is None:  # given γ or μ name a point of the family; otherwise the GE sampler
        sampler = "ge" if gamma is None and mu is None else "gamma_mu"
    gamma, mu = resolve_sampler(sampler, gamma, mu)
    check_precision(precision)
    if seed is not None:
        if generator is not None:
            raise ValueError("give generator= or seed=, not both")
        generator = rng.generator(seed, device or "cpu")
    sigmas = check_sigmas(sigmas)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
    x = _initial_x(model, sigmas[0], batch_size, x_init, generator, dtype, device)
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    steps = {"dpmpp_2m": _dpmpp_2m, "heun": _heun, "reverse_sde": _reverse_sde}.get(sampler)

    def eps_fn(x: Tensor, sigma: Tensor) -> Tensor:
        return _eps(model, x, sigma, cond, guidance, chunk_size, precision)

    it = (steps(eps_fn, x, sigmas, generator) if steps
          else _gamma_mu(eps_fn, x, sigmas, gamma, mu, generator))
    # no_grad wraps each step, not the generator: grad mode must not leak to the caller between steps
    with tqdm(total=len(sigmas) - 1, disable=progress_off(progress), desc=sampler,
              leave=False) as bar:
        while True:
            with torch.no_grad():
                step = next(it, None)
            if step is None:
                return
            bar.update()
            yield step


def sample(model: Model, sigmas: Tensor, **kwargs: Any) -> Tensor:
    """Draw samples by integrating from ``sigmas[0]`` down to ``sigmas[-1]``.

    Args:
        model: ``model(x, sigma, cond=None) -> eps``; needs ``input_shape`` unless ``x_init`` is given.
        sigmas: decreasing noise levels σ_N > … > σ_0 ≥ 0 (e.g. ``schedule.sample_sigmas(steps)``).
        batch_size: number of samples when ``x_init`` is not given; ``x_N = σ_N·w``.
        x_init: starting point at σ_N, shape ``(B, *dims)``.
        gamma, mu: the (γ, μ) family (defaults 1 and 0 for ``sampler="gamma_mu"``).
        sampler: ``"ge"`` (the default, also of ``optidiff sample``: the gradient-estimation
            sampler, γ = 2, μ = 0; ``"gamma_mu"`` when ``gamma`` or ``mu`` is given),
            ``"gamma_mu"``, the presets ``"ddim"`` (1, 0), ``"ddpm"``
            (1, ½), or the peers ``"dpmpp_2m"``, ``"heun"``, ``"reverse_sde"``.
        guidance: a :class:`Guidance` (see ``optidiff.guidance``).
        cond: conditioning passed to the model.
        generator, seed: the only source of randomness (initial noise and μ/SDE noise); a
            ``seed`` makes a generator on ``device``. Without either, torch's global RNG is used.
        chunk_size: evaluate the unguided model in batch chunks of this size.
        dtype, device: of the initial noise when ``x_init`` is not given.
        progress: show a progress bar (``None``, the default everywhere in optidiff: when
            stderr is a terminal).
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"``: every network evaluation under
            ``torch.autocast`` (the sampler's state and arithmetic stay in the dtype of x).

        distributed: under ``torchrun`` (``None``, the default: when a process group of more
            than one process is initialised) rank r draws rows :func:`optidiff.distributed.shard`
            of the batch (of ``batch_size``, or of ``x_init`` and a per-sample ``cond``) with the
            generator seeded :func:`optidiff.distributed.rank_seed` ``(seed, r)`` — ``seed`` is
            required — and every rank returns the whole batch gathered in rank order. Guidance
            terms see the rank's shard. ``False``: each process samples on its own.

    Returns the final state at ``sigmas[-1]`` (the denoised sample when it is 0). With ``x_init``,
    μ = 0 and a deterministic guidance and sampler, the result is deterministic.
    """
    rank, world = _distributed.rank_world()
    if kwargs.pop("distributed", None) is False or world == 1:
        return _final(sample_iter(model, sigmas, **kwargs))
    if kwargs.get("generator") is not None or kwargs.get("seed") is None:
        raise ValueError("under torchrun od.sample needs seed= (not generator=), so that every "
                         "rank draws its own stream; or pass distributed=False")
    kwargs["seed"] = _distributed.rank_seed(kwargs["seed"], rank)
    x_init, cond = kwargs.get("x_init"), kwargs.get("cond")
    n = len(x_init) if x_init is not None else kwargs.get("batch_size")
    if n is None:
        raise ValueError("give batch_size= or x_init= (the whole batch, shared out by rank)")
    if n < world:
        raise ValueError(f"a batch of {n} cannot be shared out over {world} ranks")
    rows = _distributed.shard(n, rank, world)
    if x_init is not None:
        kwargs["x_init"] = x_init[rows]
    else:
        kwargs["batch_size"] = rows.stop - rows.start
    if isinstance(cond, Tensor) and cond.ndim > 0 and len(cond) == n:
        kwargs["cond"] = cond[rows]
    return _distributed.gather(_final(sample_iter(model, sigmas, **kwargs)))


def _final(steps: Iterator[Step]) -> Tensor:
    step = None
    for step in steps:
        pass
    return step.x


def gamma_mu_step(x: Tensor, sigma: float, sigma_next: float, eps: Tensor,
                  eps_prev: Tensor | None, gamma: float, mu: float,
                  noise: Tensor | None = None) -> Tensor:
    """One step x_t → x_{t−1} of the (γ, μ) family (Permenter & Yuan (ICML 2024), eq. 12 and its stochastic form)::

        ebar    = eps (first step, eps_prev None),  γ·eps + (1−γ)·eps_prev  (afterwards)
        σ'      = (σ_{t−1} / σ_t^μ)^{1/(1−μ)}
        x_{t−1} = x_t − (σ_t − σ')·ebar + √(σ_{t−1}² − σ'²)·noise      (noise needed when μ > 0)

    σ's are Python floats, so each update is one fused vector op (``lerp``, ``add`` with alpha).
    Shared by :func:`sample` and the diffusers scheduler ``GradientEstimationScheduler``.
    """
    ebar = eps if eps_prev is None else torch.lerp(eps_prev, eps, gamma)
    sig_p = (sigma_next / sigma**mu) ** (1 / (1 - mu))
    x = x.add(ebar, alpha=-(sigma - sig_p))
    if mu > 0:
        x = x.add(noise, alpha=max(sigma_next**2 - sig_p**2, 0.0) ** 0.5)
    return x


def _gamma_mu(eps_fn, x, sigmas, gamma, mu, generator) -> Iterator[Step]:
    """The (γ, μ) family of Permenter & Yuan (ICML 2024): :func:`gamma_mu_step` with the previous raw ε."""
    eps_prev = None
    s = sigmas.tolist()
    for i, (sig, sig_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = eps_fn(x, sig)
        noise = _noise(x, generator) if mu > 0 else None
        x_t, x = x, gamma_mu_step(x, s[i], s[i + 1], eps, eps_prev, gamma, mu, noise)
        eps_prev = eps
        yield Step(i, sig, sig_next, x, eps, x_t, i + 1)


def _dpmpp_2m(eps_fn, x, sigmas, generator) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in σ coordinates, as k-diffusion's ``sample_dpmpp_2m``.

    With λ = −log σ, h = λ_{t−1} − λ_t, r = h_prev/h and D = x0_hat:
    ``x_{t−1} = (σ_{t−1}/σ_t)·x_t − (e^{−h} − 1)·D̃``, D̃ = (1 + 1/2r)·D_t − (1/2r)·D_{t+1}
    (first-order D̃ = D_t at the first step and when σ_{t−1} = 0).
    """
    d_prev, h_prev = None, None
    s = sigmas.tolist()
    for i, (sig, sig_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = eps_fn(x, sig)
        d = x - sig * eps
        if s[i + 1] == 0:
            x_new = d
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            d_bar = d
            if d_prev is not None:
                d_bar = torch.lerp(d, d_prev, -h / (2 * h_prev))  # (1 + 1/2r)·d − (1/2r)·d_prev
            x_new = (x * (s[i + 1] / s[i])).add_(d_bar, alpha=-math.expm1(-h))
            h_prev = h
        d_prev = d
        x_old, x = x, x_new
        yield Step(i, sig, sig_next, x, eps, x_old, i + 1)


def _heun(eps_fn, x, sigmas, generator) -> Iterator[Step]:
    """Heun's second-order method on dx/dσ = ε (Karras et al. 2022, Alg. 1, no churn).

    Euler predictor x̃ = x + (σ_{t−1} − σ_t)·ε_t, trapezoid corrector with ε(x̃, σ_{t−1}); a plain
    Euler step when σ_{t−1} = 0. Two NFE per step except the last step to 0.
    """
    nfe = 0
    s = sigmas.tolist()
    for i, (sig, sig_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = eps_fn(x, sig)
        nfe += 1
        dt = s[i + 1] - s[i]
        x_euler = x.add(eps, alpha=dt)
        x_t = x
        if s[i + 1] == 0:
            x = x_euler
        else:
            eps2 = eps_fn(x_euler, sig_next)
            nfe += 1
            x = x.add(eps + eps2, alpha=dt / 2)
        yield Step(i, sig, sig_next, x, eps, x_t, nfe)


def _reverse_sde(eps_fn, x, sigmas, generator) -> Iterator[Step]:
    """Euler–Maruyama on the reverse SDE of the Wang & Chen tutorial, ``dX← = [½X← + ∇log p_{T−t}(X←)]dt + dW̄``.

    Run in VP coordinates z = x/√(1+σ²) with OU time t = log(1+σ²); the VP score is
    ``∇_z log p_t(z) = −√(1+σ²)·eps/σ``. With h = t_i − t_{i−1}:
    ``z ← z + h·(½z + score) + √h·w``, and the result is mapped back to x = z·√(1+σ²).
    """
    s = sigmas.tolist()
    z = x / math.sqrt(1 + s[0] ** 2)
    for i, (sig, sig_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        root = math.sqrt(1 + s[i] ** 2)          # 1/vp_scale(σ_t)
        x_t = z * root
        eps = eps_fn(x_t, sig)
        h = math.log1p(s[i] ** 2) - math.log1p(s[i + 1] ** 2)
        z = (z * (1 + 0.5 * h)).add_(eps, alpha=-h * root / s[i])
        if s[i + 1] > 0:
            z = z.add_(_noise(z, generator), alpha=math.sqrt(h))
        yield Step(i, sig, sig_next, z * math.sqrt(1 + s[i + 1] ** 2), eps, x_t, i + 1)
