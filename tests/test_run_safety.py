"""Runs are safe to repeat: no command overwrites what it did not write, and every failure a user
can cause is one ``error:`` line naming the file and the field (exit code 2)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import optidiff as od
from optidiff.cli import app

runner = CliRunner()

TRAIN = """name = "tiny"
[task]
name = "toy2d"
n = 256
[model]
hidden = 8
depth = 1
emb_dim = 8
[train]
steps = {steps}
batch_size = 16
log_every = 2
checkpoint_every = 2
[sampler]
steps = 3
batch_size = 16
"""

OPTIMIZE = """name = "opt"
[task]
name = "subspace"
[model]
kind = "exact"
[sampler]
steps = 5
batch_size = 8
[optimize]
rounds = {rounds}
"""


def invoke(*args):
    quiet = [] if args[0] == "report" else ["--no-progress"]
    return runner.invoke(app, [str(a) for a in args] + quiet)


def one_error(result, *fragments):
    """Exit code 2, exactly one ``error:`` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for f in fragments:
        assert str(f) in errors[0], (f, errors[0])
    assert "Traceback" not in result.output


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished train run and a finished optimize run."""
    tmp = tmp_path_factory.mktemp("runs")
    (tmp / "train.toml").write_text(TRAIN.format(steps=4))
    (tmp / "opt.toml").write_text(OPTIMIZE.format(rounds=2))
    assert invoke("train", tmp / "train.toml", "--run-dir", tmp / "train").exit_code == 0
    assert invoke("optimize", tmp / "opt.toml", "--run-dir", tmp / "opt").exit_code == 0
    return tmp


# ---------------------------------------------------------------- 1. nothing is overwritten

@pytest.mark.parametrize("command", [
    lambda t: ("train", t / "train.toml", "--run-dir", t / "opt"),
    lambda t: ("train", t / "train.toml", "--run-dir", t / "train"),
    lambda t: ("optimize", t / "opt.toml", "--run-dir", t / "train"),
    lambda t: ("sample", "--checkpoint", t / "train", "--run-dir", t / "opt"),
    lambda t: ("sample", "--checkpoint", t / "train", "--run-dir", t / "train"),
    lambda t: ("demo", "--run-dir", t / "opt", "--rounds", 1),
    lambda t: ("demo-samplers", "--run-dir", t / "train", "--steps", 2),
])
def test_no_command_writes_into_a_run_it_did_not_make(runs, command):
    before = {name: snapshot(runs / name) for name in ("train", "opt")}
    one_error(invoke(*command(runs)), "--run-dir")
    assert {name: snapshot(runs / name) for name in ("train", "opt")} == before


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, runs):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    one_error(invoke("train", runs / "train.toml", "--run-dir", tmp_path / "mine"),
              "not an optidiff run directory")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- 2. refusals leave no trace

def test_refused_resumes_leave_the_run_untouched(runs, tmp_path):
    fewer = tmp_path / "fewer.toml"
    fewer.write_text(TRAIN.format(steps=2))
    before = snapshot(runs / "train")
    one_error(invoke("train", fewer, "--run-dir", runs / "train", "--resume"),
              "step 4", "train.steps = 2")
    assert snapshot(runs / "train") == before
    before = snapshot(runs / "opt")
    one_error(invoke("optimize", fewer, "--run-dir", runs / "opt", "--resume"), "train config")
    assert snapshot(runs / "opt") == before


# ---------------------------------------------------------------- 3, 4. readable errors

def _checkpoint_copy(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "train" / "checkpoint", tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("damage, fragment", [
    (lambda m: m["meta"]["model"]["config"].update(hidden=32), "weights do not fit"),
    (lambda m: m["meta"]["model"]["config"].update(colour=1), "colour"),
    (lambda m: m.update(meta=[1]), "not a JSON object"),
])
def test_a_checkpoint_whose_json_does_not_match_its_tensors(runs, tmp_path, damage, fragment):
    ckpt = _checkpoint_copy(runs, tmp_path)
    record = json.loads((ckpt / "meta.json").read_text())
    damage(record)
    (ckpt / "meta.json").write_text(json.dumps(record))
    one_error(invoke("sample", "--checkpoint", ckpt, "--run-dir", tmp_path / "s"), ckpt,
              fragment)
    assert not (tmp_path / "s").exists()


def test_a_2d_checkpoint_for_a_64d_task(runs, tmp_path):
    cfg = tmp_path / "load.toml"
    cfg.write_text(OPTIMIZE.format(rounds=1).replace(
        'kind = "exact"', f'kind = "load"\ncheckpoint = "{runs / "train" / "checkpoint"}"'))
    one_error(invoke("optimize", cfg, "--run-dir", tmp_path / "r"), cfg, "model.checkpoint",
              "(2,)", "(64,)")
    cfg.write_text(OPTIMIZE.format(rounds=1).replace(
        'kind = "exact"', 'kind = "load"\ncheckpoint = "nowhere"'))
    one_error(invoke("optimize", cfg, "--run-dir", tmp_path / "r"), "model.checkpoint",
              "nowhere")
    assert not (tmp_path / "r").exists()


def _opt_copy(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "opt", tmp_path / "opt")
    cfg = tmp_path / "more.toml"
    cfg.write_text(OPTIMIZE.format(rounds=3))
    return tmp_path / "opt", cfg


def test_a_truncated_optimization_state_on_resume(runs, tmp_path):
    run, cfg = _opt_copy(runs, tmp_path)
    (tensors,) = (run / "state").glob("tensors-*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    one_error(invoke("optimize", cfg, "--run-dir", run, "--resume"), "state", "truncated")
    (run / "state" / "meta.json").write_text("{damaged")
    one_error(invoke("optimize", cfg, "--run-dir", run, "--resume"), "state/meta.json",
              "invalid JSON")


def test_a_half_written_metrics_line_does_not_stop_a_resume(runs, tmp_path):
    run, cfg = _opt_copy(runs, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "rew')  # killed during an append
    result = invoke("optimize", cfg, "--run-dir", run, "--resume")
    assert result.exit_code == 0, result.output
    rounds = [r["round"] for r in od.checkpoint.read_jsonl(run / "metrics.jsonl")]
    assert rounds == [0, 1, 2, 3]


@pytest.mark.parametrize("text, fragments", [
    ("[train]\nseed = 99999999999999999999\n", ("train.seed", "99999999999999999999")),
    ("[schedule]\nsigma_min = 1e-300\nsigma_max = 1e300\n", ("schedule", "float32")),
    ("[optimize]\nrounds = 1\n", ("optimize config", "optidiff optimize")),
])
def test_config_values_that_would_fail_later_fail_now(tmp_path, text, fragments):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    one_error(invoke("train", cfg, "--run-dir", tmp_path / "r"), cfg, *fragments)
    assert not (tmp_path / "r").exists()


def test_a_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b'name = "caf\xe9"\n')
    one_error(invoke("train", cfg), cfg, "UTF-8")


def test_unobtainable_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIDIFF_TFBIND8_FILE", str(tmp_path / "missing.txt"))
    cfg = tmp_path / "tf.toml"
    cfg.write_text('[task]\nname = "tfbind8"\n[method]\n')
    one_error(invoke("optimize", cfg, "--run-dir", tmp_path / "r"), "OPTIDIFF_TFBIND8_FILE")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- 5, 8, 9. CLI words

def test_resume_without_a_run_dir_is_refused_in_cli_words(runs):
    for cmd in (("train", runs / "train.toml"), ("optimize", runs / "opt.toml")):
        one_error(invoke(*cmd, "--resume"), "--resume needs --run-dir")


def test_optimize_prints_its_run_directory_first(runs, tmp_path):
    result = invoke("optimize", runs / "opt.toml", "--run-dir", tmp_path / "r")
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == f"run directory: {tmp_path / 'r'}"
    assert "resume=True" not in invoke("optimize", runs / "opt.toml", "--run-dir",
                                       tmp_path / "r").output


# ---------------------------------------------------------------- 10. right σ, right kind

def test_sample_reads_the_checkpoint_sigmas(runs, tmp_path):
    result = invoke("sample", "--checkpoint", runs / "train", "--run-dir", tmp_path / "s",
                    "--steps", 2, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    table = od.checkpoint.load_checkpoint(runs / "train" / "checkpoint")[0]["sigmas"]
    assert torch.equal(table, od.LogLinearSchedule().sigmas)  # the [schedule] default
    assert "the σ table of" in result.output


def test_report_only_rebuilds_run_directories(tmp_path):
    (tmp_path / "x").mkdir()
    one_error(invoke("report", tmp_path / "x"), "not an optidiff run directory")
    assert list((tmp_path / "x").iterdir()) == []


def test_a_train_config_given_to_optimize(runs):
    one_error(invoke("optimize", runs / "train.toml"), "this is a train config",
              "optidiff train")
