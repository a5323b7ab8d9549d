"""The machinery of the TOML configurations: strict sections, checked names, readable errors.

The schemas themselves are in :mod:`optidiff.config`; they are pydantic models built from
:class:`Section`. :func:`validate` turns every problem into one :class:`ConfigError` that names the
source, the field path (``train.lr``) and the offending value, before any work starts;
:func:`read_toml` reads a file (any unreadable, non-UTF-8 or malformed file is a ConfigError
naming it); :func:`move_keys` carries a deprecated spelling over to the current one with a
DeprecationWarning.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ConfigError",
    "RunName",
    "Section",
    "Seed",
    "choice",
    "move_keys",
    "one_of",
    "read_toml",
    "validate",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


class Section(BaseModel):
    """A config section: unknown keys are errors (typos do not pass silently), no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


#: a run's name: it names the run directory ``runs/<name>-<time>``
RunName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
#: a seed: an integer in [0, 2⁶³) (``torch.Generator.manual_seed`` takes 64 bits)
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


def one_of(value: str, choices: Collection[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else ValueError naming ``what`` and the choices."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def choice(choices: Collection[str], what: str) -> Any:
    """A string field type accepting only ``choices`` (a registry that may grow, unlike Literal)."""
    return Annotated[str, AfterValidator(partial(one_of, choices=choices, what=what))]


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


def validate(model: type[M], data: Any, source: str = "<config>",
             error: type[ConfigError] = ConfigError) -> M:
    """``model`` validated from a parsed mapping; every problem in one ``error`` naming ``source``."""
    if not isinstance(data, dict):
        raise error(f"{source}: a config must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(f"{source}: " + "; ".join(_describe(x) for x in e.errors())) from None


def read_toml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The TOML file as a dict; ``error`` naming the file for an unreadable or malformed one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: a config file must be UTF-8 text ({e.reason} at byte "
                    f"{e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: malformed TOML: {e}") from None


def move_keys(data: dict[str, Any], moves: list[tuple[str, str]], source: str) -> dict[str, Any]:
    """A copy of ``data`` with each deprecated key path ``old`` (``"section.key"`` or
    ``"section"``) moved to ``new``, with a DeprecationWarning naming both; giving both spellings
    is a ConfigError."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in moves:
        (osec, _, okey), (nsec, _, nkey) = old.partition("."), new.partition(".")
        holder = out.get(osec) if okey else out
        name = okey or osec
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder.pop(name)
        if okey and not holder and osec != nsec:
            out.pop(osec)
        target = out.setdefault(nsec, {}) if nkey else out
        if not isinstance(target, dict):
            raise ConfigError(f"{source}: {nsec} must be a table, got {target!r}")
        key = nkey or nsec
        if key in target:
            raise ConfigError(f"{source}: give {new} (the new name of {old}), not both")
        target[key] = value
        warnings.warn(f"{source}: {old} is deprecated; write {new}", DeprecationWarning,
                      stacklevel=3)
    return out
