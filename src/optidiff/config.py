"""Every TOML configuration of the ``optidiff`` commands, with its sections defined once.

Three kinds of config, told apart by their sections (:func:`config_kind`):

- **train** (``optidiff train``; ``examples/train_toy.toml``): ``[task]`` (whose data to train on),
  ``[model]``, ``[schedule]``, ``[train]``, ``[sampler]`` (the samples drawn after training);
- **optimize** (``optidiff optimize``; ``examples/optimize_subspace.toml``): ``[task]`` (with its
  ``objective``), ``[model]``, ``[schedule]``, ``[train]`` (the pre-training of the model),
  ``[sampler]``, ``[optimize]``, optional ``[finetune]``;
- **offline** (``optidiff optimize``; ``examples/offline_tfbind8.toml``): ``[task]``, ``[reward]``,
  ``[method]``, ``[model]``, ``[schedule]``, ``[train]``, ``[sampler]``, ``[generate]``.

Shared sections: ``[task]`` (``name`` plus the task's own parameters, checked against the task
class), ``[model]`` (``kind`` plus the parameters that kind takes), ``[schedule]`` (``kind`` plus
its parameters; a missing section means the default schedule of what is trained), ``[train]``
(arguments of :func:`optidiff.train`) and ``[sampler]`` (``name``, ``steps``, ``batch_size`` = the
number of samples, ``gamma``, ``mu``, ``seed``, ``final_zero``). Every key is optional; a value
left out takes the default of what it configures (the task's network recipe, the pipeline's
default), so an absent key never changes a run's meaning. Unknown keys are errors, values are
type- and range-checked, and every problem is one :class:`ConfigError` naming the file and the
field, before any work starts. Old spellings (``[data]``, ``[sample]``, ``[sampler] n``,
``[optimize] batch_size``, the offline ``[sample]`` section, ``cfg_weight``, ``guidance_*``) still
load, with a DeprecationWarning.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model, field_validator, model_validator

from . import schedules as S
from .optimize.offline import ddom_schedule
from .plugins import is_import_path
from .sampling import SAMPLERS, resolve_sampler
from .schema import ConfigError, RunName, Section, Seed, choice, move_keys, read_toml, validate
from .tasks import TASKS, task_class

__all__ = ["KINDS", "MODELS", "SCHEDULES", "ConfigError", "OfflineConfig", "OptimizeConfig",
           "TrainConfig", "build_schedule", "config_kind", "dump_toml", "load_config",
           "parse_config"]

Pos = Field(default=None, gt=0, allow_inf_nan=False)

# ------------------------------------------------------------------------------ [task]


@functools.cache
def _task_params(name: str) -> type[Section]:
    """A strict section of task ``name``'s constructor parameters (its dataclass fields)."""
    cls = task_class(name)
    hints = typing.get_type_hints(cls)
    def default(f: dataclasses.Field) -> Any:
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else ...

    own = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    fields = {f.name: (hints[f.name], default(f)) for f in own if f.init}
    return create_model(f"{cls.__name__}Params", __base__=Section, **fields)


class TaskSection(Section):
    """``[task]``: ``name`` (a registered task) and that task's parameters; ``objective`` for
    optimization runs."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = "toy2d"
    objective: str | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in TASKS and not is_import_path(v):
            raise ValueError(f"unknown task {v!r}; choose one of {', '.join(TASKS)}, or name "
                             "your own task class as 'package.module:Class'")
        return v

    @model_validator(mode="after")
    def _params(self) -> TaskSection:
        from pydantic import ValidationError

        try:
            _task_params(self.name).model_validate(self.params())
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            what = ("unknown key" if first["type"] == "extra_forbidden"
                    else first["msg"].removeprefix("Value error, "))
            raise ValueError(f"{where}: {what} for task {self.name!r} (its parameters: "
                             f"{', '.join(_task_params(self.name).model_fields) or 'none'})"
                             ) from None
        objectives = getattr(task_class(self.name), "objectives", ())
        if self.objective is not None and not is_import_path(self.objective) \
                and self.objective not in objectives:
            raise ValueError(f"objective {self.objective!r} is not an objective of task "
                             f"{self.name!r}; choose one of {', '.join(objectives) or '(none)'},"
                             " or name your own as 'package.module:function'")
        return self

    def params(self) -> dict[str, Any]:
        """The task's constructor arguments."""
        return dict(self.model_extra or {})


# ------------------------------------------------------------------------------ [model]

#: model kind -> (class path, parameters a config may set); the data-derived ones (dimension,
#: σ_data) come from the task
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "timemlp": ("TimeMLP", ("hidden", "depth", "emb_dim", "num_classes")),
    "subspace_net": ("SubspaceNet", ("hidden", "depth", "emb_dim", "latent_dim")),
    "conditional_mlp": ("ConditionalMLP", ("hidden", "depth", "emb_dim", "cond_emb_dim")),
    "unet": ("UNet", ("channels", "channel_mult", "num_res_blocks", "attention", "emb_dim",
                      "groups", "dropout", "num_classes")),
    "transformer": ("SequenceTransformer", ("width", "depth", "heads", "emb_dim")),
    "unrolled": ("UnrolledScoreNet", ("unroll", "bandwidth", "hidden")),
    "load": ("", ("checkpoint",)),
    "exact": ("", ()),
}


class ModelSection(Section):
    """``[model]``: ``kind`` (a network to train, ``load`` a checkpoint, ``exact``, the task's
    exact denoiser, or the import path ``"package.module:Class"`` of your own network class or
    builder, called with the ``args`` table) and only the parameters that kind takes."""

    kind: str | None = None
    checkpoint: str | None = Field(None, min_length=1)
    args: dict[str, Any] | None = None
    hidden: int | None = Field(None, gt=0, le=65_536)
    depth: int | None = Field(None, gt=0, le=64)
    emb_dim: int | None = Field(None, gt=0, le=65_536, multiple_of=2)
    cond_emb_dim: int | None = Field(None, gt=0, le=65_536)
    latent_dim: int | None = Field(None, gt=0, le=65_536)
    num_classes: int | None = Field(None, ge=2, le=100_000)
    channels: int | None = Field(None, gt=0, le=4096)
    channel_mult: list[int] | None = Field(None, min_length=1, max_length=8)
    num_res_blocks: int | None = Field(None, gt=0, le=16)
    attention: bool | None = None
    groups: int | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    width: int | None = Field(None, gt=0, le=65_536, multiple_of=2)
    heads: int | None = Field(None, gt=0, le=256)
    unroll: int | None = Field(None, gt=0, le=10_000)
    bandwidth: int | None = Field(None, ge=0, le=1_000_000)

    def params(self) -> dict[str, Any]:
        """The set parameters (other than ``kind``)."""
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in MODELS and not is_import_path(v):
            raise ValueError(f"unknown model kind {v!r}; choose one of {', '.join(MODELS)}, or "
                             "name your own network as 'package.module:Class'")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.kind is not None:
            self.resolved_kind(self.kind)
        if self.width is not None and self.heads is not None and self.width % self.heads:
            raise ValueError(f"width must be a multiple of heads, got width = {self.width}, "
                             f"heads = {self.heads}")
        return self

    def resolved_kind(self, default: str) -> str:
        """``kind``, or the run's ``default`` kind when unset, after checking that the set
        parameters belong to it (a ValueError naming them otherwise)."""
        kind = self.kind or default
        allowed = ("args",) if is_import_path(kind) else MODELS[kind][1]
        extra = [k for k in self.params() if k not in allowed]
        if extra:
            raise ValueError(f"model kind {kind!r} takes {', '.join(allowed) or 'no parameters'};"
                             f" not {', '.join(extra)}")
        if kind == "load" and not self.checkpoint:
            raise ValueError("kind = 'load' needs checkpoint = 'path'")
        return kind


# ------------------------------------------------------------------------------ [schedule]

#: schedule kind -> (builder, parameters it accepts)
SCHEDULES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "loglinear": (S.LogLinearSchedule, ("sigma_min", "sigma_max", "n")),
    "ddpm": (S.DDPMSchedule, ("n", "beta_start", "beta_end")),
    "ldm": (S.LDMSchedule, ("n", "beta_start", "beta_end")),
    "cosine": (S.CosineSchedule, ("n", "s", "max_beta")),
    "sigmoid": (S.SigmoidSchedule, ("n", "beta_start", "beta_end")),
    "karras": (S.KarrasSchedule, ("sigma_min", "sigma_max", "rho", "n")),
    "ddom": (ddom_schedule, ("n", "beta_min", "beta_max")),
}


class ScheduleSection(Section):
    """``[schedule]``: ``kind`` plus only the parameters that kind takes; unset ones take the
    schedule class's defaults (``LogLinearSchedule()``: σ ∈ [0.02, 10], n = 1000)."""

    kind: Literal["loglinear", "ddpm", "ldm", "cosine", "sigmoid", "karras", "ddom"] = "loglinear"
    n: int | None = Field(None, ge=2, le=100_000)
    sigma_min: float | None = Pos
    sigma_max: float | None = Pos
    beta_start: float | None = Field(None, gt=0, lt=1)
    beta_end: float | None = Field(None, gt=0, lt=1)
    beta_min: float | None = Pos
    beta_max: float | None = Pos
    rho: float | None = Pos
    s: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_beta: float | None = Field(None, gt=0, lt=1)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}

    @model_validator(mode="after")
    def _check(self) -> ScheduleSection:
        allowed = SCHEDULES[self.kind][1]
        extra = [k for k in self.params() if k not in allowed]
        if extra:
            raise ValueError(f"kind={self.kind!r} takes {', '.join(allowed)}; not "
                             f"{', '.join(extra)}")
        build_schedule(self)  # the schedule's own checks (e.g. sigma_min < sigma_max)
        return self


def build_schedule(cfg: ScheduleSection) -> S.Schedule:
    """The schedule object of a ``[schedule]`` section."""
    return SCHEDULES[cfg.kind][0](**cfg.params())


# ------------------------------------------------------------------------------ [train], [sampler]

class TrainSection(Section):
    """``[train]``: arguments of :func:`optidiff.train`; ``cache`` keeps a pre-trained model in
    the cache (optimize runs). Unset values take the defaults of the model being trained."""

    steps: int | None = Field(None, gt=0, le=10**9)
    batch_size: int | None = Field(None, gt=0, le=10**7)
    lr: float | None = Pos
    lr_schedule: Literal["constant", "cosine"] | None = None
    weight_decay: float | None = Field(None, ge=0, allow_inf_nan=False)
    ema_decay: float | None = Field(None, ge=0, lt=1)
    grad_clip: float | None = Pos
    seed: Seed | None = None
    checkpoint_every: int | None = Field(None, gt=0)
    log_every: int | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    num_workers: int | None = Field(None, ge=0, le=256)
    cache: bool = True
    data: str | None = None
    data_args: dict[str, Any] | None = None

    @field_validator("data")
    @classmethod
    def _data(cls, v: str | None) -> str | None:
        if v is not None and not is_import_path(v):
            raise ValueError(f"{v!r} is not an import path 'package.module:function' of a data "
                             "source")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if self.data_args is not None and self.data is None:
            raise ValueError("data_args needs data = 'package.module:function'")
        return self

    def kwargs(self, **defaults: Any) -> dict[str, Any]:
        """The set values over ``defaults`` (``cache`` and the data source excluded): the
        keyword arguments of :func:`optidiff.train`."""
        return {**defaults, **{k: v for k, v in self.model_dump(
            exclude={"cache", "data", "data_args"}).items() if v is not None}}


class SamplerSection(Section):
    """``[sampler]``: any :func:`optidiff.sample` sampler, its steps on the model's σ table,
    ``batch_size`` samples drawn with ``seed``."""

    name: choice(SAMPLERS, "sampler") | None = None
    steps: int | None = Field(None, gt=0, le=100_000)
    batch_size: int | None = Field(None, gt=0, le=10**7)
    gamma: float | None = Pos
    mu: float | None = Field(None, ge=0, lt=1)
    seed: Seed | None = None
    final_zero: bool = True
    precision: Literal["fp32", "bf16", "fp16"] | None = None

    @model_validator(mode="after")
    def _check(self) -> SamplerSection:
        if self.name is not None or self.gamma is not None or self.mu is not None:
            resolve_sampler(self.name or "gamma_mu", self.gamma, self.mu)
        return self

    def resolved(self, **defaults: Any) -> dict[str, Any]:
        """name, steps, batch_size, gamma, mu, seed, final_zero with unset ones from ``defaults``."""
        return {**defaults, **{k: v for k, v in self.model_dump().items() if v is not None}}


# ------------------------------------------------------------------------------ optimize

class OptimizeSection(Section):
    """``[optimize]``: Algorithm 1 or 2 of Guo et al. (NeurIPS 2024): guidance and its step size
    ``beta``, where the gradient is taken, rounds, and the target rule (``increment`` δ, default
    0.2, or a fixed ``target``; ``target_rule = "corrected"`` rescales it by the delivered
    fraction, :mod:`optidiff.optimize.delivered`)."""

    algorithm: Literal["gradient_guided", "adaptive"] = "gradient_guided"
    guidance: Literal["lookahead", "naive"] = "lookahead"
    beta: Literal["official", "lemma1"] | float | None = "official"
    gradient_at: Literal["sample", "mean"] = "sample"
    rounds: int = Field(100, ge=1, le=100_000)
    increment: float | None = Pos
    target: float | None = Field(None, allow_inf_nan=False)
    target_rule: Literal["plain", "corrected"] = "plain"
    max_correction: float = Field(2.0, ge=1, allow_inf_nan=False)
    noise_std: float = Field(0.1, gt=0, allow_inf_nan=False)
    top_k: int = Field(4, ge=1, le=10**6)
    seed: Seed = 0

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        if isinstance(v, float) and not (math.isfinite(v) and v >= 0):
            raise ValueError("beta must be 'official', 'lemma1' or a finite number >= 0")
        return v

    @model_validator(mode="after")
    def _rule(self) -> OptimizeSection:
        if self.increment is not None and self.target is not None:
            raise ValueError("give increment or target, not both")
        if self.increment is None and self.target is None:
            self.increment = 0.2
        return self


class FinetuneSection(Section):
    """``[finetune]`` (``algorithm = "adaptive"``): the DSM fine-tuning of Algorithm 2 (defaults
    as :func:`optidiff.optimize.adaptive`'s; the official code's are lr 1e-6, 1 step,
    ``replay_decay = 0``)."""

    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    steps_per_round: int = Field(4, ge=1, le=10**6)
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    start_round: int = Field(0, ge=0)
    replay_decay: float | None = Field(None, ge=0, le=1)
    pretrain_weight: float = Field(0.0, ge=0, lt=1)
    batch_size: int | None = Field(None, ge=1, le=10**7)


#: the [train] keys of an optimize run's pre-trained network (:class:`optidiff.runs` recipe)
OPTIMIZE_TRAIN_KEYS = ("steps", "batch_size", "lr", "ema_decay", "seed")


class OptimizeConfig(Section):
    """A whole ``optidiff optimize`` run of generative optimization."""

    name: RunName = "optimize"
    task: TaskSection = Field(default_factory=lambda: TaskSection(name="subspace"))
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    optimize: OptimizeSection = Field(default_factory=OptimizeSection)
    finetune: FinetuneSection | None = None

    @model_validator(mode="after")
    def _check(self) -> OptimizeConfig:
        objectives = getattr(task_class(self.task.name), "objectives", ())
        if self.task.objective is None:
            if not objectives:
                raise ValueError(f"task {self.task.name!r} has no objectives of its own; name "
                                 "one as task.objective = 'package.module:function'")
            self.task.objective = objectives[0]
        if self.model.resolved_kind("timemlp") not in ("timemlp", "subspace_net", "load",
                                                        "exact"):
            raise ValueError(f"model.kind = {self.model.kind!r}: optimize runs pre-train a "
                             "'timemlp' or a 'subspace_net', 'load' a checkpoint or use the "
                             "'exact' denoiser")
        if self.finetune is not None and self.optimize.algorithm != "adaptive":
            raise ValueError("[finetune] is used only with optimize.algorithm = 'adaptive'")
        unused = [k for k in self.train.kwargs() if k not in OPTIMIZE_TRAIN_KEYS]
        if unused:  # say so rather than train a different network than the config reads
            raise ValueError(f"train.{unused[0]}: an optimize run trains its network by the "
                             f"cached recipe, which takes only {', '.join(OPTIMIZE_TRAIN_KEYS)} "
                             "(train with `optidiff train` and set model.kind = 'load' for the "
                             "rest)")
        return self


# ------------------------------------------------------------------------------ offline

class RewardSection(Section):
    """``[reward]``: the reward model of step 1 (``none``: observed labels only, DDOM)."""

    kind: Literal["ridge", "mlp", "none"] = "ridge"
    ensemble: int = Field(1, ge=1, le=1000)
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False)
    hidden: int = Field(128, ge=1, le=65_536)
    depth: int = Field(2, ge=1, le=64)
    steps: int = Field(2000, ge=1, le=10**8)
    batch_size: int = Field(256, ge=1, le=10**7)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)

    def kwargs(self) -> dict[str, Any]:
        if self.kind == "ridge":
            return {"alpha": self.alpha}
        return {k: getattr(self, k) for k in ("hidden", "depth", "steps", "batch_size", "lr",
                                              "weight_decay")}


class MethodSection(Section):
    """``[method]``: ``reward_conditioned`` (the tutorial's method / DDOM),
    ``classifier_guidance`` (the RCGDM image-code variant), ``gradient_ascent`` (Design-Bench's
    Grad. baseline) or ``suite`` (every method and baseline of :mod:`optidiff.optimize.suite` on
    each problem of a sequence task, with the ``[suite]`` settings)."""

    name: Literal["reward_conditioned", "classifier_guidance", "gradient_ascent", "suite"] = \
        "reward_conditioned"
    relabel_labeled: bool = True
    pseudo_label_noise: float = Field(0.0, ge=0, allow_inf_nan=False)
    reweight: bool = False
    reweight_bins: int = Field(20, ge=1, le=10_000)
    reweight_quantile: float = Field(0.9, ge=0, le=1)
    reweight_clip: float = Field(5.0, gt=0, allow_inf_nan=False)
    cond_drop: float = Field(0.15, ge=0, lt=1)
    ascent_steps: int = Field(200, ge=0, le=10**7)
    ascent_lr: float = Field(0.01, gt=0, allow_inf_nan=False)


Target = float | str


def _check_target(t: Target | None, allowed: tuple[str, ...]) -> None:
    if isinstance(t, str) and t not in allowed and not (
            t.startswith("q") and t[1:].replace(".", "", 1).isdigit() and 0 <= float(t[1:]) <= 100):
        raise ValueError(f"target {t!r} must be a number, {' or '.join(map(repr, allowed))} or "
                         "'qXX' (0 <= XX <= 100)")


class GenerateSection(Section):
    """``[generate]``: the targets (numbers, ``"max"`` or ``"qXX"``), one batch per target and per
    seed in ``seeds``; the prior, classifier-free guidance and reward guidance."""

    targets: list[Target] = Field(default_factory=lambda: ["max"], min_length=1, max_length=1000)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=1000)
    prior: Literal["ve", "vp"] = "ve"
    cfg_scale: float = Field(1.0, allow_inf_nan=False)
    reward_scale: float = Field(0.0, ge=0, allow_inf_nan=False)
    reward_target: Target | None = None
    reward_clip: float | None = Pos

    @model_validator(mode="after")
    def _check(self) -> GenerateSection:
        for t in self.targets:
            _check_target(t, ("max",))
        _check_target(self.reward_target, ("max", "ascent"))
        return self


class SuiteSection(Section):
    """``[suite]``: the sizes of a ``method.name = "suite"`` run
    (:class:`optidiff.optimize.suite.SuiteSettings`; the reward ensemble comes from ``[reward]``)."""

    n: int = Field(128, ge=1, le=10**6)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1, max_length=100)
    methods: list[str] | None = None
    diffusion_steps: int = Field(1000, ge=1, le=10**7)
    batch_size: int = Field(256, ge=1, le=10**6)
    hidden: int = Field(256, ge=1, le=65_536)
    depth: int = Field(3, ge=1, le=64)
    sample_steps: int = Field(50, ge=1, le=100_000)
    pool: int = Field(4, ge=1, le=1000)
    reward_scales: list[float] = Field(default_factory=lambda: [30.0, 100.0, 300.0, 1000.0],
                                       min_length=1, max_length=100)
    penalties: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0], min_length=1,
                                   max_length=100)
    prior_weights: list[float] = Field(
        default_factory=lambda: [0.0, -0.1, 0.1, -0.25, 0.25, -0.5, 0.5], min_length=1,
        max_length=100)
    likelihood_levels: int = Field(16, ge=2, le=10_000)
    reward_clip: float = Field(5.0, gt=0, allow_inf_nan=False)
    holdout: float = Field(0.2, gt=0, lt=1)
    evolution_generations: int = Field(64, ge=1, le=10**6)

    @model_validator(mode="after")
    def _check(self) -> SuiteSection:
        from .optimize.suite import METHODS

        bad = [m for m in self.methods or [] if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if any(s < 0 for s in self.reward_scales + self.penalties):
            raise ValueError("reward_scales and penalties must be >= 0")
        bad = [b for b in self.prior_weights if not math.isfinite(b)]
        if bad:
            raise ValueError(f"prior_weights must be finite, got {bad[0]} in "
                             f"prior_weights={self.prior_weights}")
        return self


class OfflineConfig(Section):
    """A whole offline reward-maximization run (``optidiff optimize CONFIG``)."""

    name: RunName = "offline"
    task: TaskSection = Field(default_factory=lambda: TaskSection(name="linear_subspace"))
    reward: RewardSection = Field(default_factory=RewardSection)
    method: MethodSection = Field(default_factory=MethodSection)
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    suite: SuiteSection | None = None

    @model_validator(mode="after")
    def _check(self) -> OfflineConfig:
        if not hasattr(task_class(self.task.name), "offline_data"):
            raise ValueError(f"task {self.task.name!r} is not an offline task")
        m, r, g = self.method.name, self.reward.kind, self.generate
        if m == "suite":
            if not hasattr(task_class(self.task.name), "problems"):
                raise ValueError(f"method 'suite' needs a sequence task (tfbind8, ehrlich), not "
                                 f"{self.task.name!r}")
            if r != "mlp":
                raise ValueError("method 'suite' fits an MLP ensemble: set reward.kind = 'mlp'")
        elif self.suite is not None:
            raise ValueError(f"[suite] applies to method.name = 'suite', not {m!r}")
        if m in ("classifier_guidance", "gradient_ascent") and r == "none":
            raise ValueError(f"method {m!r} needs a reward model: reward.kind 'ridge' or 'mlp'")
        if g.reward_scale > 0 and r == "none":
            raise ValueError("generate.reward_scale > 0 needs a reward model (reward.kind)")
        if g.cfg_scale != 1.0 and self.method.cond_drop == 0:
            raise ValueError("generate.cfg_scale != 1 needs method.cond_drop > 0")
        unused = [k for k in ("checkpoint_every", "log_every", "precision", "num_workers")
                  if getattr(self.train, k) is not None]
        if unused:
            raise ValueError(f"train.{unused[0]}: offline runs do not take it (their training "
                             "checkpoints at the end and logs every 100 steps)")
        default = "timemlp" if m == "classifier_guidance" else "conditional_mlp"
        if self.model.resolved_kind(default) != default:
            raise ValueError(f"model.kind = {self.model.kind!r}: method {m!r} trains a "
                             f"{default!r}")
        return self


# ------------------------------------------------------------------------------ train

class TrainConfig(Section):
    """A whole ``optidiff train`` run; ``name`` names the run directory ``runs/<name>-<time>``."""

    name: RunName = "train"
    task: TaskSection | None = None
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.task is None and self.train.data is None:
            self.task = TaskSection()  # the data of the default task
        if self.task is not None and self.task.objective is not None:
            raise ValueError("task.objective belongs to optimize configs")
        if self.model.resolved_kind("timemlp") in ("load", "exact"):
            raise ValueError(f"model.kind = {self.model.kind!r}: a train config trains a network")
        n, steps = len(build_schedule(self.schedule)), self.sampler.steps
        if steps is not None and steps > n:
            raise ValueError(f"sampler.steps={steps} exceeds the schedule's {n} noise levels")
        return self


# ------------------------------------------------------------------------------ loading

KINDS: dict[str, type[Section]] = {"train": TrainConfig, "optimize": OptimizeConfig,
                                   "offline": OfflineConfig}
#: the command that runs each kind
COMMANDS = {"train": "optidiff train", "optimize": "optidiff optimize",
            "offline": "optidiff optimize"}

#: deprecated spellings, per kind: (old key path, new key path), applied in order
_MOVES: dict[str, list[tuple[str, str]]] = {
    "train": [("sample", "sampler"), ("sampler.sampler", "sampler.name"),
              ("sampler.n", "sampler.batch_size")],
    "optimize": [("optimize.batch_size", "sampler.batch_size"), ("model.steps", "train.steps"),
                 ("model.batch_size", "train.batch_size"), ("model.lr", "train.lr"),
                 ("model.seed", "train.seed"), ("model.cache", "train.cache"),
                 ("model.sigma_min", "schedule.sigma_min"),
                 ("model.sigma_max", "schedule.sigma_max")],
    "offline": [("sample.n", "sampler.batch_size"), ("sample.steps", "sampler.steps"),
                ("sample.sampler", "sampler.name"), ("sample.cfg_weight", "generate.cfg_scale"),
                ("sample.guidance_scale", "generate.reward_scale"),
                ("sample.guidance_target", "generate.reward_target"),
                ("sample.guidance_clip", "generate.reward_clip"),
                ("sample.targets", "generate.targets"), ("sample.seeds", "generate.seeds"),
                ("sample.prior", "generate.prior")],
}


def config_kind(data: dict[str, Any]) -> str | None:
    """The kind a config's sections show: ``"optimize"`` (``[optimize]`` or ``[finetune]``),
    ``"offline"`` (``[method]``, ``[reward]`` or ``[generate]``), ``"train"`` (the old ``[data]``
    or ``[sample]``), or None when its sections are shared by every kind."""
    if {"optimize", "finetune"} & set(data):
        return "optimize"
    if {"method", "reward", "generate"} & set(data):
        return "offline"
    if {"data", "sample"} & set(data):
        return "train"
    return None


def _deprecated(source: str, old: str, new: str) -> None:
    warnings.warn(f"{source}: {old} is deprecated; write {new}", DeprecationWarning, stacklevel=4)


def _migrate(data: dict[str, Any], kind: str, source: str) -> dict[str, Any]:
    """Carry the deprecated spellings of ``kind`` over to the current ones."""
    data = dict(data)
    if kind == "train" and isinstance(data.get("data"), dict):  # [data] name → [task] dataset
        if "task" in data:
            raise ConfigError(f"{source}: give [task] (the new name of [data]), not both")
        _deprecated(source, "[data] name = …", '[task] name = "toy2d", dataset = …')
        old = dict(data.pop("data"))
        data["task"] = {"name": "toy2d", **({"dataset": old.pop("name")} if "name" in old
                                           else {}), **old}
    out = move_keys(data, _MOVES[kind], source)
    model, task = out.get("model"), out.get("task")
    if kind == "optimize" and isinstance(model, dict) and model.get("kind") == "train":
        _deprecated(source, "model.kind = 'train'", "'timemlp'")
        model["kind"] = "timemlp"
    if kind == "optimize" and isinstance(out.get("schedule"), dict):
        out["schedule"].setdefault("kind", "loglinear")
    if kind == "offline" and isinstance(task, dict) and task.get("name") == "subspace":
        _deprecated(source, "an offline task.name = 'subspace'", "'linear_subspace'")
        task["name"] = "linear_subspace"
    return out


def _wrong_kind(source: str, found: str, data: dict[str, Any]) -> ConfigError:
    article = "an" if found[0] in "aeiou" else "a"
    return ConfigError(f"{source}: this is {article} {found} config (sections "
                       f"{', '.join(data) or 'none'}); run it with {COMMANDS[found]}")


def parse_config(data: Any, source: str = "<config>", kind: str | None = None) -> Any:
    """Validate a parsed config mapping as ``kind`` (default: what its sections show, else
    ``"train"``); a config of a kind another command runs is a ConfigError saying which."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(data).__name__}")
    found, expected = config_kind(data), kind
    if kind is None or (found is not None and COMMANDS[found] == COMMANDS[kind]):
        kind = found or kind or "train"
    elif found is not None:
        raise _wrong_kind(source, found, data)
    try:
        return validate(KINDS[kind], _migrate(data, kind, source), source)
    except ConfigError:
        if found is None and expected is not None:
            # shared sections only: is it a valid config of another command?
            for other in KINDS:
                if COMMANDS[other] != COMMANDS[kind]:
                    try:
                        validate(KINDS[other], _migrate(data, other, source), source)
                    except ConfigError:
                        continue
                    raise _wrong_kind(source, other, data) from None
        raise


def load_config(path: str | Path, kind: str | None = None) -> Any:
    """Read and validate a TOML config file (see :func:`parse_config`)."""
    return parse_config(read_toml(path), str(path), kind)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(u) for u in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(u)}"
                               for k, u in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: Section) -> str:
    """A config as TOML (unset values omitted); :func:`load_config` reads it back."""
    lines = [f"name = {_toml_value(cfg.name)}"]
    for section, body in cfg.model_dump(exclude={"name"}).items():
        if body is None:
            continue
        if section == "task":
            body = {**body, **cfg.task.params()}
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"
