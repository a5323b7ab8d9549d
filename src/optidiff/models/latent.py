"""Latent diffusion: a decoder from latents to images, and objectives on decoded images.

A latent diffusion model (Rombach et al., CVPR 2022) samples latents z; a VAE decoder maps them to
images. Guidance toward a pixel-space objective f differentiates ``f(decode(z))``; Guo et al.
(NeurIPS 2024, §6, image experiments) guide Stable Diffusion with a reward on decoded images this
way, the gradient passing through the UNet (look-ahead, DPS: ``z ↦ x0_hat(z)``) and the decoder.

- :class:`LatentDecoder` wraps a VAE as ``decode(z) -> images`` with memory knobs: batch chunks and
  activation checkpointing (``torch.utils.checkpoint``), per chunk.
- :func:`decoded_objective` composes an objective on images with the decoder, for
  ``gradient_guided``, ``adaptive`` and ``NaiveGradient(objective=…)``; :meth:`LatentDecoder.compose`
  gives the plain differentiable ``z ↦ f(decode(z))`` for the guidance terms that differentiate
  through x0_hat (``DPS``, ``RewardGuidance``, ``LookAhead.from_objective``).

Nothing here imports diffusers: any module with ``decode(u) -> tensor`` (or an object with
``.sample``, as diffusers' ``AutoencoderKL``) works. ``optidiff.models.diffusers.from_latent_pipeline``
builds both from a diffusers pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..optimize.objectives import Objective

__all__ = ["LatentDecoder", "decoded_objective"]

Fn = Callable[[Tensor], Tensor]


class LatentDecoder(nn.Module):
    """``decode(z) = ½·vae.decode(z/scaling_factor + shift_factor) + ½``: images in [0, 1] (not
    clamped, so the gradient is never cut), as diffusers' pipelines decode before their
    post-processing (which clamps). ``unit_range=False`` returns the VAE's [−1, 1] output.

    Memory knobs (the decoder's activations dominate backpropagation at Stable Diffusion sizes):

    - ``chunk_size``: decode in batch chunks of this size;
    - ``checkpoint``: keep only each chunk's input for the backward pass and recompute its decoder
      activations there (``torch.utils.checkpoint``, non-reentrant), so that backpropagation holds
      the activations of one chunk at a time. Results and gradients are unchanged.

    The VAE runs in its own dtype (a float16 VAE takes the latents cast to float16); the images
    come back in the dtype of z.

    Args:
        vae: a module with ``decode(u)`` returning a tensor or an object with ``.sample``.
        scaling_factor, shift_factor: the latent normalisation of the VAE (``vae.config``'s; 0.18215
            and 0 for Stable Diffusion 1.x).
    """

    def __init__(self, vae: nn.Module, *, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 chunk_size: int | None = None, checkpoint: bool = False,
                 unit_range: bool = True):
        super().__init__()
        if not hasattr(vae, "decode"):
            raise TypeError(f"vae must have a decode(latents) method, got {type(vae).__name__}")
        if not (isinstance(scaling_factor, (int, float)) and scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a number > 0, got {scaling_factor!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        self.vae = vae
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        self.chunk_size, self.checkpoint = chunk_size, bool(checkpoint)
        self.unit_range = bool(unit_range)

    def _decode(self, z: Tensor) -> Tensor:
        weight = next(self.vae.parameters(), None)  # the VAE's dtype (e.g. float16) in, z's out
        u = z / self.scaling_factor + self.shift_factor
        out = self.vae.decode(u if weight is None else u.to(weight.dtype))
        out = getattr(out, "sample", out).to(z.dtype)
        return out * 0.5 + 0.5 if self.unit_range else out

    def forward(self, z: Tensor) -> Tensor:
        chunks = z.split(self.chunk_size) if self.chunk_size else (z,)
        grad = torch.is_grad_enabled()
        return torch.cat([_checkpoint(self._decode, c, use_reentrant=False)
                          if self.checkpoint and grad and c.requires_grad else self._decode(c)
                          for c in chunks])

    def compose(self, f: Fn) -> Fn:
        """The differentiable ``z ↦ f(decode(z))`` (e.g. the operator of ``DPS`` or the reward
        of ``RewardGuidance`` on x0_hat)."""
        def f_of_decoded(z: Tensor) -> Tensor:
            return f(self(z))

        f_of_decoded.__name__ = f"{getattr(f, '__name__', type(f).__name__)}∘decode"
        return f_of_decoded


def decoded_objective(f: Fn | Objective, decoder: LatentDecoder | Fn, *,
                      name: str | None = None) -> Objective:
    """The objective ``z ↦ f(decode(z))`` over latents, its gradient
    ``∇_z = J_decodeᵀ·∇f(decode(z))`` by autograd through the decoder.

    ``f`` is a callable on images ``(B, C, H, W) -> (B,)`` (autograd) or an :class:`Objective`; one
    with a gradient oracle (a black-box reward on images) is chained by a vector-Jacobian product of
    the decoder with the oracle's gradient. Queries are counted on the returned objective, per
    latent.
    """
    fn, oracle = (f.fn, f.grad_oracle) if isinstance(f, Objective) else (f, None)
    base = f.name if isinstance(f, Objective) else getattr(f, "__name__", type(f).__name__)
    maximum = f.maximum if isinstance(f, Objective) else None

    def value(z: Tensor) -> Tensor:
        return fn(decoder(z))

    grad = None
    if oracle is not None:
        def grad(z: Tensor) -> Tensor:
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                images = decoder(zg)
                (g,) = torch.autograd.grad(images, zg, oracle(images.detach()))
            return g

    return Objective(value, grad, name=name or f"{base}∘decode", maximum=maximum)

