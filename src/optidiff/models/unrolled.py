"""An unrolled-descent score network for Gaussian-process sequences.

For stacked sequences ``x ∈ R^{N·D}`` of law N(μ, Γ⊗Λ), the exact noise prediction at level σ
(VE, α = 1) is ``ε* = σ·s*`` with

    s* = argmin_s ½ sᵀ(Γ⊗Λ + σ²I)s − (x − μ)ᵀs = (Γ⊗Λ + σ²I)⁻¹(x − μ)

(the score is −s*). Fu, Dou, Guo, Wang & Chen ("Diffusion transformer captures spatial-temporal
dependencies: a theory for Gaussian process data", ICLR 2025) show that K steps of gradient
descent on this quadratic ("algorithm unrolling") approximate the score, which is why a
transformer can represent it; :class:`UnrolledScoreNet` is that construction made trainable.

It runs K heavy-ball (Polyak momentum) steps from s_0 = 0,

    v_{k+1} = β v_k + (A s_k − b),   s_{k+1} = s_k − η v_{k+1},   A = Γ⊗Λ + σ²I,  b = x − μ,

with the Kronecker product applied as ``A s = Γ S Λ + σ² S`` on the (N, D) view S of s, and the
step sizes of Polyak's optimal rule for a spectrum inside [m, L]:
``η = 4/(√L + √m)²``, ``β = ((√L − √m)/(√L + √m))²``. ``L = σ² + ‖Γ‖_∞‖Λ‖_∞`` (Gershgorin: an
upper bound of the spectrum, so the iteration is stable for any PSD learned operator) and
``m(σ) = σ² + softplus(f(log σ))`` with a small learned f: the learned, σ-dependent step sizes.

Convergence (derived for the tests): on an eigenvalue λ ∈ [m, L] of A the error obeys
``e_{k+1} = (1 + β − ηλ)e_k − βe_{k−1}``, ``e_0 = 1``, ``e_1 = 1 − ηλ``; the characteristic roots
are complex of modulus √β, and with ``cos θ = (1 + β − ηλ)/(2√β)`` the solution is
``e_k = β^{k/2}(U_k(cos θ) − √β·U_{k−1}(cos θ))`` (U Chebyshev polynomials of the second kind,
|U_k| ≤ k + 1). Hence ``‖s_K − s*‖ ≤ (2K + 1)·ρ^K·‖s*‖`` with ``ρ = √β = (√κ − 1)/(√κ + 1)``,
``κ = L/m``: with the true Γ, Λ, μ and m = σ² + λ_min(Γ⊗Λ) the network reproduces the exact ε to
that relative tolerance.

Ill-conditioned kernels (``solver="pcg"``). Heavy ball needs K ∝ √κ steps, and κ(σ) =
(σ² + λ_max)/(σ² + λ_min) blows up at small σ when Γ is nearly singular: for the
squared-exponential kernel (ℓ = 4) λ_min(Γ⊗Λ) ≈ 1e-15, so κ ≈ 13/σ² = 1.3e5 at σ = 0.01 and K = 32
steps leave a relative error ≈ 0.85 there (measured with the true operator: mean excess score
error 0.155 at N = 16, 0.184 at N = 128, against 6e-6 for the OU kernel, where λ_min ≈ 0.05 keeps
κ ≤ 260). ``solver="pcg"`` runs K preconditioned conjugate-gradient steps on the same quadratic
(Hestenes & Stiefel 1952; step sizes by exact line search instead of learned) with the
circulant-embedding preconditioner of Toeplitz solvers (Chan & Ng, "Conjugate gradient methods
for Toeplitz systems", SIAM Review 1996): ``P⁻¹r`` = the first N tokens of
``(C_M⊗Λ + σ²I)⁻¹(r, 0)``, C_M the M = 2N circulant whose first column is g wrapped around
(eigenvalues by one FFT, clamped at 0; Λ through its D×D eigendecomposition; for the
circulant operator below, the learned circulant itself). P⁻¹ is a principal
block of an SPD inverse, hence SPD, and P⁻¹A clusters near 1: with the true SE operator 32 PCG
steps reach a relative error below 1e-6 at σ = 0.01 (N = 16 and 128). The CG bound
``‖s_K − s*‖_A ≤ 2ρ'^K‖s*‖_A``, ``ρ' = (√κ' − 1)/(√κ' + 1)``, κ' = cond(P^{-1/2}AP^{-1/2}),
holds for any SPD A.

Learned parameters: the Toeplitz Γ, Λ = LLᵀ (L lower-triangular), the mean μ (N, D) and, for
heavy ball, f. Initialised at Γ = I, Λ = I, μ = 0, m ≈ σ², or at the moment estimates of the
training data (:meth:`UnrolledScoreNet.set_moments`). Two parametrisations of Γ (``operator``):

- ``"band"``: ``Γ_ij = g_{|i−j|}`` for ``|i − j| ≤ bandwidth`` (0 beyond), shifted to be PSD (see
  :meth:`UnrolledScoreNet.temporal`);
- ``"circulant"``: Γ the leading N×N block of the M = 4N circulant with eigenvalues ``exp(θ_j)``
  (θ learned), PSD by construction, and the preconditioner is exactly that circulant. Why it is
  needed for the SE kernel (measured, N = 16, n = 16,384, K = 32 PCG steps, 400 AdamW steps):
  started at the moment estimates the band is good (excess score error 0.0048, W2²/tr 0.0014
  against the sampler floor 0.0013, λ_min(Γ) = 2e-5), but training takes the band's small
  eigenvalues far above σ² = 1e-4 (AdamW moves every g_k by about the learning rate per step):
  to λ_min = 0.019 at lr 1e-2, and to −0.18 (a PSD shift of 0.18) at lr 1e-4. The network then
  shrinks at small σ the noise it should pass through: excess error 0.16 / 0.22, W2² 0.19 /
  0.09. On the log spectrum a step is a relative change, so small eigenvalues stay small and
  positive: 800 steps at lr 1e-2 take the same start to an excess error of 0.0003 and W2² 0.0024.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import sigma_like
from .registry import register_model

__all__ = ["OPERATORS", "SOLVERS", "UnrolledScoreNet", "heavy_ball_bound", "nonnegative_spectrum"]

SOLVERS = ("heavy_ball", "pcg")
OPERATORS = ("band", "circulant")


def heavy_ball_bound(steps: int, kappa: float) -> float:
    """The relative error bound ``(2K + 1)·ρ^K``, ``ρ = (√κ − 1)/(√κ + 1)``, of K optimal
    heavy-ball steps on a quadratic of condition number κ (module docstring)."""
    r = (kappa**0.5 - 1) / (kappa**0.5 + 1)
    return (2 * steps + 1) * r**steps


def nonnegative_spectrum(kernel: Tensor, size: int, iters: int = 5000) -> Tensor:
    """The nonnegative spectrum w (size/2 + 1 values, float64) of the size-M circulant whose
    first column best fits ``kernel`` g_0…g_{n−1} in least squares, ``g_k ≈ irfft(w)_k``: the
    Toeplitz matrix of the fit is then PSD (a principal block of a PSD circulant). Solved by
    projected accelerated gradient (FISTA, Beck & Teboulle, SIAM J. Imaging Sciences 2009) from
    the clamped FFT of the zero-padded wrap, which is the answer when that is already ≥ 0."""
    g = torch.as_tensor(kernel, dtype=torch.float64).reshape(-1)
    n = len(g)
    if size < 2 * n:
        raise ValueError(f"size must be >= 2·len(kernel) = {2 * n}, got size={size}")
    m = torch.arange(size)
    wrap = torch.minimum(m, size - m).clamp(max=n)
    w = torch.fft.rfft(torch.cat([g, g.new_zeros(1)])[wrap]).real.clamp(min=0)
    j = torch.arange(size // 2 + 1, dtype=torch.float64)
    weight = torch.full_like(j, 2.0)
    weight[0] = 1.0
    if size % 2 == 0:
        weight[-1] = 1.0
    F_ = torch.cos(2 * math.pi * torch.arange(n, dtype=torch.float64)[:, None] * j / size) \
        * weight / size
    lip = torch.linalg.matrix_norm(F_, 2) ** 2
    y, prev, t = w, w, 1.0
    tol = 1e-12 * g.abs().max().clamp(min=1e-300)
    for _ in range(iters):
        if (F_ @ prev - g).abs().max() <= tol:
            break
        w = (y - F_.T @ (F_ @ y - g) / lip).clamp(min=0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y, prev, t = w + (t - 1) / t_next * (w - prev), w, t_next
    return prev


@register_model
class UnrolledScoreNet(nn.Module):
    """K learned heavy-ball steps on the score quadratic (module docstring).

    ``UnrolledScoreNet(length, channels)(x, σ) -> eps`` for x of shape (B, length·channels)
    (tokens ``x.view(B, length, channels)``). ``steps`` K, ``bandwidth`` of the Toeplitz Γ
    (clipped to length − 1), ``hidden`` width of the step-size network f (heavy ball only),
    ``solver`` "heavy_ball" (Fu et al.'s unrolled descent) or "pcg" (preconditioned conjugate
    gradients, for ill-conditioned kernels), ``operator`` "band" (the banded Toeplitz Γ) or
    "circulant" (Γ the leading block of a learned nonnegative circulant spectrum; ``bandwidth``
    unused), see the module docstring.
    """

    def __init__(self, length: int, channels: int, steps: int = 32, bandwidth: int = 16,
                 hidden: int = 16, solver: str = "heavy_ball", operator: str = "band"):
        super().__init__()
        for k, v in (("length", length), ("channels", channels), ("steps", steps),
                     ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {k}={v!r}")
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
            raise ValueError(f"bandwidth must be an int >= 0, got bandwidth={bandwidth!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got solver={solver!r}")
        if operator not in OPERATORS:
            raise ValueError(f"operator must be one of {', '.join(OPERATORS)}, got "
                             f"operator={operator!r}")
        self.length, self.channels, self.steps, self.solver = length, channels, steps, solver
        self.operator = operator
        self.bandwidth = min(bandwidth, length - 1)
        self.input_shape = (length * channels,)
        # circulant embedding size: 2N for the band (its preconditioner), 4N for the circulant
        # operator (room for a smooth kernel to decay before it wraps around)
        self.embedding = (2 if operator == "band" else 4) * length
        if operator == "band":
            self.kernel_raw = nn.Parameter(F.one_hot(torch.tensor(0), self.bandwidth + 1).float())
        else:  # log spectrum 0: all eigenvalues 1, Γ = I
            self.log_spectrum = nn.Parameter(torch.zeros(self.embedding // 2 + 1))
        self.spatial_raw = nn.Parameter(torch.eye(channels))
        self.mean = nn.Parameter(torch.zeros(length, channels))
        if solver == "heavy_ball":
            self.floor = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.floor[2].weight)
            nn.init.constant_(self.floor[2].bias, -8.0)
        lag = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs()
        self.register_buffer("lag", lag, persistent=False)
        m = torch.arange(self.embedding)
        self.register_buffer("wrap", torch.minimum(m, self.embedding - m), persistent=False)

    # ------------------------------------------------------------------ the learned operator
    def kernel(self) -> Tensor:
        """The learned kernel values: g_0…g_bandwidth (band) or g_0…g_{N−1} (circulant)."""
        if self.operator == "band":
            return self.kernel_raw
        return torch.fft.irfft(self.log_spectrum.exp(), n=self.embedding)[:self.length]

    def circulant_spectrum(self) -> Tensor:
        """Eigenvalues (the first M/2 + 1; the rest mirror them) of the circulant embedding C_M
        of Γ: the learned spectrum (circulant), or the FFT of the wrapped band clamped at 0."""
        if self.operator == "circulant":
            return self.log_spectrum.exp()
        g = torch.cat([self.kernel_raw, self.kernel_raw.new_zeros(1)])
        return torch.fft.rfft(g[self.wrap.clamp(max=self.bandwidth + 1)]).real.clamp(min=0)

    def temporal(self) -> Tensor:
        """The learned Toeplitz Γ (N, N). The circulant operator is PSD by construction (a
        principal block of a PSD circulant). The band is shifted by ``max(0, −λ_min)·I`` so
        that A = Γ⊗Λ + σ²I ⪰ σ²I stays positive definite (a banded truncation of a positive
        definite kernel, or a kernel in training, can be indefinite; the shift is 0 for a PSD
        band)."""
        if self.operator == "circulant":
            return self.kernel()[self.lag]
        g = torch.cat([self.kernel_raw, self.kernel_raw.new_zeros(1)])
        t = g[self.lag.clamp(max=self.bandwidth + 1)]
        # the shift is a guard, held constant in the gradient
        shift = (-torch.linalg.eigvalsh(t.detach().double())[0]).clamp(min=0).to(t.dtype)
        return t + shift * torch.eye(self.length, dtype=t.dtype, device=t.device)

    def spatial(self) -> Tensor:
        """The learned Λ = LLᵀ (D, D)."""
        c = self.spatial_raw.tril()
        return c @ c.T

    @torch.no_grad()
    def set_operator(self, kernel: Tensor, spatial: Tensor, mean: Tensor,
                     floor: float | None = None) -> UnrolledScoreNet:
        """Set g (truncated to the band; for the circulant operator: the first N values fitted
        by :func:`nonnegative_spectrum`, clamped at 1e-8 of its maximum), Λ, μ (N·D,) or (N, D) and, if given, a
        σ-independent floor m − σ² (e.g. λ_min(Γ⊗Λ)); returns self."""
        kernel = torch.as_tensor(kernel).reshape(-1)
        if self.operator == "band":
            self.kernel_raw.zero_()
            k = min(len(kernel), self.bandwidth + 1)
            self.kernel_raw[:k] = kernel[:k]
        else:
            w = nonnegative_spectrum(kernel[:self.length], self.embedding)
            self.log_spectrum.copy_(w.clamp(min=1e-8 * w.max()).log())
        self.spatial_raw.copy_(torch.linalg.cholesky(torch.as_tensor(spatial, dtype=torch.float64)))
        self.mean.copy_(torch.as_tensor(mean).reshape(self.length, self.channels))
        if floor is not None:
            if self.solver != "heavy_ball":
                raise ValueError(f"floor is a heavy-ball step-size setting; solver={self.solver!r}")
            if not floor > 0:
                raise ValueError(f"floor must be > 0, got {floor}")
            self.floor[2].weight.zero_()
            self.floor[2].bias.fill_(float(torch.tensor(floor, dtype=torch.float64).expm1().log()))
        return self

    @torch.no_grad()
    def set_moments(self, data: Tensor) -> UnrolledScoreNet:
        """Set the operator to the moment estimates of training sequences ``data`` (n, N·D): μ the
        per-position mean, Ĉ_k the lag-k sample autocovariance averaged over the N − k position
        pairs (Brockwell & Davis, "Time Series: Theory and Methods", 1991, §7.2), Λ = Ĉ_0 and
        g_k = tr Ĉ_k / tr Ĉ_0 (only the product g·Λ is identifiable); returns self."""
        x = torch.as_tensor(data).double().reshape(len(data), -1)
        if x.shape[1] != self.input_shape[0] or len(x) < 2:
            raise ValueError(f"data must have shape (n >= 2, {self.input_shape[0]}), got "
                             f"{tuple(data.shape)}")
        t = x.view(len(x), self.length, self.channels)
        mean = t.mean(0)
        t = t - mean
        lags = self.length if self.operator == "circulant" else self.bandwidth + 1
        c = torch.stack([torch.einsum("bid,bie->de", t[:, :self.length - k], t[:, k:])
                         / ((len(t) - 1) * (self.length - k)) for k in range(lags)])
        g = c.diagonal(dim1=1, dim2=2).sum(1)
        return self.set_operator(g / g[0], (c[0] + c[0].T) / 2, mean)

    def step_sizes(self, sigma: Tensor, gamma: Tensor, lam: Tensor) -> tuple[Tensor, Tensor,
                                                                            Tensor, Tensor]:
        """(η, β, L, m) at σ (shapes as σ): Polyak's optimal heavy-ball rule on [m, L]."""
        if self.solver != "heavy_ball":
            raise ValueError(f"step sizes belong to the heavy-ball solver; solver={self.solver!r}")
        s2 = sigma**2
        L = s2 + gamma.abs().sum(1).max() * lam.abs().sum(1).max()
        m = s2 + F.softplus(self.floor(sigma.log().reshape(-1, 1))).reshape(sigma.shape)
        rl, rm = L.sqrt(), m.sqrt()
        return 4 / (rl + rm) ** 2, ((rl - rm) / (rl + rm)) ** 2, L, m

    def preconditioner(self, sigma: Tensor, lam: Tensor):
        """r ↦ P⁻¹r, the circulant-embedding preconditioner at σ (module docstring) on (B, N, D)
        residuals; ``sigma`` broadcastable to (B, 1, 1). Built from the detached operator: P only
        sets the speed of convergence to A⁻¹b, and eigh's gradient is singular at repeated
        eigenvalues (Λ = I at initialisation)."""
        eig_c = self.circulant_spectrum().detach().to(lam)                  # (M/2 + 1,)
        b, v = torch.linalg.eigh(lam.detach())
        denom = eig_c[:, None] * b.clamp(min=0) + sigma**2                  # (B?, M/2 + 1, D)
        M = self.embedding

        def apply(r: Tensor) -> Tensor:
            f = torch.fft.rfft(r @ v, n=M, dim=1) / denom
            return torch.fft.irfft(f, n=M, dim=1)[:, :self.length] @ v.T
        return apply

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (B, {self.input_shape[0]}), got {tuple(x.shape)}")
        sig = sigma_like(sigma, x)
        sig3 = sig.reshape(-1, 1, 1) if sig.ndim else sig
        gamma, lam = self.temporal().to(x), self.spatial().to(x)
        b = x.view(-1, self.length, self.channels) - self.mean.to(x)
        if self.solver == "pcg":
            return (sig3 * self._pcg(b, sig3, gamma, lam)).reshape(x.shape)
        eta, beta, _, _ = self.step_sizes(sig3, gamma, lam)
        s, v = torch.zeros_like(b), torch.zeros_like(b)
        for _ in range(self.steps):
            v = beta * v + (gamma @ s @ lam + sig3**2 * s - b)
            s = s - eta * v
        return (sig3 * s).reshape(x.shape)

    def _pcg(self, b: Tensor, sig3: Tensor, gamma: Tensor, lam: Tensor) -> Tensor:
        """K preconditioned CG steps on A s = b from s = 0 (module docstring). A sample whose
        residual has reached machine precision (rᵀP⁻¹r ≤ ε²·r₀ᵀP⁻¹r₀, e.g. K > N·D) stops
        moving, so no step or gradient divides by a vanishing rᵀP⁻¹r or pᵀAp."""
        pinv = self.preconditioner(sig3, lam)
        s, r = torch.zeros_like(b), b
        z = pinv(r)
        p, rz = z, (r * z).sum((1, 2), keepdim=True)
        tol = rz.detach() * torch.finfo(b.dtype).eps ** 2
        for _ in range(self.steps):
            ap = gamma @ p @ lam + sig3**2 * p
            pap = (p * ap).sum((1, 2), keepdim=True)
            live = (rz.detach() > tol) & (pap.detach() > 0)
            a = torch.where(live, rz / torch.where(live, pap, 1), 0)
            s, r = s + a * p, r - a * ap
            z = pinv(r)
            rz_new = (r * z).sum((1, 2), keepdim=True)
            p = z + torch.where(live, rz_new / torch.where(live, rz, 1), 0) * p
            rz = rz_new
        return s
