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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from . import schedules as S
from .sampling import SAMPLERS, resolve_sampler
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


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataConfig(_Section):
    """``[data]``: which toy 2-D data set, how many points, drawn with which seed."""

    name: str = "gaussian_mixture"
    n: int = Field(20_000, gt=0)
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown data set, choose one of {', '.join(DATASETS)}")
        return v


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

    sampler: str = "ge"
    steps: int = Field(10, gt=0)
    n: int = Field(2000, gt=0)
    gamma: float | None = Field(None, gt=0, allow_inf_nan=False)
    mu: float | None = Field(None, ge=0, lt=1)
    seed: int = 0
    final_zero: bool = True

    @field_validator("sampler")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler, choose one of {', '.join(SAMPLERS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        resolve_sampler(self.sampler, self.gamma, self.mu)  # e.g. sampler='ddim' with gamma=2
        return self


class RunConfig(_Section):
    """A whole training run; ``name`` names the run directory ``runs/<name>-<time>``."""

    name: str = Field("toy", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
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


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (value {err['input']!r})"
    if err["type"] == "missing":
        return f"{loc}: required"
    if isinstance(err.get("input"), dict):  # a section-level check: the section's own message
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def parse_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a parsed config mapping; errors become one :class:`ConfigError` naming ``source``."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(x) for x in e.errors())) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file as a dict; ConfigError naming the file for an unreadable or malformed one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None


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
