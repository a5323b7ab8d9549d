"""SubspaceNet: the exact Gaussian denoiser as a special case, the orthonormal basis under
optimisation, the model-file round trip, and bad input."""

from __future__ import annotations

import pytest
import torch

import optidiff as od
from optidiff.models import SubspaceGaussianDenoiser, SubspaceNet

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _basis(dim: int, d: int, seed: int) -> torch.Tensor:
    return od.rng.haar_orthogonal(dim, od.rng.generator(seed))[:, :d].contiguous()


def _orthonormality_error(V: torch.Tensor) -> float:
    return (V.T @ V - torch.eye(V.shape[1], dtype=V.dtype)).abs().max().item()


@pytest.mark.parametrize("sigma_data,depth", [(1.0, 2), (0.7, 0), (2.5, 1)])
def test_with_V_equal_A_and_zero_correction_it_is_the_exact_gaussian_denoiser(sigma_data, depth):
    # x0 = A·u, u ~ N(0, s²I): the exact ε of models/analytic.py (eigen-decomposition form)
    torch.manual_seed(0)
    dim, d = 9, 3
    A = _basis(dim, d, 1)
    net = SubspaceNet(dim, d, hidden=16, depth=depth, emb_dim=8, sigma_data=sigma_data).double()
    with torch.no_grad():
        net.proj.weight = A  # torch's right_inverse: V becomes exactly A's columns
    torch.testing.assert_close(net.basis, A, rtol=0, atol=1e-15)
    exact = SubspaceGaussianDenoiser(A, sigma_data**2 * torch.eye(d, dtype=F64))
    g = od.rng.generator(2)
    x = 3 * torch.randn(6, dim, generator=g, dtype=F64)
    x_on = torch.randn(6, d, generator=g, dtype=F64) @ A.T
    for s in (1e-4, 0.01, 0.3, 1.0, 7.0, 80.0):
        sig = torch.tensor(s, dtype=F64)
        for pts in (x, x_on):  # both lose ~1e-16·|x|/σ in the off-subspace part x⊥/σ
            torch.testing.assert_close(net(pts, sig), exact(pts, sig), rtol=1e-10,
                                       atol=1e-13 * pts.abs().max().item() / s)
    per_sample = torch.tensor([1e-3, 0.1, 0.5, 1.0, 4.0, 50.0], dtype=F64)
    torch.testing.assert_close(net(x, per_sample), exact(x, per_sample), rtol=1e-10, atol=1e-9)
    # the denoised estimate on the subspace tends to the point itself as σ → 0 (no 0/0)
    tiny = torch.tensor(1e-8, dtype=F64)
    torch.testing.assert_close(od.models.x0_hat(net, x_on, tiny), x_on, rtol=0, atol=1e-12)


def test_linear_path_is_affine_in_the_latent():
    # F(h, σ) = M(σ)h + b(σ) + g(h, σ): with g = 0 (depth 0) F is affine in h for every σ
    torch.manual_seed(3)
    net = SubspaceNet(6, 2, depth=0, emb_dim=8).double()
    torch.nn.init.normal_(net.linear_path.weight)
    torch.nn.init.normal_(net.linear_path.bias)
    emb = net.embed(torch.tensor([0.3], dtype=F64))
    h1, h2 = torch.randn(1, 2, dtype=F64), torch.randn(1, 2, dtype=F64)
    f = lambda h: net.latent_residual(h, emb)
    torch.testing.assert_close(f(2 * h1 - h2), 2 * f(h1) - f(h2))
    assert not torch.allclose(f(h1), f(h2))


def test_basis_stays_orthonormal_under_optimizer_steps():
    torch.manual_seed(4)
    dim, d = 12, 3
    net = SubspaceNet(dim, d, hidden=16, depth=1, emb_dim=8)
    V0 = net.basis.clone()
    assert _orthonormality_error(V0) < 1e-6
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    A = _basis(dim, d, 5).float()
    g = od.rng.generator(6)
    for _ in range(40):
        x0 = torch.randn(64, d, generator=g) @ A.T
        sigma = torch.exp(torch.empty(64).uniform_(-4, 2, generator=g))
        loss = od.training.dsm_loss(net, x0, sigma, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (net.basis - V0).abs().max() > 0.1  # V moved …
    assert _orthonormality_error(net.basis) < 1e-5  # … and stayed orthonormal (float32)


def test_training_recovers_the_subspace_and_save_load_round_trips(tmp_path):
    # od.train (AdamW, EMA of a deep copy) learns V ≈ A from data x0 = A·u, u ~ N(0, I)
    dim, d = 8, 2
    A = _basis(dim, d, 7)
    data = (torch.randn(4096, d, generator=od.rng.generator(8), dtype=F64) @ A.T).float()
    with od.rng.seeded(9):
        net = SubspaceNet(dim, d, hidden=32, depth=1, emb_dim=16)
    angle_before = od.metrics.subspace_angles(net.basis, A).max().item()
    res = od.train(net, data, steps=400, batch_size=128, lr=1e-2, ema_decay=0.9,
                   schedule=od.schedules.LogLinearSchedule(0.01, 10.0, 100), progress=False)
    angles = od.metrics.subspace_angles(res.ema.basis, A)
    assert angle_before > 0.3 and angles.max() < 0.02, (angle_before, angles)
    assert _orthonormality_error(res.ema.basis) < 1e-5
    od.save_model(tmp_path / "m", res.ema)
    loaded = od.load_model(tmp_path / "m")
    assert isinstance(loaded, SubspaceNet) and loaded.config == res.ema.config
    x, sigma = torch.randn(5, dim), torch.rand(5) + 0.05
    assert torch.equal(loaded.basis, res.ema.basis)
    assert torch.equal(loaded(x, sigma), res.ema(x, sigma))


def test_weight_decay_on_the_householder_signs_is_an_error():
    torch.manual_seed(10)
    net = SubspaceNet(6, 2, hidden=8, depth=1, emb_dim=8)
    x = torch.randn(4, 6)
    net(x, torch.tensor(0.5))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    ((net(x, torch.tensor(0.5)) - x) ** 2).mean().backward()
    opt.step()
    with pytest.raises(ValueError, match="weight_decay"):
        net(x, torch.tensor(0.5))


def test_bad_input():
    with pytest.raises(ValueError, match="latent_dim"):
        SubspaceNet(4, 5)
    with pytest.raises(ValueError, match="latent_dim"):
        SubspaceNet(4, 0)
    with pytest.raises(ValueError, match="depth"):
        SubspaceNet(4, 2, depth=-1)
    with pytest.raises(ValueError, match="sigma_data"):
        SubspaceNet(4, 2, sigma_data=0.0)
    net = SubspaceNet(4, 2, hidden=8, depth=1, emb_dim=8)
    assert net.input_shape == (4,)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4\)"):
        net(torch.randn(3, 5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="sigma"):
        net(torch.randn(3, 4), torch.ones(2))
