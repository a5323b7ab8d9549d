"""Plug-ins by import string: the user's model, data, task and objective in configs, and the
user's network class round-tripping through checkpoints by its import path (never a pickle)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import optidiff as od
from optidiff.checkpoint import CheckpointError, read_jsonl, save_checkpoint
from optidiff.cli import app
from optidiff.plugins import is_import_path, load_object, search_path

EXAMPLES = Path(__file__).parents[1] / "examples"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def custom():
    """The examples' ``custom`` package, importable."""
    with search_path(EXAMPLES):
        yield


def test_import_paths_and_their_errors():
    assert load_object("optidiff.models:TimeMLP") is od.models.TimeMLP
    assert load_object("optidiff.schedules:LogLinearSchedule.sample_sigmas") \
        is od.LogLinearSchedule.sample_sigmas
    assert is_import_path("a.b:c.d") and not is_import_path("a.b") and not is_import_path("a:")
    with pytest.raises(ValueError, match=r"model.kind: 'nocolon' is not an import path"):
        load_object("nocolon", "model.kind")
    with pytest.raises(ValueError, match=r"train.data: cannot import module 'no_such_mod' of "
                                         r"'no_such_mod:f': ModuleNotFoundError"):
        load_object("no_such_mod:f", "train.data")
    with pytest.raises(ValueError, match=r"task: module 'optidiff' has no attribute 'Nope'"):
        load_object("optidiff:Nope", "task")


def test_search_path_is_restored(tmp_path):
    before = list(sys.path)
    with search_path(tmp_path, tmp_path):
        assert sys.path[0] == str(tmp_path.resolve()) and sys.path.count(str(tmp_path)) == 1
    assert sys.path == before


def test_a_users_class_round_trips_by_import_path_in_a_fresh_process(custom, tmp_path):
    from custom.model import RingNet

    from optidiff.checkpoint import load_checkpoint, save_tensors

    torch.manual_seed(0)
    net = RingNet(hidden=16)
    path = od.save_model(tmp_path / "m", net)
    assert load_checkpoint(path)[1]["model"] == {"class": "custom.model:RingNet",
                                                 "config": {"dim": 2, "hidden": 16}}
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    save_tensors(tmp_path / "ref.safetensors", {"eps": net(x, torch.tensor(0.7)).detach()})
    code = ("import torch, optidiff as od; from optidiff.checkpoint import load_tensors; "
            f"m = od.load_model(r'{path}'); "
            "x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)); "
            "assert type(m).__module__ == 'custom.model'; "
            f"assert torch.equal(m(x, torch.tensor(0.7)), "
            f"load_tensors(r'{tmp_path / 'ref.safetensors'}')['eps'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=120)  # a new process: the class is imported by path
    assert done.returncode == 0, done.stderr


def test_a_checkpoint_cannot_name_anything_but_a_registered_class(tmp_path):
    for name in ("os:system", "collections:OrderedDict", "custom_missing.mod:Net"):
        save_checkpoint(tmp_path / name.replace(":", "_"), {"model.w": torch.zeros(1)},
                        {"kind": "model", "model": {"class": name, "config": {"command": "x"}}})
        with pytest.raises(CheckpointError, match="is not a registered model class|cannot import"):
            od.load_model(tmp_path / name.replace(":", "_"))


def test_unregistered_user_network_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\nclass Plain(torch.nn.Module):\n    def forward(self, x, s, c=None):\n"
        "        return x\n")
    cfg = tmp_path / "t.toml"
    cfg.write_text('[model]\nkind = "mynets:Plain"\n[train]\nsteps = 2\n')
    monkeypatch.chdir(tmp_path)
    result = invoke("train", cfg, "--run-dir", tmp_path / "run", "--no-progress")
    assert result.exit_code == 2
    assert "model.kind" in result.output and "register_model" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_plugin_fields_are_config_errors(tmp_path):
    from optidiff.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="model.kind: .*unknown model kind 'resnet'"):
        parse_config({"model": {"kind": "resnet"}})
    with pytest.raises(ConfigError, match="model kind 'timemlp' takes .* not args"):
        parse_config({"model": {"kind": "timemlp", "args": {"a": 1}}})
    with pytest.raises(ConfigError, match="train.data: .*not an import path"):
        parse_config({"train": {"data": "data.npy"}})
    with pytest.raises(ConfigError, match="data_args needs data"):
        parse_config({"train": {"data_args": {"n": 3}}})
    with pytest.raises(ConfigError, match="task: name: cannot import module 'nowhere'"):
        parse_config({"task": {"name": "nowhere:Task"}})


def test_custom_example_trains_and_optimizes_end_to_end(tmp_path, monkeypatch):
    """examples/custom: `optidiff train` with the user's network, data and task, then `optidiff
    optimize` of the user's objective on the trained checkpoint; the objective climbs."""
    monkeypatch.chdir(EXAMPLES)  # the current directory puts `custom` on the module path
    train_cfg, opt_cfg = tmp_path / "train.toml", tmp_path / "optimize.toml"
    train_cfg.write_text((EXAMPLES / "custom_train.toml").read_text()
                         .replace("steps = 3000", "steps = 400"))
    opt_cfg.write_text((EXAMPLES / "custom_optimize.toml").read_text()
                       .replace("runs/custom-train/checkpoint", str(tmp_path / "t/checkpoint"))
                       .replace("rounds = 8", "rounds = 3"))
    result = invoke("train", train_cfg, "--run-dir", tmp_path / "t", "--no-progress")
    assert result.exit_code == 0, result.output
    (sample_rec,) = [r for r in read_jsonl(tmp_path / "t/metrics.jsonl")
                     if r.get("event") == "sample"]
    assert sample_rec["radius_deviation"] < 0.3  # the user's metric, on the samples
    result = invoke("optimize", opt_cfg, "--run-dir", tmp_path / "o", "--no-progress")
    assert result.exit_code == 0, result.output
    rounds = [r for r in read_jsonl(tmp_path / "o/metrics.jsonl") if "round" in r]
    assert rounds[-1]["reward_mean"] > rounds[0]["reward_mean"] + 0.2
    assert (tmp_path / "o/report.html").is_file()
