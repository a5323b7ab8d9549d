"""Models: the contract and adapters (base), exact denoisers (analytic), trainable networks."""

from .analytic import (EmpiricalDenoiser, GaussianDenoiser, GaussianMixtureDenoiser,
                       SubspaceGaussianDenoiser)
from .base import PREDICTION_TYPES, VPModel, X0Model, sigma_like, x0_hat
from .conditional import ConditionalMLP
from .mlp import SigmaEmbedding, TimeMLP
from .unet import UNet

__all__ = ["GaussianDenoiser", "SubspaceGaussianDenoiser", "GaussianMixtureDenoiser",
           "EmpiricalDenoiser", "TimeMLP", "ConditionalMLP", "UNet", "SigmaEmbedding", "VPModel", "X0Model", "sigma_like",
           "x0_hat", "PREDICTION_TYPES"]
