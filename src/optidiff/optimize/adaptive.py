"""Algorithm 2 of Guo et al. (NeurIPS 2024): adaptive fine-tuning on self-generated data ("self-play").

Guo et al. (NeurIPS 2024), Algorithm 2; the settings of the official code (github.com/yukang123/GGDMOptim)
§4. The loop of Algorithm 1 (:func:`~optidiff.optimize.gradient_guided`), and in every round
k ≥ ``start_round`` the model is first fine-tuned on the samples generated so far::

    g_k, y_k from z_k                              (as Algorithm 1)
    D_k = weighted union of z_0 … z_k (and of pre-training data)
    model ← finetune(model, D_k, weights)           (DSM steps, or an exact refit)
    z_{k+1} = B fresh samples of the fine-tuned model guided by LookAhead(g_k, y_k)

Replay weights (the paper's "optional weighted fine-tuning" on D_0 ∪ … ∪ D_{k−1}; the exact
weights of the paper could not be recovered from the paper or its code): the samples of round j get total
weight ∝ ``replay_decay**(k − j)``, so ``replay_decay=0`` fine-tunes on the newest round only (the
official code) and ``replay_decay=1`` on all rounds equally; pre-training data, when given, get a
total weight ``pretrain_weight`` ∈ [0, 1) and the generated samples ``1 − pretrain_weight``. With
0 < ``replay_decay`` < 1 only the rounds whose relative weight is above 1e-9 are kept (the newest
⌈log 1e-9 / log replay_decay⌉, 197 for the default 0.9), so memory and cost stay bounded.

Their theorem: for concave f and a linear score, f* − E f(z_K) = O(D·L·log K / K) — the
*global* maximum, unlike Algorithm 1's regularized optimum. For exact Gaussian testbeds,
fine-tuning is :func:`refit_gaussian` (exact score matching of a Gaussian: the weighted mean and
covariance); for networks it is :class:`DSMFinetune` (denoising score matching with
AdamW via ``od.dsm_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..models.analytic import GaussianDenoiser
from .gradient_guided import Metrics, OptimizeResult, run_loop
from .objectives import Objective

__all__ = ["DSMFinetune", "GaussianRefit", "adaptive", "refit_gaussian"]

Finetune = Callable[..., Any]


def refit_gaussian(samples: Tensor, weights: Tensor | None = None, *, jitter: float = 0.0
                   ) -> GaussianDenoiser:
    """The exact denoiser of the Gaussian fitted to weighted samples (float64):

        m = Σ_i w_i x_i,   Σ = Σ_i w_i (x_i − m)(x_i − m)ᵀ / (1 − Σ_i w_i²)   (w normalised to 1),

    the reliability-weighted unbiased covariance (= the usual (N−1)-normalised one for equal
    weights), plus ``jitter·I``. Score matching over Gaussian score models is solved exactly by
    these moments, so this is "fine-tuning" of an exact Gaussian model.
    """
    x = samples.detach().flatten(1).to(torch.float64)
    if len(x) < 2:
        raise ValueError(f"refit_gaussian needs at least 2 samples, got {len(x)}")
    w = (torch.ones(len(x), dtype=torch.float64) if weights is None
         else torch.as_tensor(weights, dtype=torch.float64).detach().cpu())
    if w.shape != (len(x),) or (w < 0).any() or not w.sum() > 0 or not torch.isfinite(w).all():
        raise ValueError(f"weights must be {len(x)} finite non-negative numbers with a positive sum")
    w = (w / w.sum()).to(x.device)
    m = w @ x
    xc = x - m
    denom = 1 - (w**2).sum()
    if not denom > 0:
        raise ValueError("the weights put all mass on one sample; a covariance needs two or more")
    cov = (xc * w[:, None]).T @ xc / denom
    cov = (cov + cov.T) / 2 + jitter * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return GaussianDenoiser(m, cov)


class GaussianRefit:
    """Fine-tuning hook of exact Gaussian testbeds: ``refit_gaussian(data, weights)``."""

    def __init__(self, jitter: float = 0.0):
        self.jitter = jitter
        self.last_loss = None

    def __call__(self, model: Any, data: Tensor, weights: Tensor,
                 generator: torch.Generator | None) -> GaussianDenoiser:
        return refit_gaussian(data, weights, jitter=self.jitter).to(data.device)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


#: the default minibatch of :class:`DSMFinetune`: the replay set's rows, at most this many
MAX_BATCH = 512


class DSMFinetune:
    """Fine-tuning hook of trained networks: ``steps`` optimizer steps of denoising score matching
    (``od.dsm_loss``, ε-MSE) per round on minibatches drawn from the weighted replay set.

    The official code takes one Adam step (lr 1e-6, betas (0.9, 0.99)) per round on
    the newest batch; this hook generalises it (defaults: 4 Adam steps of lr 1e-3 per round,
    measured in the ``guidance_subspace`` benchmark): optimizer ``"adamw"``, ``"adam"`` or ``"sgd"``
    (built once, kept across rounds, saved with the run), ``lr``, ``steps`` per round,
    ``batch_size`` (default: the number of rows in the replay set, at most :data:`MAX_BATCH` = 512,
    so a step's cost does not grow with the rounds), minibatch rows drawn with
    replacement with probability ∝ their replay weight, and σ drawn uniformly from ``sigmas`` (the
    training table; :func:`adaptive` defaults it to the positive σ's of its sampling grid).

    Under torchrun (a process group of ``world`` > 1 processes) the model is wrapped in
    DistributedDataParallel (which broadcasts rank 0's weights once, then averages the gradients
    of every step): rank r draws its shard :func:`optidiff.distributed.shard` ``(batch_size, r,
    world)`` of each minibatch from its own generator, its loss weighted by n_r·world/batch_size
    so that the averaged gradient is that of the whole minibatch's mean loss; every rank keeps the
    same weights and optimizer state, and ``last_loss`` is the whole minibatch's mean loss.
    """

    def __init__(self, *, lr: float = 1e-3, steps: int = 4, batch_size: int | None = None,
                 optimizer: str = "adam", weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.99), sigmas: Tensor | None = None):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and > 0, got lr={lr!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got steps={steps!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
        self.lr, self.steps, self.batch_size = lr, steps, batch_size
        self.optimizer_name, self.weight_decay, self.betas = optimizer, weight_decay, betas
        self.sigmas = None if sigmas is None else torch.as_tensor(sigmas)
        self.opt: torch.optim.Optimizer | None = None
        self._net: torch.nn.Module | None = None
        self._pending: dict | None = None
        self.last_loss: float | None = None

    def _make_opt(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DSMFinetune needs a model with trainable parameters")
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def loss(self, model: Any, data: Tensor, weights: Tensor, n: int,
             generator: torch.Generator) -> Tensor:
        """One minibatch's DSM loss: ``od.dsm_loss`` on ``n`` rows of ``data`` drawn with
        replacement with probability ∝ ``weights``, σ uniform over the table (all from
        ``generator``)."""
        from ..training import dsm_loss
        idx = torch.multinomial(weights.to(torch.float64).to(generator.device), n,
                                replacement=True, generator=generator)
        x0 = data[idx.to(data.device)]
        j = torch.randint(len(self.sigmas), (n,), generator=generator, device=generator.device)
        sigma = self.sigmas.to(device=data.device, dtype=data.dtype)[j.to(data.device)]
        return dsm_loss(model, x0, sigma, generator=generator)

    def _ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped in DistributedDataParallel (built once per model: DDP broadcasts rank
        0's weights when it wraps, then averages the gradients of every step)."""
        if self._net is None or self._net.module is not model:
            dev = next(model.parameters()).device
            self._net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)
        return self._net

    def __call__(self, model: Any, data: Tensor, weights: Tensor,
                 generator: torch.Generator | None) -> Any:
        if self.opt is None:
            self.opt = self._make_opt(model)
            if self._pending is not None:
                self.opt.load_state_dict(self._pending)
                self._pending = None
        if self.sigmas is None:
            raise ValueError("DSMFinetune needs sigmas (a table of training noise levels)")
        bs = self.batch_size or min(len(data), MAX_BATCH)
        rank, world = distributed.rank_world()
        if bs < world:
            raise ValueError(f"the fine-tuning minibatch of {bs} cannot be shared out over "
                             f"{world} ranks")
        rows = distributed.shard(bs, rank, world)
        n = rows.stop - rows.start
        net = model if world == 1 else self._ddp(model)
        was_training = model.training
        model.train()
        for _ in range(self.steps):
            with torch.enable_grad():
                loss = self.loss(net, data, weights, n, generator)
                self.opt.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients: weighting rank r by n_r·world/bs makes the
                # average the gradient of the whole minibatch's mean loss
                (loss if world == 1 else loss * (n * world / bs)).backward()
            self.opt.step()
            self.last_loss = (loss.item() if world == 1 else
                              distributed.gather((loss.detach() * (n / bs)).reshape(1)).sum().item())
        model.train(was_training)
        return model

    def state_dict(self) -> dict[str, Any]:
        opt = self.opt.state_dict() if self.opt is not None else self._pending
        return {"optimizer": opt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt = None
        self._pending = state.get("optimizer")


class _Updater:
    """Replay buffer and schedule of Algorithm 2 (weights in the module docstring)."""

    def __init__(self, finetune: Finetune, start_round: int, replay_decay: float,
                 pretrain_data: Tensor | None, pretrain_weight: float):
        self.finetune = finetune
        self.start_round = start_round
        self.replay_decay = replay_decay
        self.pretrain_data = pretrain_data
        self.pretrain_weight = pretrain_weight
        self.buffer: list[Tensor] = []
        self.rounds_tuned = 0
        #: rounds kept (None: all); their weights decay**age fall below 1e-9 after that
        self.memory = (1 if replay_decay == 0 else None if replay_decay == 1 else
                       math.ceil(math.log(1e-9) / math.log(replay_decay)))

    def dataset(self, k: int) -> tuple[Tensor, Tensor]:
        """Replay samples and their normalised weights at round k (newest round last)."""
        n = len(self.buffer)
        per_round = torch.tensor([self.replay_decay ** (n - 1 - j) for j in range(n)],
                                 dtype=torch.float64)
        per_round = per_round / per_round.sum() * (1 - self.pretrain_weight)
        data = torch.cat(self.buffer)
        w = torch.cat([torch.full((len(b),), float(p) / len(b), dtype=torch.float64)
                       for b, p in zip(self.buffer, per_round)])
        if self.pretrain_data is not None and self.pretrain_weight > 0:
            pre = self.pretrain_data.to(data)
            data = torch.cat([data, pre])
            w = torch.cat([w, torch.full((len(pre),), self.pretrain_weight / len(pre),
                                         dtype=torch.float64)])
        keep = w > 0
        return data[keep], w[keep]

    def step(self, model: Any, k: int, z: Tensor, generator: torch.Generator) -> Any:
        self.buffer.append(z)
        self.buffer = self.buffer[-self.memory:] if self.memory else self.buffer
        if k < self.start_round:
            return model
        data, w = self.dataset(k)
        self.rounds_tuned += 1
        return self.finetune(model, data, w, generator)

    def round_info(self) -> dict[str, Any]:
        loss = getattr(self.finetune, "last_loss", None)
        return {"finetune_rounds": self.rounds_tuned, "finetune_loss": loss}

    def state_dict(self) -> dict[str, Any]:
        ft = self.finetune.state_dict() if hasattr(self.finetune, "state_dict") else {}
        return {"buffer": list(self.buffer), "rounds_tuned": self.rounds_tuned, "finetune": ft}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = list(state["buffer"])
        self.rounds_tuned = int(state["rounds_tuned"])
        if hasattr(self.finetune, "load_state_dict"):
            self.finetune.load_state_dict(state["finetune"])


def adaptive(model: Any, objective: Callable[[Tensor], Tensor] | Objective, sigmas: Tensor, *,
             rounds: int, batch_size: int, increment: float | None = None,
             target: float | None = None, target_rule: str = "plain",
             max_correction: float = 2.0, guidance: str | Callable = "lookahead",
             gradient_at: str = "sample", noise_std: float = 0.1, beta: Any = None,
             sampler: str = "ddpm", sampler_kwargs: dict | None = None,
             finetune: Finetune | None = None, start_round: int = 0, replay_decay: float | None = None,
             pretrain_data: Tensor | None = None, pretrain_weight: float = 0.0,
             lr: float = 1e-3, steps_per_round: int = 4, optimizer: str = "adam",
             finetune_batch_size: int | None = None, top_k: int = 4,
             metrics: Metrics | None = None, run_dir: str | Path | None = None,
             resume: bool = False, save_samples: bool = True,
             generator: torch.Generator | None = None, seed: int | None = None,
             dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             progress: bool | None = None) -> OptimizeResult:
    """Algorithm 2 of Guo et al. (NeurIPS 2024; formulas in the module docstring).

    Takes every argument of :func:`~optidiff.optimize.gradient_guided`, plus:

    Args:
        finetune: ``finetune(model, data, weights, generator) -> model`` (may return a new
            model; may have ``state_dict``/``load_state_dict`` for resume). Default: an exact
            :class:`GaussianRefit` for a :class:`~optidiff.models.GaussianDenoiser`, else
            :class:`DSMFinetune` built from ``lr``, ``steps_per_round``, ``optimizer`` and
            ``finetune_batch_size`` with σ uniform over the positive entries of ``sigmas``.
        start_round: first round k whose samples are used for fine-tuning (the official code
            starts at 40 for G and 60 for G_loss).
        replay_decay: weight ∝ replay_decay**(k − j) of round j's samples (0: newest only, the
            official code; 1: all rounds equally). Default: 0.9 for a network (a memory of about
            ten rounds: with 0, a few optimizer steps per round on 32 samples are too noisy, with
            1 the model keeps fitting the early low-reward rounds and Algorithm 2 stalls below the
            maximum, 8.2–9.1 against 9.8 on the subspace task's f1 with θ in the subspace,
            ``guidance_subspace`` benchmark), 0 for an exact refit (which needs no memory).
        pretrain_data, pretrain_weight: optional replay of pre-training data with this total
            weight in [0, 1).
        lr, steps_per_round, optimizer: of the default :class:`DSMFinetune`. The defaults (Adam,
            1e-3, 4 steps per round on at most 512 replayed rows, replay_decay 0.9, β =
            ``"official"``) are measured in the
            ``guidance_subspace`` benchmark; the official code's settings (Adam 1e-6, one step per
            round on the newest round) barely move a network in 1,000 rounds.
        beta: as :func:`~optidiff.optimize.gradient_guided`; for a network (the default
            :class:`DSMFinetune`) ``None`` means ``"official"``, whose step 1/(2(σ_y² +
            σ²(1+σ²)‖Jᵀg‖²)) stays bounded, where Lemma 1's 1/(2(σ_y² + σ²gᵀJᵀg)) grows without
            bound once a fine-tuned network's gᵀJᵀg falls to 0 (J is not PSD for a network).

    A network is fine-tuned in place (copy it first to keep the pre-trained weights); the result's
    ``model`` is the fine-tuned model, and with ``run_dir`` its state is saved every round.

    Under ``torchrun --nproc-per-node 2 script.py`` the loop is that of
    :func:`~optidiff.optimize.gradient_guided` ("Distributed": per-rank shards and streams,
    gathered records, rank 0 writes); the replay set is the gathered samples, the same on every
    rank, so an exact refit is the same everywhere and :class:`DSMFinetune` trains under
    DistributedDataParallel, each rank drawing its shard of every minibatch: all ranks keep the
    same fine-tuned weights.
    """
    if isinstance(start_round, bool) or not isinstance(start_round, int) or start_round < 0:
        raise ValueError(f"start_round must be an int >= 0, got start_round={start_round!r}")
    if not (0.0 <= pretrain_weight < 1.0):
        raise ValueError(f"pretrain_weight must be in [0, 1), got pretrain_weight={pretrain_weight!r}")
    if pretrain_weight > 0 and pretrain_data is None:
        raise ValueError("pretrain_weight > 0 needs pretrain_data")
    if finetune is None:
        if isinstance(model, GaussianDenoiser):
            finetune = GaussianRefit()
        else:
            s = torch.as_tensor(sigmas)
            finetune = DSMFinetune(lr=lr, steps=steps_per_round, batch_size=finetune_batch_size,
                                   optimizer=optimizer, sigmas=s[s > 0])
    if beta is None and isinstance(finetune, DSMFinetune):
        beta = "official"
    if not callable(finetune):
        raise TypeError(f"finetune must be callable, got {type(finetune).__name__}")
    if replay_decay is None:
        replay_decay = 0.0 if isinstance(finetune, GaussianRefit) else 0.9
    if not (0.0 <= replay_decay <= 1.0):
        raise ValueError(f"replay_decay must be in [0, 1], got replay_decay={replay_decay!r}")
    updater = _Updater(finetune, start_round, replay_decay, pretrain_data, pretrain_weight)
    config = {"finetune": type(finetune).__name__, "start_round": start_round,
              "replay_decay": replay_decay, "pretrain_weight": pretrain_weight}
    if isinstance(finetune, DSMFinetune):
        config.update(lr=finetune.lr, steps_per_round=finetune.steps,
                      optimizer=finetune.optimizer_name, finetune_batch_size=finetune.batch_size)
    return run_loop(model, objective, sigmas, rounds=rounds, batch_size=batch_size,
                    increment=increment, target=target, guidance=guidance,
                    gradient_at=gradient_at, noise_std=noise_std, beta=beta, sampler=sampler,
                    sampler_kwargs=sampler_kwargs, top_k=top_k, metrics=metrics, run_dir=run_dir,
                    resume=resume, save_samples=save_samples, generator=generator, seed=seed,
                    dtype=dtype, device=device, progress=progress, updater=updater,
                    target_rule=target_rule, max_correction=max_correction,
                    algorithm="adaptive", config=config)
