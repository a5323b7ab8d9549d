"""Noise-conditional classifiers for classifier guidance (Dhariwal & Nichol 2021; seed 002).

Classifier guidance needs ``c(y | x, σ)``, the class posterior of the *noisy* point, so the
classifier is trained on ``(x0 + σ·ε, σ, label)`` with σ drawn over the sampler's range (DESIGN.md
§3.4). :class:`NoiseConditionalClassifier` is a small MLP with the same σ conditioning as
:class:`optidiff.models.TimeMLP`; :func:`train_classifier` trains any ``clf(x, sigma) -> logits``
by cross-entropy with an explicit generator. Use it with
``od.guidance.Classifier(clf, y, s)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .models.base import sigma_like
from .models.mlp import SigmaEmbedding, mlp_stack

__all__ = ["NoiseConditionalClassifier", "train_classifier"]


class NoiseConditionalClassifier(nn.Module):
    """MLP classifier ``clf(x, sigma) -> logits`` of shape (B, num_classes).

    Input ``x`` of shape (B, *input_shape) is flattened and scaled by ``c_in = 1/√(σ² + σ_data²)``
    (as :class:`optidiff.models.TimeMLP`), concatenated with the sinusoidal embedding of
    ``¼·log σ`` (Karras et al. 2022) and fed through ``depth`` SiLU layers of width ``hidden``.
    ``sigma`` is a 0-d tensor or of shape (B,).
    """

    def __init__(self, input_shape: int | tuple[int, ...], num_classes: int, hidden: int = 128,
                 depth: int = 3, emb_dim: int = 64, sigma_data: float = 1.0):
        super().__init__()
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be positive, got {input_shape!r}")
        if num_classes < 2 or hidden < 1 or depth < 1:
            raise ValueError(f"need num_classes >= 2, hidden >= 1, depth >= 1; got {num_classes}, "
                             f"{hidden}, {depth}")
        self._config = {"input_shape": list(shape), "num_classes": num_classes, "hidden": hidden,
                            "depth": depth, "emb_dim": emb_dim, "sigma_data": sigma_data}
        self.input_shape = shape
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.embed = SigmaEmbedding(emb_dim)
        self.net = mlp_stack(math.prod(shape) + emb_dim, hidden, depth, num_classes)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able)."""
        return dict(self._config)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        flat = x.flatten(1)
        sig = sigma_like(sigma, flat)
        emb = self.embed(torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x)))
        return self.net(torch.cat([flat / (sig**2 + self.sigma_data**2).sqrt(), emb], dim=-1))


def _draw_sigmas(n: int, sigma_min: float, sigma_max: float, sigmas: Tensor | None,
                 generator: torch.Generator | None, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    if sigmas is not None:
        idx = torch.randint(len(sigmas), (n,), generator=generator, device=device)
        return sigmas.to(device=device, dtype=dtype)[idx]
    u = torch.rand(n, generator=generator, dtype=dtype, device=device)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


def train_classifier(clf: Callable[[Tensor, Tensor], Tensor] | nn.Module, data: Tensor,
                     labels: Tensor, *, steps: int = 1000, batch_size: int = 256,
                     lr: float = 1e-3, weight_decay: float = 0.0, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, sigmas: Tensor | None = None,
                     generator: torch.Generator | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train a noise-conditional classifier by cross-entropy on ``(x0 + σ·ε, σ, label)``.

    Each step draws a minibatch of (x0, label) with replacement, σ log-uniform on
    ``[sigma_min, sigma_max]`` (or uniformly from the table ``sigmas``, e.g. a schedule's
    ``sigmas``), ε ~ N(0, I), and takes one Adam step (or a step of ``optimizer``) on
    ``CE(clf(x0 + σε, σ), label)``. All randomness comes from ``generator``. Returns the loss per
    step. ``clf`` is trained in place (its parameters must be on the data's device).
    """
    data = torch.as_tensor(data)
    labels = torch.as_tensor(labels, device=data.device).long()
    if data.ndim < 2 or len(data) == 0:
        raise ValueError(f"data must have shape (N, *dims) with N >= 1, got {tuple(data.shape)}")
    if labels.shape != (len(data),):
        raise ValueError(f"labels must have shape ({len(data)},), got {tuple(labels.shape)}")
    if not torch.isfinite(data).all():
        raise FloatingPointError("train_classifier: data contains non-finite values")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if sigmas is None and not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas)
        if sigmas.ndim != 1 or len(sigmas) == 0 or (sigmas <= 0).any():
            raise ValueError("sigmas must be a non-empty 1-D tensor of positive noise levels")
    params = [p for p in getattr(clf, "parameters", list)() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise ValueError("clf has no trainable parameters; pass an optimizer or a nn.Module")
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if isinstance(clf, nn.Module):
        clf.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=generator, device=data.device)
        x0, y = data[idx], labels[idx]
        sig = _draw_sigmas(batch_size, sigma_min, sigma_max, sigmas, generator, data.dtype,
                           data.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=data.dtype, device=data.device)
        x = x0 + sigma_like(sig, x0) * noise
        loss = nn.functional.cross_entropy(clf(x, sig), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_classifier: loss is not finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if isinstance(clf, nn.Module):
        clf.eval()
    return losses
