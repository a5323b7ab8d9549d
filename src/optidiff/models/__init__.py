"""Models: the contract and adapters (base), exact denoisers (analytic), trainable networks
(mlp, subspace, conditional, unet, classifiers) and the registry that saves and loads them
(registry).

``optidiff.models.diffusers`` (the diffusers adapters) is imported explicitly, never from here.
"""

from .analytic import (
                       EmpiricalDenoiser,
                       GaussianDenoiser,
                       GaussianMixtureDenoiser,
                       KroneckerGaussianDenoiser,
                       SubspaceGaussianDenoiser,
)
from .base import PREDICTION_TYPES, VPModel, X0Model, sigma_like, x0_hat
from .classifiers import DigitClassifier, NoiseConditionalClassifier, train_classifier
from .conditional import ConditionalMLP
from .mlp import SigmaEmbedding, TimeMLP
from .registry import load_model, model_from_config, model_to_config, register_model, save_model
from .subspace import SubspaceNet
from .transformer import SequenceTransformer
from .unet import UNet
from .unrolled import UnrolledScoreNet

__all__ = ["PREDICTION_TYPES", "ConditionalMLP", "DigitClassifier", "EmpiricalDenoiser",
           "GaussianDenoiser", "GaussianMixtureDenoiser", "KroneckerGaussianDenoiser",
           "NoiseConditionalClassifier", "SequenceTransformer", "SigmaEmbedding",
           "SubspaceGaussianDenoiser", "SubspaceNet", "TimeMLP", "UNet", "UnrolledScoreNet",
           "VPModel", "X0Model", "load_model", "model_from_config", "model_to_config",
           "register_model", "save_model",
           "sigma_like", "train_classifier", "x0_hat"]
