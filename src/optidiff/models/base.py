"""The model contract and adapters that bring other conventions into it.

An optidiff model is any callable ``model(x, sigma, cond=None) -> eps`` in VE coordinates
(``x = x0 + σ·ε``), with ``sigma`` a 0-d tensor or a ``(B,)`` tensor, and an ``input_shape``
attribute (the shape of one sample) when it should draw its own initial noise. From ε:
Tweedie's denoised estimate is ``x0_hat = x − σ·eps`` and the score is ``−eps/σ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..schedules import alpha_bar_to_sigma, vp_scale

__all__ = ["PREDICTION_TYPES", "VPModel", "X0Model", "check_prediction_type", "nearest_timestep",
           "sigma_like", "vp_output_to_eps", "x0_hat"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` if it is one of :data:`PREDICTION_TYPES`, else a ValueError."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got "
                         f"{prediction_type!r}")
    return prediction_type


def vp_output_to_eps(prediction_type: str, output: Tensor, z: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε from a VP network's output at the latent ``z`` with ``a = √ᾱ``, ``s = √(1−ᾱ)``:

    - ``"epsilon"``: ε as is;
    - ``"sample"`` (x0-prediction): ``ε = (z − a·x0)/s``;
    - ``"v_prediction"`` (Salimans & Ho 2022, ``v = a·ε − s·x0``): ``ε = a·v + s·z``.
    """
    if prediction_type == "epsilon":
        return output
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return (z - a * output) / s if prediction_type == "sample" else a * output + s * z


def sigma_like(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a tensor broadcastable against ``x``: shape ``(B, 1, …, 1)`` (or 0-d for a scalar)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be 0-d or of shape (B,)=({x.shape[0]},), got "
                         f"{tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (x.ndim - 1)))


def x0_hat(model: Callable[..., Tensor], x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
    """Tweedie's denoised estimate ``x − σ·model(x, σ)``."""
    return x - sigma_like(sigma, x) * model(x, sigma, cond)


def nearest_timestep(log_sigmas: Tensor, sigma: Tensor | float) -> Tensor:
    """Index of the entry of the increasing table ``log_sigmas`` nearest to ``log sigma``
    (searchsorted, ties to the lower index)."""
    ls = torch.as_tensor(sigma, dtype=torch.float64, device=log_sigmas.device).log()
    hi = torch.searchsorted(log_sigmas, ls).clamp(1, len(log_sigmas) - 1)
    lo = hi - 1
    return torch.where(ls - log_sigmas[lo] <= log_sigmas[hi] - ls, lo, hi)


class VPModel(nn.Module):
    """Turn a discrete-time VP network ``net(z, t) -> output`` (a DDPM or diffusers UNet) into an
    optidiff model.

    The network sees ``z = x/√(1+σ²)`` (Permenter & Yuan (ICML 2024) §2: z = √ᾱ·x) and the training index t whose σ
    is nearest to the requested σ (in log σ). Its output is converted to ε by prediction type
    (:func:`vp_output_to_eps` with ᾱ of that index).
    """

    def __init__(self, net: Callable[..., Tensor], alphas_cumprod: Tensor, *,
                 prediction_type: str = "epsilon", input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.net = net
        self.prediction_type = check_prediction_type(prediction_type)
        self.input_shape = input_shape
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("log_sigmas", alpha_bar_to_sigma(abar).log(), persistent=False)

    def timestep(self, sigma: Tensor) -> Tensor:
        """Index of the training σ nearest to ``sigma`` in log σ (:func:`nearest_timestep`)."""
        return nearest_timestep(self.log_sigmas, sigma)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        t = self.timestep(sigma)
        sig = sigma_like(sigma, x)
        z = x * vp_scale(sig)
        t_in = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.net(z, t_in) if cond is None else self.net(z, t_in, cond)
        if self.prediction_type == "epsilon":
            return out
        abar = sigma_like(self.alphas_cumprod[t].to(x.dtype), x)
        return vp_output_to_eps(self.prediction_type, out, z, abar)


class X0Model(nn.Module):
    """Turn a VE denoiser ``D(x, sigma, cond) -> x0`` (k-diffusion / EDM style) into an ε model:
    ``eps = (x − D(x, σ))/σ``."""

    def __init__(self, denoiser: Callable[..., Tensor], input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.input_shape = input_shape

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        return (x - self.denoiser(x, sigma, cond)) / sigma_like(sigma, x)
