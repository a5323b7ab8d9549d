"""Classifiers: clean and noise-conditional, one cross-entropy training loop, their objectives.

- :class:`DigitClassifier`: a small CNN ``clf(x) -> logits`` for images; its penultimate
  features (:meth:`DigitClassifier.features`) are the feature space of the digits task's Fréchet
  distance.
- :class:`NoiseConditionalClassifier`: an MLP ``clf(x, sigma) -> logits`` for classifier guidance
  (Dhariwal & Nichol, NeurIPS 2021), which needs ``c(y | x, σ)``, the class posterior of the
  *noisy* point, so it trains on ``(x0 + σ·ε, σ, label)`` with σ drawn over the sampler's range.
- :func:`train_classifier`: cross-entropy training of either kind with an explicit generator.
- :func:`class_log_prob`: the objective ``f(x) = log c(target | x)`` for guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import sigma_like
from .mlp import SigmaEmbedding, mlp_stack
from .registry import register_model

__all__ = ["DigitClassifier", "NoiseConditionalClassifier", "class_log_prob", "predict",
           "train_classifier"]


@register_model
class DigitClassifier(nn.Module):
    """Small CNN ``clf(x) -> logits`` for images ``(B, C, H, W)`` in [−1, 1].

    Stages of ``3×3 conv → ReLU → 3×3 conv (stride 2) → ReLU`` (widths ``channels``,
    ``2·channels``, …) until the feature map is at most 7×7 (8 → 4; 28 → 14 → 7), then
    ``flatten → Linear(feature_dim) → ReLU`` (the **penultimate features**, :meth:`features`) and
    ``Linear(num_classes)``.
    """

    def __init__(self, image_size: int = 8, in_channels: int = 1, channels: int = 32,
                 feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        if min(image_size, in_channels, channels, feature_dim) < 1 or num_classes < 2:
            raise ValueError(f"need positive sizes and num_classes >= 2, got image_size="
                             f"{image_size}, in_channels={in_channels}, channels={channels}, "
                             f"feature_dim={feature_dim}, num_classes={num_classes}")
        self.input_shape = (in_channels, image_size, image_size)
        layers: list[nn.Module] = []
        c, size, width = in_channels, image_size, channels
        while True:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()]
            c, size = width, (size + 1) // 2
            if size <= 7:
                break
            width *= 2
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, feature_dim), nn.ReLU())
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)``."""
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), got "
                             f"{tuple(x.shape)}")
        return self.head(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


@register_model
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
        self.input_shape = shape
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.embed = SigmaEmbedding(emb_dim)
        self.net = mlp_stack(math.prod(shape) + emb_dim, hidden, depth, num_classes)

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


def train_classifier(clf: Callable[..., Tensor] | nn.Module, data: Tensor, labels: Tensor, *,
                     steps: int = 1000, batch_size: int = 256, lr: float = 1e-3,
                     weight_decay: float = 0.0, noise: bool = True, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, sigmas: Tensor | None = None,
                     generator: torch.Generator | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train a classifier in place by cross-entropy; returns the loss per step.

    Each step draws a minibatch of (x0, label) with replacement and takes one Adam step (or a step
    of ``optimizer``) on ``CE(clf(x), label)``:

    - ``noise=True`` (noise-conditional, ``clf(x, sigma)``): ``x = x0 + σ·ε`` with σ log-uniform on
      ``[sigma_min, sigma_max]`` (or uniform over the table ``sigmas``, e.g. a schedule's) and
      ε ~ N(0, I);
    - ``noise=False`` (clean, ``clf(x)``): ``x = x0``.

    All randomness comes from ``generator``; ``clf`` ends in eval mode.
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
    if noise and sigmas is None and not 0 < sigma_min < sigma_max < math.inf:
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
        if noise:
            sig = _draw_sigmas(batch_size, sigma_min, sigma_max, sigmas, generator, data.dtype,
                               data.device)
            eps = torch.randn(x0.shape, generator=generator, dtype=data.dtype, device=data.device)
            logits = clf(x0 + sigma_like(sig, x0) * eps, sig)
        else:
            logits = clf(x0)
        loss = nn.functional.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_classifier: loss is not finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if isinstance(clf, nn.Module):
        clf.eval()
    return losses


@torch.no_grad()
def predict(clf: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Class probabilities ``(N, num_classes)`` of a clean classifier on ``x``, in batches."""
    return torch.cat([torch.softmax(clf(x[i:i + batch_size].to(torch.float32)), dim=1)
                      for i in range(0, len(x), batch_size)])


def class_log_prob(clf: Callable[..., Tensor], target: int | Tensor, *,
                   sigma: float | None = None) -> Callable[[Tensor], Tensor]:
    """The objective ``f(x) = log c(target | x)`` (per sample, differentiable) of a classifier:
    ``clf(x)`` for a clean classifier, or ``clf(x, sigma)`` at a fixed σ for a noise-conditional
    one. ``target``: an int or a (B,) tensor of labels."""
    target = torch.as_tensor(target).long()

    def f(x: Tensor) -> Tensor:
        logits = clf(x) if sigma is None else clf(x, torch.tensor(sigma, dtype=x.dtype))
        t = target.to(x.device).expand(len(x))
        return torch.log_softmax(logits, dim=1).gather(1, t[:, None]).squeeze(1)

    f.__name__ = "class_log_prob"
    return f
