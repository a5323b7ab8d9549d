"""Property: every config loader either validates a TOML file or raises ConfigError; nothing else
escapes (random keys, types, values and nesting, near the real schema and far from it)."""

from __future__ import annotations

import json
import math
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optidiff.config import KINDS, ConfigError, load_config

#: real section and key names, so that many generated configs get deep into validation
SECTIONS = ["task", "model", "schedule", "train", "sampler", "optimize", "finetune", "reward",
            "method", "generate", "data", "sample"]
KEYS = ["name", "kind", "objective", "seed", "dataset", "n", "steps", "batch_size", "lr",
        "hidden", "depth", "emb_dim", "checkpoint", "sigma_min", "sigma_max", "rho", "gamma",
        "mu", "rounds", "increment", "target", "beta", "guidance", "algorithm", "targets",
        "seeds", "cfg_scale", "reward_scale", "D", "d", "n_unlabeled", "n_labeled", "ensemble",
        "sampler", "channel_mult", "final_zero", "cache", "prior", "noise", "off_angle"]
NAMES = ["toy2d", "subspace", "sphere", "linear_subspace", "digits", "timemlp", "exact", "load",
         "loglinear", "karras", "ddom", "ge", "ddim", "ddpm", "lookahead", "naive", "adaptive",
         "f1_off", "max", "q90", "ridge", "mlp", "none", "gradient_ascent", "rings", "euler"]

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # TOML: no surrogates
key = st.one_of(st.sampled_from(KEYS), text.filter(bool))
scalar = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.booleans(), st.sampled_from(NAMES), text)
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=3)), max_leaves=8)
section = st.dictionaries(key, value, max_size=6)
config = st.dictionaries(st.one_of(st.sampled_from(SECTIONS), key),
                         st.one_of(section, scalar), max_size=6)


def _q(v: str) -> str:
    """A TOML basic string (JSON's escapes, with non-ASCII characters kept literal)."""
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v) if -(2**63) <= v < 2**63 else f'"{v}"'  # TOML integers are 64-bit
    if isinstance(v, str):
        return _q(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(u) for u in v) + "]"
    return "{" + ", ".join(f"{_q(k)} = {_toml_value(u)}" for k, u in v.items()) + "}"


def to_toml(data: dict) -> str:
    top = [f"{_q(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{_q(k)}]\n" + "\n".join(f"{_q(a)} = {_toml_value(b)}" for a, b in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=config, kind=st.sampled_from([None, *KINDS]))
def test_every_loader_validates_or_raises_config_error(tmp_path, data, kind):
    path = tmp_path / "fuzz.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            cfg = load_config(path, kind)
        except ConfigError as e:
            assert str(e).startswith(str(path)), e
            return
    assert type(cfg) in KINDS.values()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_text_is_a_config_error_or_a_config(tmp_path, text):
    path = tmp_path / "text.toml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        load_config(path)
    except ConfigError:
        pass


#: valid configs of each kind, mutated below one value at a time
VALID = [
    {"task": {"name": "toy2d", "dataset": "rings", "n": 100}, "model": {"hidden": 8},
     "schedule": {"kind": "karras", "rho": 7.0}, "train": {"steps": 3}, "sampler": {"steps": 4}},
    {"task": {"name": "subspace", "objective": "f1_in"}, "model": {"kind": "exact"},
     "sampler": {"name": "ddpm", "steps": 5, "batch_size": 4},
     "optimize": {"algorithm": "adaptive", "rounds": 2}, "finetune": {"lr": 1e-4}},
    {"task": {"name": "linear_subspace", "D": 6, "d": 2}, "reward": {"kind": "mlp"},
     "method": {"reweight": True}, "model": {"hidden": 8, "cond_emb_dim": 4},
     "generate": {"targets": [0.5, "q90"], "cfg_scale": 2.0}},
]


@st.composite
def mutated(draw):
    data = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    sec = draw(st.sampled_from(sorted(data)))
    k = draw(st.one_of(st.sampled_from(sorted(data[sec])), key))
    data[sec][k] = draw(value)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated(), kind=st.sampled_from([None, *KINDS]))
def test_one_bad_value_in_a_valid_config_is_a_config_error(tmp_path, data, kind):
    test_every_loader_validates_or_raises_config_error.hypothesis.inner_test(tmp_path, data, kind)


def test_the_valid_configs_are_valid(tmp_path):
    for data in VALID:
        path = tmp_path / "v.toml"
        path.write_text(to_toml(data))
        load_config(path)
