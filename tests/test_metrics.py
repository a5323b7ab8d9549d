"""Tests of optidiff.metrics against closed forms and independent references."""

import math

import numpy as np
import pytest
import torch

from optidiff import metrics as M


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _orth(d, seed=0):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _rand_cov(d, seed=0, rank=None):
    g = _gen(seed)
    b = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return b @ b.T / d


# ------------------------------------------------------------------------------ gaussian_w2

def test_gaussian_w2_commuting_covariances_closed_form():
    # C1 = U diag(λ1) Uᵀ, C2 = U diag(λ2) Uᵀ commute: W2² = ‖m1 − m2‖² + Σ(√λ1 − √λ2)²
    d = 7
    u = _orth(d, 1)
    lam1 = torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    lam2 = torch.linspace(2.0, 0.0, d, dtype=torch.float64)  # includes a zero eigenvalue
    m1 = torch.randn(d, generator=_gen(2), dtype=torch.float64)
    m2 = torch.randn(d, generator=_gen(3), dtype=torch.float64)
    c1, c2 = u @ torch.diag(lam1) @ u.T, u @ torch.diag(lam2) @ u.T
    c1, c2 = (c1 + c1.T) / 2, (c2 + c2.T) / 2
    expected = ((m1 - m2) ** 2).sum() + ((lam1.sqrt() - lam2.sqrt()) ** 2).sum()
    # float64 eigh/sqrt of a matrix with an exact zero eigenvalue: good to ~1e-8 relative on
    # every math library (MKL's AVX-512 path gives 2.7e-9), not to 1e-10
    assert M.gaussian_w2(m1, c1, m2, c2).item() == pytest.approx(expected.item(), rel=1e-8)


def test_gaussian_w2_one_dimensional():
    # N(a, s²) vs N(b, t²): W2² = (a − b)² + (s − t)²
    for a, s, b, t in [(0.0, 1.0, 0.0, 2.0), (1.5, 0.3, -2.0, 0.7), (0.2, 0.0, 0.1, 1.1)]:
        f64 = {"dtype": torch.float64}
        got = M.gaussian_w2(torch.tensor([a], **f64), torch.tensor([[s * s]], **f64),
                            torch.tensor([b], **f64), torch.tensor([[t * t]], **f64))
        assert got.item() == pytest.approx((a - b) ** 2 + (s - t) ** 2, rel=1e-12, abs=1e-14)


def test_gaussian_w2_matches_sqrtm_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 6
    c1, c2 = _rand_cov(d, 4), _rand_cov(d, 5)
    m1 = torch.randn(d, generator=_gen(6), dtype=torch.float64)
    m2 = torch.randn(d, generator=_gen(7), dtype=torch.float64)
    a, b = c1.numpy(), c2.numpy()
    ref = (((m1 - m2).numpy() ** 2).sum() + np.trace(a + b)
           - 2 * np.trace(scipy_linalg.sqrtm(a @ b)).real)
    assert M.gaussian_w2(m1, c1, m2, c2).item() == pytest.approx(ref, rel=1e-8)


def test_gaussian_w2_symmetric_zero_and_triangle():
    d = 5
    m = [torch.randn(d, generator=_gen(i), dtype=torch.float64) for i in range(3)]
    c = [_rand_cov(d, 10 + i, rank=3 if i == 0 else None) for i in range(3)]  # one singular
    w = {(i, j): M.gaussian_w2(m[i], c[i], m[j], c[j]).item() for i in range(3) for j in range(3)}
    # a singular covariance costs √(rounding) ≈ 1e-8 in tr(·)^½: the tolerance reflects that
    for i in range(3):
        assert w[i, i] == pytest.approx(0.0, abs=1e-7)
        for j in range(3):
            assert w[i, j] == pytest.approx(w[j, i], rel=1e-7)
            if i != j:
                assert w[i, j] > 1e-3
    # W2 (not squared) is a metric
    r = {k: math.sqrt(v) for k, v in w.items()}
    assert r[0, 2] <= r[0, 1] + r[1, 2] + 1e-9


def test_gaussian_w2_degenerate_point_mass():
    # N(0, 0) vs N(0, C): W2² = tr(C)
    d = 4
    c = _rand_cov(d, 3)
    zero = torch.zeros(d, dtype=torch.float64)
    got = M.gaussian_w2(zero, torch.zeros(d, d), zero, c)
    assert got.item() == pytest.approx(torch.trace(c).item(), rel=1e-8)


def test_gaussian_w2_bad_input():
    d = 3
    m, c = torch.zeros(d), torch.eye(d)
    with pytest.raises(ValueError, match="m1"):
        M.gaussian_w2(torch.zeros(d, 1), c, m, c)
    with pytest.raises(ValueError, match="same shape"):
        M.gaussian_w2(m, c, torch.zeros(d + 1), torch.eye(d + 1))
    with pytest.raises(ValueError, match="C2 must have shape"):
        M.gaussian_w2(m, c, m, torch.eye(d + 1))
    with pytest.raises(ValueError, match="C1 must be symmetric"):
        M.gaussian_w2(m, torch.triu(torch.ones(d, d)), m, c)
    with pytest.raises(ValueError, match="positive semi-definite"):
        M.gaussian_w2(m, -torch.eye(d), m, c)
    with pytest.raises(ValueError, match="non-finite"):
        M.gaussian_w2(torch.tensor([0.0, float("nan"), 0.0]), c, m, c)


# ------------------------------------------------------------------ sample_w2 / frechet

def test_sample_w2_is_gaussian_w2_of_empirical_moments():
    x = torch.randn(400, 5, generator=_gen(1)) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]) + 1.0
    m, c = torch.zeros(5), _rand_cov(5, 2)
    xm = x.double().numpy()
    ref = M.gaussian_w2(torch.from_numpy(xm.mean(0)), torch.from_numpy(np.cov(xm, rowvar=False)),
                        m, c)
    assert M.sample_w2_to_gaussian(x, m, c).item() == pytest.approx(ref.item(), rel=1e-8)


def test_sample_w2_converges_to_zero_for_target_samples():
    d = 8
    c = _rand_cov(d, 3)
    lc = torch.linalg.cholesky(c)
    small = M.sample_w2_to_gaussian(torch.randn(200, d, generator=_gen(4), dtype=torch.float64)
                                    @ lc.T, torch.zeros(d), c).item()
    large = M.sample_w2_to_gaussian(torch.randn(40000, d, generator=_gen(5), dtype=torch.float64)
                                    @ lc.T, torch.zeros(d), c).item()
    assert large < small / 20  # Monte-Carlo floor shrinks like 1/N
    assert large < 5e-3
    shifted = M.sample_w2_to_gaussian(torch.randn(40000, d, generator=_gen(5), dtype=torch.float64)
                                      @ lc.T + 1.0, torch.zeros(d), c).item()
    assert shifted == pytest.approx(d, rel=0.01)  # ‖shift‖² = d dominates


def test_sample_w2_bad_shapes():
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\)"):
        M.sample_w2_to_gaussian(torch.zeros(10), torch.zeros(1), torch.eye(1))
    with pytest.raises(ValueError, match="dimension"):
        M.sample_w2_to_gaussian(torch.zeros(10, 3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.sample_w2_to_gaussian(torch.zeros(1, 2), torch.zeros(2), torch.eye(2))


def test_frechet_distance_equals_gaussian_w2_and_fid_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    fx = torch.randn(300, 6, generator=_gen(1)) @ torch.randn(6, 6, generator=_gen(2))
    fy = torch.randn(250, 6, generator=_gen(3)) * 1.3 + 0.4
    a, b = fx.double().numpy(), fy.double().numpy()
    ma, mb, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w2 = M.gaussian_w2(torch.from_numpy(ma), torch.from_numpy(ca), torch.from_numpy(mb),
                       torch.from_numpy(cb)).item()
    # pytorch-fid's calculate_frechet_distance
    fid = ((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(
        scipy_linalg.sqrtm(ca @ cb).real)
    got = M.frechet_distance(fx, fy).item()
    assert got == pytest.approx(w2, rel=1e-8)
    assert got == pytest.approx(fid, rel=1e-8)
    # a matrix square root is good to ~1e-8 relative: compare with the traces it cancels
    assert M.frechet_distance(fx, fx).item() == pytest.approx(0.0, abs=1e-8 * 2 * np.trace(ca))
    with pytest.raises(ValueError, match="feature dimension"):
        M.frechet_distance(fx, fy[:, :5])
    with pytest.raises(ValueError, match="feat_x"):
        M.frechet_distance(fx[0], fy)


# -------------------------------------------------------------------------- sliced W2

def test_sliced_w2_of_a_shift_is_norm_squared_over_dim():
    # y = x + v: the projection onto θ shifts every point by θᵀv, so the sorted order is kept and
    # each direction gives W2² = (θᵀv)² exactly. For θ uniform on the sphere E[θθᵀ] = I/D, hence
    # SW2² = vᵀ E[θθᵀ] v = ‖v‖²/D. With ‖v‖ = r, (θᵀv)²/r² ~ Beta(½, (D−1)/2), whose variance is
    # 2(D−1)/(D²(D+2)); the estimator averages n_proj such terms.
    d, n_proj = 8, 4000
    x = torch.randn(500, d, generator=_gen(1))
    v = torch.randn(d, generator=_gen(2)) * 2
    r2 = (v.double() ** 2).sum().item()
    got = M.sliced_wasserstein(x, x + v, n_proj=n_proj, generator=_gen(3)).item()
    std = r2 * math.sqrt(2 * (d - 1) / (d * d * (d + 2)) / n_proj)
    assert abs(got - r2 / d) < 5 * std
    # 1-D: the only directions are ±1, so SW2² = v² exactly
    x1 = torch.randn(300, 1, generator=_gen(4), dtype=torch.float64)
    assert M.sliced_wasserstein(x1, x1 - 0.7, n_proj=3, generator=_gen(5)).item() == \
        pytest.approx(0.49, rel=1e-12)


def _exact_w2_1d(a, b):
    """Exact W2² between two uniform empirical measures on the line (merged quantile breakpoints)."""
    a, b = np.sort(a), np.sort(b)
    qs = np.union1d(np.arange(len(a) + 1) / len(a), np.arange(len(b) + 1) / len(b))
    mid = (qs[1:] + qs[:-1]) / 2
    ia = np.minimum((mid * len(a)).astype(int), len(a) - 1)
    ib = np.minimum((mid * len(b)).astype(int), len(b) - 1)
    return float(((a[ia] - b[ib]) ** 2 * np.diff(qs)).sum())


def test_sliced_w2_unequal_sizes_matches_exact_1d():
    g = _gen(6)
    a = torch.randn(700, 1, generator=g, dtype=torch.float64)
    b = torch.randn(1100, 1, generator=g, dtype=torch.float64) * 1.5 + 0.3
    exact = _exact_w2_1d(a[:, 0].numpy(), b[:, 0].numpy())
    got = M.sliced_wasserstein(a, b, n_proj=2, generator=_gen(0)).item()
    assert got == pytest.approx(exact, rel=0.03)
    # equal sizes: identical to the exact value
    b2 = b[:700]
    assert M.sliced_wasserstein(a, b2, n_proj=1, generator=_gen(0)).item() == pytest.approx(
        _exact_w2_1d(a[:, 0].numpy(), b2[:, 0].numpy()), rel=1e-12)


def test_sliced_w2_same_vs_different_and_reproducible():
    g = _gen(7)
    x = torch.randn(2000, 3, generator=g)
    y = torch.randn(2000, 3, generator=g)
    z = torch.randn(2000, 3, generator=g) * 2
    same = M.sliced_wasserstein(x, y, generator=_gen(1)).item()
    diff = M.sliced_wasserstein(x, z, generator=_gen(1)).item()
    assert 0 <= same < 0.01 and diff > 0.5  # ≈ (2 − 1)² = 1 per direction for N(0, I) vs N(0, 4I)
    assert M.sliced_wasserstein(x, z, generator=_gen(1)).item() == diff
    with pytest.raises(ValueError, match="same dimension"):
        M.sliced_wasserstein(x, z[:, :2])
    with pytest.raises(ValueError, match="n_proj"):
        M.sliced_wasserstein(x, z, n_proj=0)
    with pytest.raises(ValueError, match=r"y must have shape \(N, D\)"):
        M.sliced_wasserstein(x, z[0])


# -------------------------------------------------------------------------------- MMD

def _mmd_reference(x, y, h):
    x, y = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h))
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * k(x, y).mean()).item()


def test_mmd_matches_reference_and_chunking():
    g = _gen(8)
    x, y = torch.randn(120, 3, generator=g), torch.randn(90, 3, generator=g) + 0.5
    ref = _mmd_reference(x, y, 1.3)
    assert M.mmd_rbf(x, y, 1.3).item() == pytest.approx(ref, rel=1e-9)
    assert M.mmd_rbf(x, y, 1.3, chunk=7).item() == pytest.approx(ref, rel=1e-9)
    # median heuristic: bandwidth = median pooled pairwise distance
    pooled = torch.cat([x, y]).double()
    dist = torch.pdist(pooled)
    h = dist.median().item()
    assert M.mmd_rbf(x, y).item() == pytest.approx(_mmd_reference(x, y, h), rel=1e-9)


def test_mmd_same_distribution_near_zero_different_positive():
    g = _gen(9)
    x, y = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    z = torch.randn(1000, 2, generator=g) + torch.tensor([1.0, 0.0])
    same, diff = M.mmd_rbf(x, y).item(), M.mmd_rbf(x, z).item()
    assert abs(same) < 0.005
    assert diff > 0.05
    assert diff > 20 * abs(same)
    with pytest.raises(ValueError, match="bandwidth"):
        M.mmd_rbf(x, y, bandwidth=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        M.mmd_rbf(x[:1], y)
    with pytest.raises(ValueError, match="same dimension"):
        M.mmd_rbf(x, torch.randn(10, 3))


# ---------------------------------------------------------------------- off-subspace ratio

def test_off_subspace_ratio_constructed_points():
    D, d = 10, 3
    q = _orth(D, 11)
    A, B = q[:, :d], q[:, d:]
    g = _gen(12)
    a = torch.randn(4, d, generator=g, dtype=torch.float64)
    b = torch.randn(4, D - d, generator=g, dtype=torch.float64)
    ratios = torch.tensor([0.0, 0.5, 1.0, 9.0], dtype=torch.float64)
    on = a / a.norm(dim=1, keepdim=True) * 2.0                       # ‖x∥‖ = 2
    off = b / b.norm(dim=1, keepdim=True) * (2.0 * ratios[:, None])  # ‖x⊥‖ = 2·ratio
    x = on @ A.T + off @ B.T
    per = M.off_subspace_ratio(x, A, reduction="none")
    assert torch.allclose(per, ratios, atol=1e-12)
    assert M.off_subspace_ratio(x, A).item() == pytest.approx(ratios.mean().item(), abs=1e-12)
    with pytest.raises(ValueError, match="orthonormal"):
        M.off_subspace_ratio(x, 2 * A)
    with pytest.raises(ValueError, match="A must have shape"):
        M.off_subspace_ratio(x, A[:5])
    with pytest.raises(ValueError, match="reduction"):
        M.off_subspace_ratio(x, A, reduction="sum")


# ---------------------------------------------------------------------- principal angles

@pytest.mark.parametrize("angles", [(0.3, 1.2), (1e-9, 0.05), (0.0, math.pi / 2)])
def test_subspace_angles_closed_form_rotation(angles):
    # span(e1, e3) against its image under rotations by a in the (e1, e2) plane and by b in the
    # (e3, e4) plane: the principal angles are exactly a and b. A random orthogonal change of
    # coordinates and non-orthonormal bases of the same spaces must not change them.
    D = 7
    a, b = angles
    e = torch.eye(D, dtype=torch.float64)
    V = torch.stack([e[0], e[2]], 1)
    A = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[1],
                     math.cos(b) * e[2] + math.sin(b) * e[3]], 1)
    Q = _orth(D, 21)
    mix = torch.tensor([[2.0, 0.3], [-0.5, 1.0]], dtype=torch.float64)
    got = M.subspace_angles(Q @ V @ mix, Q @ A)
    assert got.dtype == torch.float64
    expected = torch.tensor(sorted(angles), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(M.subspace_angles(Q @ A, Q @ V), expected, rtol=1e-6, atol=1e-14)


def test_subspace_angles_matches_scipy_and_unequal_dimensions():
    from scipy.linalg import subspace_angles

    g = _gen(22)
    V = torch.randn(9, 3, generator=g, dtype=torch.float64)
    A = torch.randn(9, 5, generator=g, dtype=torch.float64)
    got = M.subspace_angles(V, A)
    assert got.shape == (3,)
    ref = torch.from_numpy(np.sort(subspace_angles(V.numpy(), A.numpy())))
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)  # SVDs: ~1e-8 across CPUs
    # a subspace of span(A): all angles 0
    inside = A @ torch.randn(5, 2, generator=g, dtype=torch.float64)
    assert M.subspace_angles(inside, A).abs().max() < 1e-7


def test_subspace_angles_bad_input():
    V = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"A must have shape \(D, k\) with D=6"):
        M.subspace_angles(V, torch.randn(5, 2))
    with pytest.raises(ValueError, match="V must have shape"):
        M.subspace_angles(torch.randn(6), V)
    with pytest.raises(ValueError, match="V must have shape"):
        M.subspace_angles(torch.randn(2, 3), V)
    with pytest.raises(ValueError, match="linearly independent"):
        M.subspace_angles(torch.cat([V[:, :1], 2 * V[:, :1]], 1), V)
    with pytest.raises(ValueError, match="non-finite"):
        M.subspace_angles(V, torch.full((6, 2), math.nan))
