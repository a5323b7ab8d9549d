"""Validated run configurations: a TOML file with sections ``[data]``, ``[model]``, ``[schedule]``,
``[train]`` and ``[sample]`` (see ``examples/train_toy.toml``).

:func:`load_config` parses and validates the file; every problem becomes a :class:`ConfigError`
whose message names the file, the field path (``train.lr``) and the offending value, before any
work starts. Unknown keys are errors (``extra="forbid"``), so typos do not pass silently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from . import schedules as S
from .sampling import SAMPLERS, resolve_sampler
from .schema import ConfigError, RunName, choice, read_toml, validate
from .schema import Section as _Section
from .tasks.toy2d import DATASETS

__all__ = [
    "SCHEDULES",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "SampleConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_schedule",
    "dump_toml",
    "load_config",
    "parse_config",
]


class DataConfig(_Section):
    """``[data]``: which toy 2-D data set, how many points, drawn with which seed."""

    name: choice(DATASETS, "data set") = "gaussian_mixture"
    n: int = Field(20_000, gt=0)
    seed: int = 0


class ModelConfig(_Section):
    """``[model]``: a :class:`~optidiff.models.TimeMLP`."""

    hidden: int = Field(128, gt=0)
    depth: int = Field(3, gt=0)
    emb_dim: int = Field(64, gt=0, multiple_of=2)


#: schedule kind -> (class, parameters it accepts)
SCHEDULES: dict[str, tuple[type, tuple[str, ...]]] = {
    "loglinear": (S.LogLinearSchedule, ("sigma_min", "sigma_max", "n")),
    "ddpm": (S.DDPMSchedule, ("n", "beta_start", "beta_end")),
    "ldm": (S.LDMSchedule, ("n", "beta_start", "beta_end")),
    "cosine": (S.CosineSchedule, ("n", "s", "max_beta")),
    "sigmoid": (S.SigmoidSchedule, ("n", "beta_start", "beta_end")),
    "karras": (S.KarrasSchedule, ("sigma_min", "sigma_max", "rho", "n")),
}


class ScheduleConfig(_Section):
    """``[schedule]``: ``kind`` plus only the parameters that kind takes (others are errors).
    Defaults: log-linear σ ∈ [0.01, 10] with n = 1000 (smalldiffusion's toy example range)."""

    kind: Literal["loglinear", "ddpm", "ldm", "cosine", "sigmoid", "karras"] = "loglinear"
    n: int = Field(1000, ge=2)
    sigma_min: float | None = Field(None, gt=0)
    sigma_max: float | None = Field(None, gt=0)
    beta_start: float | None = Field(None, gt=0, lt=1)
    beta_end: float | None = Field(None, gt=0, lt=1)
    rho: float | None = Field(None, gt=0)
    s: float | None = Field(None, ge=0)
    max_beta: float | None = Field(None, gt=0, lt=1)

    def params(self) -> dict[str, Any]:
        """The constructor arguments of this kind that are set (loglinear gets 0.01–10 by default)."""
        out = {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}
        if self.kind == "loglinear":
            out = {"sigma_min": 0.01, "sigma_max": 10.0, **out}
        return out

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        allowed = SCHEDULES[self.kind][1]
        extra = [k for k, v in self.model_dump(exclude={"kind"}).items()
                 if v is not None and k not in allowed]
        if extra:
            raise ValueError(f"kind={self.kind!r} takes {', '.join(allowed)}; not "
                             f"{', '.join(extra)}")
        build_schedule(self)  # the schedule's own checks (e.g. sigma_min < sigma_max)
        return self


class TrainConfig(_Section):
    """``[train]``: arguments of :func:`optidiff.train`."""

    steps: int = Field(5000, gt=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    seed: int = 0
    checkpoint_every: int | None = Field(None, gt=0)
    log_every: int = Field(100, gt=0)


class SampleConfig(_Section):
    """``[sample]``: the sampler run after training (see ``optidiff.sampling``)."""

    sampler: choice(SAMPLERS, "sampler") = "ge"
    steps: int = Field(10, gt=0)
    n: int = Field(2000, gt=0)
    gamma: float | None = Field(None, gt=0, allow_inf_nan=False)
    mu: float | None = Field(None, ge=0, lt=1)
    seed: int = 0
    final_zero: bool = True

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        resolve_sampler(self.sampler, self.gamma, self.mu)  # e.g. sampler='ddim' with gamma=2
        return self


class RunConfig(_Section):
    """A whole training run; ``name`` names the run directory ``runs/<name>-<time>``."""

    name: RunName = "toy"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.sample.steps > self.schedule.n:
            raise ValueError(f"sample.steps={self.sample.steps} exceeds the schedule's "
                             f"schedule.n={self.schedule.n} noise levels")
        return self


def build_schedule(cfg: ScheduleConfig) -> S.Schedule:
    """The schedule object of a ``[schedule]`` section."""
    cls, _ = SCHEDULES[cfg.kind]
    return cls(**cfg.params())


def parse_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a parsed config mapping; errors become one :class:`ConfigError` naming ``source``."""
    return validate(RunConfig, data, source)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run configuration."""
    return parse_config(read_toml(path), str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: RunConfig) -> str:
    """The config as TOML (unset optional parameters omitted); ``load_config`` reads it back."""
    lines = [f"name = {_toml_value(cfg.name)}"]
    for section, body in cfg.model_dump(exclude={"name"}).items():
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"
