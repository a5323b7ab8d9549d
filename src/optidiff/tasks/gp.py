"""The ``gp`` task: Gaussian-process sequences, the "sequence data with dependencies" of Wang &
Chen's tutorial ("Probabilistic foundation and opportunities of diffusion models", the section on
sequence data), whose theory is Fu, Dou, Guo, Wang & Chen, "Diffusion transformer captures
spatial-temporal dependencies: a theory for Gaussian process data" (ICLR 2025).

Data: a sequence of N tokens ``x_i ∈ R^D`` at sampling times ``h_i = i·spacing``, stacked as
``X = (x_1, …, x_N) ∈ R^{N·D}`` (index ``i·D + d``: ``X.view(B, N, D)`` are the tokens), with

    X ~ N(μ_stack, Γ ⊗ Λ),   Γ_ij = g(|h_i − h_j|),   μ_stack = (μ(h_1)·1_D, …, μ(h_N)·1_D)

(Fu et al., §2: a stationary temporal kernel times a spatial covariance Λ). Kernels g (τ ≥ 0,
length scale ℓ, g(0) = 1):

- ``"se"`` squared-exponential ``exp(−τ²/(2ℓ²))``;
- ``"ou"`` Ornstein–Uhlenbeck (Matérn-½) ``exp(−τ/ℓ)``;
- ``"matern32"`` Matérn-3/2 ``(1 + √3τ/ℓ)·exp(−√3τ/ℓ)``.

Λ is ``spatial`` (D×D, symmetric positive definite) or, by default, the equicorrelation matrix
``0.4·I + 0.6·11ᵀ`` (for D = 2: [[1, .6], [.6, 1]]); the mean is ``μ(h) = a·sin(2πh/period)``
(``mean_amplitude`` a, default 0). The law, its exact denoiser (the structured Kronecker solve of
:class:`~optidiff.models.KroneckerGaussianDenoiser`) and exact draws are all closed form, so
every metric is measured against the truth:

- ``w2_rel``: W2² between the moment-matched Gaussian of the samples and the true law, divided by
  ``tr(Γ⊗Λ)`` (the W2² of a point mass at μ), :func:`optidiff.metrics.sample_w2_to_gaussian`;
  its floor for exact draws grows like (N·D)²/n_samples;
- ``autocov_error``: the mean over lags k = 0…⌊N/2⌋ of ``‖Ĉ_k − g(k·spacing)Λ‖_F / ‖Λ‖_F``, with
  Ĉ_k the lag-k autocovariance of the samples (centred at the per-position sample mean, averaged
  over the N − k position pairs);
- :meth:`GPTask.score_error`: the excess DSM loss ``E‖ε̂(x, σ) − ε*(x, σ)‖²/(N·D)`` against the
  exact ε* at each σ (the DSM loss minus its irreducible part), the clean signal of training.

Draws are not cached: an exact draw is one matrix product. Conditioning on linear observations
(forecasting, in-filling, a window mean) is closed form too: :meth:`GPTask.conditional`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import rng
from ..metrics import sample_w2_to_gaussian
from ..models import GaussianDenoiser, KroneckerGaussianDenoiser

__all__ = ["KERNELS", "GPTask", "gaussian_conditional", "kernel"]

KERNELS = ("se", "ou", "matern32")


def kernel(name: str, tau: Tensor, lengthscale: float) -> Tensor:
    """The stationary kernel g(τ) called ``name`` (see the module docstring), g(0) = 1."""
    r = torch.as_tensor(tau, dtype=torch.float64).abs() / lengthscale
    if name == "se":
        return torch.exp(-0.5 * r**2)
    if name == "ou":
        return torch.exp(-r)
    if name == "matern32":
        return (1 + math.sqrt(3) * r) * torch.exp(-math.sqrt(3) * r)
    raise ValueError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}")


def gaussian_conditional(mean: Tensor, cov: Tensor, P: Tensor, y: Tensor, noise_std: float
                         ) -> tuple[Tensor, Tensor]:
    """Mean and covariance of x ~ N(mean, cov) given ``y = P x + N(0, noise_std²·I)``:

        m_c = m + ΣPᵀ(PΣPᵀ + s²I)⁻¹(y − Pm),   Σ_c = Σ − ΣPᵀ(PΣPᵀ + s²I)⁻¹PΣ

    (the Gaussian conditioning formula; Lemma 1 of Guo et al., NeurIPS 2024, is its score form).
    ``P`` (m, D) or (D,) for one observation; float64."""
    mean, cov = mean.double(), cov.double()
    P = torch.as_tensor(P, dtype=torch.float64).reshape(-1, len(mean))
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if y.shape != (len(P),):
        raise ValueError(f"y must hold {len(P)} observations, got shape {tuple(y.shape)}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    sp = cov @ P.T
    S = P @ sp + noise_std**2 * torch.eye(len(P), dtype=torch.float64)
    k = torch.linalg.solve(S, sp.T).T                          # ΣPᵀ S⁻¹
    c = cov - k @ sp.T
    return mean + k @ (y - P @ mean), (c + c.T) / 2


@dataclass
class GPTask:
    """Seeded GP-sequence task (module docstring): ``length`` N tokens of dimension ``dim`` D."""

    name: ClassVar[str] = "gp"
    objectives: ClassVar[tuple[str, ...]] = ()
    plot_metrics: ClassVar[tuple[tuple[str, str], ...]] = ()
    length: int = 32
    dim: int = 2
    kernel: str = "ou"
    lengthscale: float = 4.0
    spacing: float = 1.0
    spatial: list[list[float]] | None = None
    mean_amplitude: float = 0.0
    mean_period: float = 16.0
    n: int = 16_384
    seed: int = 0
    gamma: Tensor = field(init=False, repr=False)
    lam: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for k in ("length", "dim", "n"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {k}={v!r}")
        for k in ("lengthscale", "spacing", "mean_period"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be positive and finite, got {k}={v!r}")
        if not math.isfinite(self.mean_amplitude):
            raise ValueError(f"mean_amplitude must be finite, got {self.mean_amplitude!r}")
        rng.check_seed(self.seed)
        tau = self.times[:, None] - self.times[None, :]
        self.gamma = kernel(self.kernel, tau, self.lengthscale)
        if self.spatial is None:
            D = self.dim
            self.lam = 0.4 * torch.eye(D, dtype=torch.float64) + 0.6 * torch.ones(D, D,
                                                                                 dtype=torch.float64)
        else:
            lam = torch.as_tensor(self.spatial, dtype=torch.float64)
            if lam.shape != (self.dim, self.dim) or not torch.allclose(lam, lam.T):
                raise ValueError(f"spatial must be a symmetric {self.dim}×{self.dim} matrix, got "
                                 f"spatial={self.spatial!r}")
            if torch.linalg.eigvalsh(lam).min() <= 0:
                raise ValueError(f"spatial must be positive definite, got spatial={self.spatial!r}")
            self.lam = lam

    # ------------------------------------------------------------------ the law
    @property
    def times(self) -> Tensor:
        """Sampling times h_i = i·spacing, i = 0…N−1 (float64)."""
        return self.spacing * torch.arange(self.length, dtype=torch.float64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.length * self.dim,)

    @property
    def sequence_shape(self) -> tuple[int, int]:
        """(N, D): ``x.view(-1, N, D)`` are the tokens."""
        return (self.length, self.dim)

    @property
    def data_scale(self) -> float:
        """Per-coordinate standard deviation of the data, √(mean diag Λ) (g(0) = 1)."""
        return math.sqrt(self.lam.diagonal().mean().item())

    @property
    def mean(self) -> Tensor:
        """μ_stack (N·D,), float64."""
        m = self.mean_amplitude * torch.sin(2 * math.pi * self.times / self.mean_period)
        return m[:, None].expand(self.length, self.dim).reshape(-1).clone()

    @property
    def cov(self) -> Tensor:
        """Γ⊗Λ (N·D × N·D), float64."""
        return torch.kron(self.gamma, self.lam)

    def kernel_values(self, lags: Tensor | None = None) -> Tensor:
        """g(k·spacing) at the integer ``lags`` (default 0…N−1)."""
        lags = torch.arange(self.length) if lags is None else torch.as_tensor(lags)
        return kernel(self.kernel, lags.double() * self.spacing, self.lengthscale)

    def exact_model(self) -> KroneckerGaussianDenoiser:
        """The exact denoiser of the law (structured Kronecker solve)."""
        return KroneckerGaussianDenoiser(self.mean, self.gamma, self.lam)

    def sample_exact(self, n: int, generator: torch.Generator | int,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` exact draws ``M + U√a·Z·√b Vᵀ`` (Γ = U diag(a) Uᵀ, Λ = V diag(b) Vᵀ, Z iid
        N(0, 1) of shape (n, N, D)), flattened to (n, N·D)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got n={n!r}")
        g = rng.generator(generator)
        a, u = torch.linalg.eigh(self.gamma)
        b, v = torch.linalg.eigh(self.lam)
        z = torch.randn(n, self.length, self.dim, generator=g, dtype=torch.float64)
        x = (u * a.clamp(min=0).sqrt()) @ z @ (v * b.sqrt()).T
        return (x.reshape(n, -1) + self.mean).to(dtype)

    def data(self, n: int | None = None) -> Tensor:
        """The first ``n`` (default ``self.n``) training sequences (seed ``seed``)."""
        return self.sample_exact(self.n if n is None else n, rng.derive_seed("gp", self.seed))

    def reference_draws(self, n: int) -> Tensor:
        """``n`` fresh exact draws, independent of :meth:`data`."""
        return self.sample_exact(n, rng.derive_seed("gp-reference", self.seed))

    def conditional(self, P: Tensor, y: Tensor, noise_std: float) -> GaussianDenoiser:
        """The exact denoiser of the law given ``y = P x0 + N(0, noise_std²I)``
        (:func:`gaussian_conditional`): forecasting (P selects the last tokens), in-filling
        (a gap) or a window mean (one row of P)."""
        m, c = gaussian_conditional(self.mean, self.cov, P, y, noise_std)
        return GaussianDenoiser(m, c)

    def window_mean(self, start: int, stop: int, coord: int | None = None) -> Tensor:
        """The vector g with ``gᵀx`` = the mean of tokens ``start:stop`` (of coordinate
        ``coord``, or of all coordinates), shape (N·D,), float64."""
        if not 0 <= start < stop <= self.length:
            raise ValueError(f"need 0 <= start < stop <= length={self.length}, got {start}:{stop}")
        w = torch.zeros(self.length, self.dim, dtype=torch.float64)
        if coord is None:
            w[start:stop] = 1.0 / ((stop - start) * self.dim)
        else:
            if not 0 <= coord < self.dim:
                raise ValueError(f"coord must be in [0, {self.dim}), got {coord}")
            w[start:stop, coord] = 1.0 / (stop - start)
        return w.reshape(-1)

    def observe(self, positions: Any) -> Tensor:
        """The selection matrix P (len(positions)·D, N·D) of tokens ``positions``."""
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= self.length:
            raise ValueError(f"positions must be in [0, {self.length}), got {positions!r}")
        cols = (idx[:, None] * self.dim + torch.arange(self.dim)).reshape(-1)
        return torch.eye(self.length * self.dim, dtype=torch.float64)[cols]

    # ------------------------------------------------------------------ metrics
    def _tokens(self, x: Tensor) -> Tensor:
        x = x.detach().double().reshape(len(x), -1)
        if x.shape[1] != self.length * self.dim:
            raise ValueError(f"samples must have N·D = {self.length * self.dim} coordinates, got "
                             f"shape {tuple(x.shape)}")
        return x.view(len(x), self.length, self.dim)

    def autocovariance(self, x: Tensor, max_lag: int | None = None) -> Tensor:
        """Lag-k autocovariances Ĉ_k (k = 0…max_lag, default ⌊N/2⌋) of samples, (K+1, D, D)."""
        t = self._tokens(x)
        if len(t) < 2:
            raise ValueError(f"need at least 2 samples, got {len(t)}")
        t = t - t.mean(0)
        K = self.length // 2 if max_lag is None else max_lag
        if not 0 <= K < self.length:
            raise ValueError(f"max_lag must be in [0, {self.length}), got {max_lag}")
        return torch.stack([torch.einsum("bid,bie->de", t[:, :self.length - k], t[:, k:])
                            / ((len(t) - 1) * (self.length - k)) for k in range(K + 1)])

    def true_autocovariance(self, max_lag: int | None = None) -> Tensor:
        """g(k·spacing)·Λ, k = 0…max_lag (default ⌊N/2⌋), (K+1, D, D)."""
        K = self.length // 2 if max_lag is None else max_lag
        return self.kernel_values(torch.arange(K + 1))[:, None, None] * self.lam

    def autocov_error(self, x: Tensor) -> float:
        """Mean over lags 0…⌊N/2⌋ of ‖Ĉ_k − g(k·spacing)Λ‖_F / ‖Λ‖_F."""
        err = (self.autocovariance(x) - self.true_autocovariance()).flatten(1).norm(dim=1)
        return (err / self.lam.norm()).mean().item()

    def w2_rel(self, x: Tensor) -> float:
        """W2²(moment-matched Gaussian of ``x``, true law) / tr(Γ⊗Λ)."""
        w2 = sample_w2_to_gaussian(x.detach().reshape(len(x), -1), self.mean, self.cov)
        return (w2 / (self.gamma.trace() * self.lam.trace())).item()

    def metrics(self, x: Tensor) -> dict[str, float]:
        """``w2_rel`` and ``autocov_error`` of samples (module docstring)."""
        return {"w2_rel": self.w2_rel(x), "autocov_error": self.autocov_error(x)}

    @torch.no_grad()
    def score_error(self, model: Any, sigmas: Any, *, n: int = 2048, seed: int = 0,
                    batch_size: int = 1024, x0: Tensor | None = None) -> Tensor:
        """Excess DSM loss ``E‖model(x, σ) − ε*(x, σ)‖²/(N·D)`` at each σ of ``sigmas``, x = x0 +
        σε with x0 ``n`` exact draws or the given clean sequences ``x0`` (e.g. training rows, for
        the generalisation gap), noise seeded by ``seed``; (len(sigmas),) float64."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        if len(sigmas) == 0 or not (sigmas > 0).all():
            raise ValueError(f"sigmas must be positive, got {sigmas.tolist()}")
        exact = self.exact_model()
        g = rng.generator(rng.derive_seed("gp-score", self.seed, seed))
        if x0 is None:
            x0 = self.sample_exact(n, g, torch.float64)
        else:
            x0 = self._tokens(x0).reshape(len(x0), -1)
            n = len(x0)
        p = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
        dtype = p.dtype if p is not None else torch.float64
        out = []
        for s in sigmas:
            x = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            tot = 0.0
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size]
                e = model(xb.to(dtype), s.to(dtype)).double()
                tot += ((e - exact(xb, s)) ** 2).sum().item()
            out.append(tot / x.numel())
        return torch.tensor(out, dtype=torch.float64)

    # ------------------------------------------------------------------ report figures
    def figures(self, x: Tensor, model: Any = None, *, n_paths: int = 6) -> dict[str, Any]:
        """Report figures: sample paths next to exact draws (coordinate 0), the autocovariance
        curve against g(k·spacing)Λ, and, for a model with ``attention_maps``, the attention
        against |i − j| next to the kernel (matplotlib ``Figure`` objects)."""
        from matplotlib.figure import Figure

        h = self.times.numpy()
        ref = self._tokens(self.reference_draws(max(n_paths, 2)))
        t = self._tokens(x)
        out: dict[str, Any] = {}
        fig = Figure(figsize=(9, 3.4))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (name, paths) in zip(axes, (("samples", t), ("exact draws", ref))):
            for p in paths[:n_paths, :, 0]:
                ax.plot(h, p.numpy(), lw=1)
            ax.set(title=f"{name} (coordinate 0)", xlabel="time h")
        out["paths"] = fig
        fig = Figure(figsize=(4.8, 3.4))
        ax = fig.subplots()
        c, c0 = self.autocovariance(x), self.true_autocovariance()
        for a, b in sorted({(0, 0), (0, self.dim - 1)}):
            ax.plot(c[:, a, b].numpy(), "o", ms=3, label=f"samples C[{a},{b}]")
            ax.plot(c0[:, a, b].numpy(), "-", lw=1, label=f"true g(kh)Λ[{a},{b}]")
        ax.set(xlabel="lag k", ylabel="autocovariance", title="lag-k autocovariance")
        ax.legend(fontsize=7)
        out["autocovariance"] = fig
        if model is not None and hasattr(model, "attention_maps"):
            out["attention"] = attention_figure(self, model)
        return out


def attention_profile(task: GPTask, model: Any, sigma: float, *, layer: int = -1, n: int = 64,
                      seed: int = 0) -> Tensor:
    """Mean attention weight of ``layer`` (heads and samples averaged) against the lag |i − j|,
    at noise σ on noisy exact draws; (N,) float64, the value at lag k = the average over the pairs
    (i, j) with |i − j| = k."""
    x0 = task.sample_exact(n, rng.derive_seed("gp-attention", seed))
    x = x0 + sigma * torch.randn(x0.shape, generator=rng.generator(seed))
    p = next(model.parameters())
    with torch.no_grad():
        att = model.attention_maps(x.to(p), torch.tensor(sigma, dtype=p.dtype))[layer]
    a = att.double().mean((0, 1))                                   # (N, N)
    lag = (torch.arange(task.length)[:, None] - torch.arange(task.length)[None, :]).abs()
    return torch.zeros(task.length, dtype=torch.float64).index_add_(
        0, lag.reshape(-1), a.reshape(-1)) / torch.bincount(lag.reshape(-1)).double()


def smoother_profile(task: GPTask, sigma: float) -> Tensor:
    """|row| of the temporal smoother Γ(Γ + σ²I)⁻¹ against the lag, averaged like
    :func:`attention_profile` and normalised to sum 1 over each row; (N,)."""
    S = task.gamma @ torch.linalg.inv(task.gamma + sigma**2 * torch.eye(task.length,
                                                                      dtype=torch.float64))
    S = S.abs() / S.abs().sum(1, keepdim=True)
    lag = (torch.arange(task.length)[:, None] - torch.arange(task.length)[None, :]).abs()
    return torch.zeros(task.length, dtype=torch.float64).index_add_(
        0, lag.reshape(-1), S.reshape(-1)) / torch.bincount(lag.reshape(-1)).double()


def attention_figure(task: GPTask, model: Any, sigmas: tuple[float, ...] = (0.1, 0.5, 2.0)):
    """The last layer's attention against |i − j| at a few σ, next to the kernel g and the
    smoother Γ(Γ + σ²I)⁻¹ (rows normalised to sum 1, as attention rows)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    a1, a2 = fig.subplots(1, 2)
    lags = torch.arange(task.length).numpy()
    for s in sigmas:
        a1.semilogy(lags, attention_profile(task, model, s).clamp(min=1e-6).numpy(),
                    label=f"σ = {s}")
        a2.semilogy(lags, smoother_profile(task, s).clamp(min=1e-6).numpy(), label=f"σ = {s}")
    g = task.kernel_values().numpy()
    for ax in (a1, a2):
        ax.semilogy(lags, g / g.sum() * 2, "k--", lw=1, label="kernel g (scaled)")
        ax.set(xlabel="|i − j|")
        ax.legend(fontsize=7)
    a1.set(title="last-layer attention (mean weight)")
    a2.set(title="smoother Γ(Γ+σ²I)⁻¹ (rows sum 1)")
    return fig
