"""What the TOML-configured runs share: strict sections, checked names, readable errors.

The three configurations (``optidiff train`` in :mod:`optidiff.config`, ``optidiff optimize`` in
:mod:`optidiff.runs`, offline runs in :mod:`optidiff.optimize.offline`) are pydantic models built
from :class:`Section`; :func:`validate` turns every problem into one :class:`ConfigError` that
names the source, the field path (``train.lr``) and the offending value, before any work starts.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["ConfigError", "RunName", "Section", "choice", "one_of", "read_toml", "validate"]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


class Section(BaseModel):
    """A config section: unknown keys are errors (typos do not pass silently), no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


#: a run's name: it names the run directory ``runs/<name>-<time>``
RunName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]


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
    except OSError as e:
        raise error(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: malformed TOML: {e}") from None
