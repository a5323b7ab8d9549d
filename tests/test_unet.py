"""The small U-Net ε-model: shapes, σ forms, class conditioning, config round trip, gradients."""

from __future__ import annotations

import json

import pytest
import torch

import optidiff as od
from optidiff.models.unet import UNet

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


CONFIGS = {
    "8x8": dict(image_size=8),
    "28x28": dict(image_size=28, channels=8, channel_mult=(1, 2, 2), groups=4),
    "32x32": dict(image_size=32, in_channels=3, channels=8, channel_mult=(1, 2, 2), groups=4,
                  attention=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_with_scalar_and_batched_sigma(name):
    torch.manual_seed(0)
    m = UNet(**CONFIGS[name]).eval()
    print(f"UNet {name}: {_n_params(m):,} parameters")
    x = torch.randn(2, *m.input_shape, generator=_gen(1))
    with torch.no_grad():
        e0 = m(x, torch.tensor(2.0))
        e1 = m(x, torch.tensor([2.0, 2.0], dtype=torch.float64))  # (B,) and another dtype
        e2 = m(x, torch.tensor([2.0, 0.1]))
    assert e0.shape == x.shape and e0.dtype == x.dtype
    torch.testing.assert_close(e0, e1)
    torch.testing.assert_close(e2[0], e0[0], rtol=1e-5, atol=1e-5)  # rows are independent
    assert (e2[1] - e0[1]).abs().max() > 1e-4  # and σ matters
    assert torch.isfinite(e2).all()


def test_input_scaling_and_config_round_trip():
    torch.manual_seed(0)
    m = UNet(image_size=8, channels=16, sigma_data=0.5, num_classes=3).eval()
    cfg = m.config
    assert json.loads(json.dumps(cfg)) == cfg
    copy = UNet(**cfg).eval()
    copy.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 8, 8, generator=_gen(2))
    with torch.no_grad():
        torch.testing.assert_close(copy(x, torch.tensor(1.5), torch.tensor([0, 1, -1])),
                                   m(x, torch.tensor(1.5), torch.tensor([0, 1, -1])))
    assert UNet(image_size=(8, 12)).input_shape == (1, 8, 12)
    with pytest.raises(ValueError, match="groups"):
        UNet(channels=12, groups=8)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(3, 1, 9, 9), torch.tensor(1.0))


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    m = UNet(image_size=8, channels=16, num_classes=4).eval()
    x = torch.randn(3, 1, 8, 8, generator=_gen(3))
    sig = torch.tensor(1.0)
    with torch.no_grad():
        null = m(x, sig)
        torch.testing.assert_close(m(x, sig, torch.tensor([-1, -1, -1])), null)
        a, b = m(x, sig, torch.tensor([0, 1, -1])), m(x, sig, torch.tensor([2, 1, 3]))
    torch.testing.assert_close(a[2], null[2])  # per-row labels
    torch.testing.assert_close(a[1], b[1])
    assert (a[0] - b[0]).abs().max() > 1e-4 and (a[0] - null[0]).abs().max() > 1e-4


def test_gradients_flow_and_a_few_steps_fit_a_batch():
    torch.manual_seed(0)
    m = UNet(image_size=8, channels=16, num_classes=2)
    x0 = torch.randn(8, 1, 8, 8, generator=_gen(4)).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=_gen(5))
    sigma = torch.exp(torch.randn(8, generator=_gen(6)))
    labels = torch.tensor([0, 1] * 4)
    x = (x0 + sigma.view(-1, 1, 1, 1) * noise).requires_grad_(True)
    loss = ((m(x, sigma, labels) - noise) ** 2).mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # the denoising loss on a fixed batch goes down under Adam
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = ((m(x.detach(), sigma, labels) - noise) ** 2).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first, (first, loss.item())


def test_samples_with_od_sample():
    torch.manual_seed(0)
    m = UNet(image_size=8, channels=16).eval()
    sigmas = od.LogLinearSchedule(0.02, 10.0, 100).sample_sigmas(4)
    out = od.sample(m, sigmas, batch_size=2, sampler="ge", generator=_gen(7))
    again = od.sample(m, sigmas, batch_size=2, sampler="ge", generator=_gen(7))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out, again)
