"""The ``toy2d`` task: seeded 2-D data sets, each scaled to roughly unit variance.

Every draw takes a ``torch.Generator`` (or an int seed): the same seed gives the same points.

- :func:`swiss_roll`: the classic roll ``(t cos t, t sin t)``, t ~ U(1.5π, 4.5π), plus small noise
  (smalldiffusion's ``Swissroll`` and scikit-learn's ``make_swiss_roll`` in the plane).
- :func:`rings`: three concentric circles (radii 1, 2, 3, points uniform in arc length) plus noise.
- :func:`gaussian_mixture`: 8 equal Gaussians on a circle. Its exact denoiser
  (:func:`gaussian_mixture_denoiser`) uses the same parameters (:func:`gaussian_mixture_params`), so
  trained models and samplers can be compared with an exact reference. The radius is chosen so the
  mixture has mean 0 and covariance exactly I: ``R²/2 + s² = 1``.

:class:`Toy2DTask` is the task of ``optidiff train`` configs (``[task] name = "toy2d"``): its
``metrics`` are the sample quality against fresh draws (unbiased MMD² with an RBF kernel of
bandwidth 0.1, the mixture's component width, and sliced W2² with 256 directions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import rng
from ..metrics import mmd_rbf, sliced_wasserstein
from ..models import GaussianMixtureDenoiser

__all__ = [
    "DATASETS",
    "MMD_BANDWIDTH",
    "Toy2DTask",
    "gaussian_mixture",
    "gaussian_mixture_denoiser",
    "gaussian_mixture_params",
    "get_dataset",
    "make_data",
    "quality",
    "rings",
    "swiss_roll",
]

#: mixture layout: K components of standard deviation STD on a circle of radius RADIUS
MIXTURE_K, MIXTURE_STD = 8, 0.1
MIXTURE_RADIUS = math.sqrt(2 * (1 - MIXTURE_STD**2))

# swiss roll: per-coordinate centre and scale of (t cos t, t sin t), t ~ U(1.5π, 4.5π), computed in
# closed form below so the scaled data have mean ≈ 0 and total variance ≈ 2 (unit per coordinate)
_T0, _T1 = 1.5 * math.pi, 4.5 * math.pi
_RINGS = (1.0, 2.0, 3.0)


def _generator(generator: torch.Generator | int) -> torch.Generator:
    if not isinstance(generator, (torch.Generator, int)) or isinstance(generator, bool):
        raise ValueError(f"generator must be a torch.Generator or an int seed, got {generator!r}")
    return rng.generator(generator)


def _check_n(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got n={n!r}")
    return n


def _roll_moments() -> tuple[Tensor, float]:
    """Mean of (t cos t, t sin t) and the scale √(E‖x − m‖²/2), t ~ U(T0, T1) (exact integrals)."""
    t = torch.linspace(_T0, _T1, 200_001, dtype=torch.float64)  # trapezoid rule, error ~1e-9
    pts = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    mean = torch.trapezoid(pts, t, dim=0) / (_T1 - _T0)
    var = torch.trapezoid(((pts - mean) ** 2).sum(1), t) / (_T1 - _T0) / 2
    return mean, math.sqrt(var.item())


_ROLL_MEAN, _ROLL_SCALE = _roll_moments()


def swiss_roll(n: int, generator: torch.Generator | int, *, noise: float = 0.05,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points of a 2-D swiss roll, centred and scaled to unit variance per coordinate (before
    the Gaussian ``noise``, which is in the scaled units). Shape (n, 2)."""
    g = _generator(generator)
    t = _T0 + (_T1 - _T0) * torch.rand(_check_n(n), generator=g, dtype=torch.float64)
    x = (torch.stack([t * t.cos(), t * t.sin()], dim=1) - _ROLL_MEAN) / _ROLL_SCALE
    x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(dtype)


def rings(n: int, generator: torch.Generator | int, *, noise: float = 0.03,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points on three concentric circles of radii 1 : 2 : 3 (ring chosen with probability
    proportional to its length), scaled so E‖x‖²/2 = 1 before the Gaussian ``noise``. Shape (n, 2)."""
    g = _generator(generator)
    radii = torch.tensor(_RINGS, dtype=torch.float64)
    ring = torch.multinomial(radii / radii.sum(), _check_n(n), replacement=True, generator=g)
    theta = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    scale = math.sqrt((radii**3).sum().item() / radii.sum().item() / 2)  # √(E r² / 2)
    r = radii[ring] / scale
    x = torch.stack([r * theta.cos(), r * theta.sin()], dim=1)
    x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(dtype)


def gaussian_mixture_params() -> tuple[Tensor, Tensor, Tensor]:
    """``(weights (K,), means (K, 2), covs (K, 2, 2))`` of the toy mixture, float64."""
    angles = 2 * math.pi * torch.arange(MIXTURE_K, dtype=torch.float64) / MIXTURE_K
    means = MIXTURE_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    covs = (MIXTURE_STD**2) * torch.eye(2, dtype=torch.float64).expand(MIXTURE_K, 2, 2).clone()
    weights = torch.full((MIXTURE_K,), 1.0 / MIXTURE_K, dtype=torch.float64)
    return weights, means, covs


def gaussian_mixture(n: int, generator: torch.Generator | int, *,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` exact draws from the mixture of :func:`gaussian_mixture_params`. Shape (n, 2)."""
    g = _generator(generator)
    weights, means, covs = gaussian_mixture_params()
    k = torch.multinomial(weights, _check_n(n), replacement=True, generator=g)
    chol = torch.linalg.cholesky(covs)
    w = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (means[k] + (chol[k] @ w.unsqueeze(-1)).squeeze(-1)).to(dtype)


def gaussian_mixture_denoiser() -> GaussianMixtureDenoiser:
    """The exact denoiser of :func:`gaussian_mixture` (same weights, means and covariances)."""
    return GaussianMixtureDenoiser(*gaussian_mixture_params())


#: name -> sampler ``f(n, generator) -> (n, 2)``
DATASETS: dict[str, Callable[..., Tensor]] = {
    "swiss_roll": swiss_roll,
    "rings": rings,
    "gaussian_mixture": gaussian_mixture,
}


def get_dataset(name: str) -> Callable[..., Tensor]:
    """The data set sampler called ``name``; unknown names raise a ValueError listing the names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown toy2d data set {name!r}; choose one of "
                         f"{', '.join(DATASETS)}") from None


def make_data(name: str, n: int, seed: int) -> Tensor:
    """``n`` points of data set ``name`` drawn with ``torch.Generator().manual_seed(seed)``."""
    return get_dataset(name)(n, torch.Generator().manual_seed(seed))


#: RBF bandwidth of the sample-quality MMD² (the toy mixture's component standard deviation)
MMD_BANDWIDTH = 0.1


def quality(x: Tensor, ref: Tensor, seed: int = 0) -> dict[str, float]:
    """Sample quality against reference samples: unbiased MMD² (RBF kernel, bandwidth
    :data:`MMD_BANDWIDTH`) and sliced W2² (256 directions); both 0 for equal laws."""
    return {"mmd2": mmd_rbf(x, ref, MMD_BANDWIDTH).item(),
            "sw2": sliced_wasserstein(x, ref, n_proj=256, generator=rng.generator(seed)).item()}


@dataclass
class Toy2DTask:
    """``n`` points of the 2-D data set ``dataset`` drawn with ``seed``; samples are scored against
    as many fresh draws (seed + 1)."""

    name: ClassVar[str] = "toy2d"
    objectives: ClassVar[tuple[str, ...]] = ()
    dataset: str = "gaussian_mixture"
    n: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        get_dataset(self.dataset)
        _check_n(self.n)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2,)

    def data(self, n: int | None = None) -> Tensor:
        return make_data(self.dataset, self.n if n is None else n, self.seed)

    def reference_draws(self, n: int) -> Tensor:
        """``n`` fresh draws (seed + 1), the reference of :meth:`metrics`."""
        return make_data(self.dataset, n, self.seed + 1)

    def metrics(self, x: Tensor) -> dict[str, float]:
        """MMD² and SW2² of ``x`` against ``len(x)`` fresh draws (:func:`quality`)."""
        return quality(x, self.reference_draws(len(x)))

    def projection(self, objective: str | None, x: Tensor) -> tuple[Tensor, str, str]:
        return x.detach().double(), "x₁", "x₂"

    def exact_model(self) -> GaussianMixtureDenoiser:
        if self.dataset != "gaussian_mixture":
            raise ValueError(f"toy2d data set {self.dataset!r} has no exact denoiser; only "
                             "'gaussian_mixture' has")
        return gaussian_mixture_denoiser()
