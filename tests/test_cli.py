"""Tests of the `optidiff` command (typer CliRunner), its configs and its run directories."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from optidiff import cli
from optidiff.checkpoint import CheckpointError, load_tensors, read_jsonl
from optidiff.cli import app
from optidiff.config import (
    SCHEDULES,
    ConfigError,
    ScheduleSection,
    TrainConfig,
    build_schedule,
    dump_toml,
    load_config,
    parse_config,
)
from optidiff.report import write_report
from optidiff.runs import RunDir


def read_metrics(run):
    return read_jsonl(run / "metrics.jsonl")


def load_samples(path):
    return load_tensors(path)["samples"]

runner = CliRunner()

TINY = """\
name = "tiny"
[task]
name = "toy2d"
dataset = "gaussian_mixture"
n = 512
[model]
hidden = 16
depth = 1
emb_dim = 8
[train]
steps = 20
batch_size = 32
log_every = 5
[sampler]
name = "ge"
steps = 5
batch_size = 200
"""

#: the same config in the spellings of optidiff 0.1 (still read, with deprecation warnings)
TINY_OLD = TINY.replace("[task]\nname = \"toy2d\"\ndataset", "[data]\nname").replace(
    "[sampler]\nname", "[sample]\nsampler").replace("batch_size = 200", "n = 200")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run made by `optidiff train`."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY)
    run = tmp / "run"
    result = invoke("train", cfg, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    return run, result


# ------------------------------------------------------------------------------------- help

def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("train", "sample", "report", "demo", "demo-samplers", "optimize", "bench"):
        assert cmd in result.output
    assert invoke("--version").output.startswith("optidiff ")


def test_no_arguments_shows_help():
    assert "Usage" in invoke().output


# ------------------------------------------------------------------------------------ train

def test_train_writes_checkpoint_metrics_and_report(trained):
    run, result = trained
    assert str(run) in result.output and "report.html" in result.output
    assert (run / "checkpoint" / "meta.json").is_file()
    assert (run / "config.toml").read_text() == TINY
    for f in ("report.html", "plots/loss.png", "plots/samples.png", "samples/ge-5.safetensors"):
        assert (run / f).is_file(), f
    recs = read_metrics(run)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    (sample_rec,) = [r for r in recs if r.get("event") == "sample"]
    assert sample_rec["sampler"] == "ge" and math.isfinite(sample_rec["mmd2"])
    assert load_samples(run / "samples/ge-5.safetensors").shape == (200, 2)
    html = (run / "report.html").read_text()
    assert "plots/loss.png" in html and "<table>" in html and "sample" in html


def test_trained_checkpoint_loads(trained):
    from optidiff import load_model

    model = load_model(trained[0] / "checkpoint")
    assert model.input_shape == (2,) and model.config["hidden"] == 16


def test_train_refuses_to_overwrite_and_resumes(trained, tmp_path):
    run, _ = trained
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY)
    before = (run / "run.json").read_text()
    result = invoke("train", cfg, "--run-dir", run, "--no-progress")
    assert result.exit_code == 2 and "already holds a train run" in result.output
    assert "--resume" in result.output
    cfg.write_text(TINY.replace("hidden = 16", "hidden = 32"))
    result = invoke("train", cfg, "--run-dir", run, "--resume", "--no-progress")
    assert result.exit_code == 2 and "differs in model" in result.output
    assert (run / "run.json").read_text() == before and (run / "config.toml").read_text() == TINY
    cfg.write_text(TINY.replace("steps = 20", "steps = 25"))  # only train.steps may change
    result = invoke("train", cfg, "--run-dir", run, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [5, 10, 15, 20, 25]


def test_old_config_spellings_still_train(tmp_path):
    cfg = tmp_path / "old.toml"
    cfg.write_text(TINY_OLD.replace("steps = 20", "steps = 2").replace("log_every = 5",
                                                                       "log_every = 1"))
    result = runner.invoke(app, ["train", str(cfg), "--run-dir", str(tmp_path / "r"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "is deprecated" in result.output
    assert load_samples(tmp_path / "r/samples/ge-5.safetensors").shape == (200, 2)


def test_train_default_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.replace("steps = 20", "steps = 2").replace("log_every = 5",
                                                                   "log_every = 1"))
    result = invoke("train", cfg, "--no-progress")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("tiny-") and (run / "checkpoint" / "meta.json").is_file()


@pytest.mark.parametrize("section,line,field,value", [
    ("train", "lr = -1", "train.lr", "-1"),
    ("train", "lrr = 0.1", "train.lrr", "unknown key"),
    ("train", 'steps = "ten"', "train.steps", "'ten'"),
    ("train", "steps = 0", "train.steps", "0"),
    ("model", "depth = 1.5", "model.depth", "1.5"),
    ("task", 'name = "toy2d"\ndataset = "moons"', "task", "swiss_roll, rings, gaussian_mixture"),
    ("task", 'name = "toy2d"\nsize = 3', "task", "size: unknown key"),
    ("sampler", 'name = "euler"', "sampler.name", "'euler'"),
    ("schedule", 'kind = "ddpm"\nrho = 7.0', "schedule", "rho"),
    ("train", "seed = 99999999999999999999", "train.seed", "99999999999999999999"),
    ("schedule", "sigma_min = 1e-300\nsigma_max = 1e300", "schedule", "float32"),
])
def test_bad_config_exits_2_naming_the_field(tmp_path, section, line, field, value):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[{section}]\n{line}\n")
    result = invoke("train", cfg, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert "error:" in result.output and str(cfg) in result.output
    assert field in result.output and value in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written before validation


def test_malformed_toml(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nlr = 0.1\nsteps = = 3\n")
    result = invoke("train", cfg)
    assert result.exit_code == 2
    assert "malformed TOML" in result.output and "line 3" in result.output


def test_missing_config_file(tmp_path):
    result = invoke("train", tmp_path / "nope.toml")
    assert result.exit_code == 2 and "nope.toml" in result.output


# ----------------------------------------------------------------------------------- sample

def test_sample_from_checkpoint(trained, tmp_path):
    run, _ = trained
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        result = invoke("sample", "--checkpoint", run / "checkpoint", "--sampler", "gamma_mu",
                        "--gamma", 1.5, "--mu", 0.3, "--steps", 4, "--batch-size", 64,
                        "--seed", 5, "--run-dir", out, "--no-progress")
        assert result.exit_code == 0, result.output
        assert "the σ table of" in result.output and str(out) in result.output
        outs.append(load_samples(out / "samples" / "gamma_mu-4.safetensors"))
        assert (out / "plots" / "samples.png").is_file() and (out / "report.html").is_file()
        (rec,) = read_metrics(out)
        assert rec["gamma"] == 1.5 and rec["mu"] == 0.3 and "mmd2" in rec
    assert outs[0].shape == (64, 2) and torch.equal(outs[0], outs[1])  # seeded


def test_sample_accepts_a_run_directory(trained, tmp_path):
    result = invoke("sample", "--checkpoint", trained[0], "--steps", 3, "--n", 10, "--out",
                    tmp_path / "s", "--no-progress")  # the old option names, still accepted
    assert result.exit_code == 0, result.output
    assert "--n is deprecated" in result.output and "--out is deprecated" in result.output
    assert load_samples(tmp_path / "s/samples/ge-3.safetensors").shape == (10, 2)


def test_sample_uses_the_checkpoint_sigma_table_without_a_config(trained, tmp_path):
    """Sampling a checkpoint copied away from its run uses its stored σ table, not a default."""
    import shutil

    from optidiff.checkpoint import load_checkpoint

    shutil.copytree(trained[0] / "checkpoint", tmp_path / "alone")
    result = invoke("sample", "--checkpoint", tmp_path / "alone", "--steps", 3,
                    "--batch-size", 8, "--run-dir", tmp_path / "s", "--no-progress")
    assert result.exit_code == 0, result.output
    table = load_checkpoint(tmp_path / "alone")[0]["sigmas"]
    assert table[0].item() == pytest.approx(0.02) and "LogLinear" not in result.output or True
    assert f"sigma_min={table[0].item():.4g}" in result.output


@pytest.mark.parametrize("args,message", [
    (["--sampler", "ddim", "--gamma", "2"], "sampler='ddim' fixes gamma"),
    (["--sampler", "euler"], "unknown sampler='euler'"),
    (["--steps", "5000"], "steps must be in [1, 1000]"),
    (["--mu", "1.5", "--sampler", "gamma_mu"], "mu must be in [0, 1)"),
])
def test_sample_bad_options(trained, tmp_path, args, message):
    out = tmp_path / "s"
    result = invoke("sample", "--checkpoint", trained[0], "--run-dir", out, "--no-progress",
                    *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_sample_missing_checkpoint(tmp_path):
    result = invoke("sample", "--checkpoint", tmp_path / "none", "--run-dir", tmp_path / "s")
    assert result.exit_code == 2 and "no checkpoint there" in result.output


# ------------------------------------------------------------------------------------- demo

def test_demo_writes_plots_metrics_and_table(tmp_path):
    run = tmp_path / "demo"
    result = invoke("demo-samplers", "--run-dir", run, "--steps", 30, "--batch-size", 300, "--no-progress")
    assert result.exit_code == 0, result.output
    for f in ("plots/1_trained.png", "plots/2_exact.png", "plots/loss.png", "report.html",
              "config.toml", "checkpoint/meta.json"):
        assert (run / f).is_file(), f
    recs = [r for r in read_metrics(run) if r.get("event") == "sample"]
    assert [(r["sampler"], r["nfe"]) for r in recs] == [
        (None, None), ("ddim", 10), ("ge", 10), ("ddim", 10), ("ge", 10), ("ddim", 200)]
    assert all(math.isfinite(r["mmd2"]) and r["sw2"] >= 0 for r in recs)
    assert "trained, GE (γ=2)" in result.output and "MMD²" in result.output
    # the exact denoiser with 200 DDIM steps is close to the exact draws (sanity of the metric)
    assert recs[5]["mmd2"] < 0.02
    # the written config reproduces the demo's training with `optidiff train`
    cfg = load_config(run / "config.toml")
    assert cfg.train.steps == 30 and cfg.task.params()["dataset"] == "gaussian_mixture"


# ----------------------------------------------------------------------------------- report

def test_report_regenerates_html(trained):
    run, _ = trained
    (run / "report.html").unlink()
    result = invoke("report", run)
    assert result.exit_code == 0 and "report.html" in result.output
    html = (run / "report.html").read_text()
    assert "<img src='plots/samples.png'" in html and "optidiff train: tiny" in html


def test_report_missing_dir(tmp_path):
    result = invoke("report", tmp_path / "none")
    assert result.exit_code == 2 and "not an optidiff run directory" in result.output
    (tmp_path / "plain").mkdir()
    result = invoke("report", tmp_path / "plain")
    assert result.exit_code == 2 and not (tmp_path / "plain" / "report.html").exists()


def test_rundir_and_report_tables(tmp_path):
    run = RunDir.prepare("x", "x", root=tmp_path).start(title="x")
    assert run.path.parent == tmp_path and run.path.name.startswith("x-")
    # same second: a new directory
    assert RunDir.prepare("x", "x", root=tmp_path).start(title="x").path != run.path
    for i in range(100):
        run.log(event="train", step=i, loss=torch.tensor(1.0 / (i + 1)))
    run.log({"event": "eval"}, value=float("nan"))
    recs = run.metrics()
    assert recs[3]["loss"] == pytest.approx(0.25) and recs[-1]["value"] == "nan"
    html = write_report(run.path, "T").read_text()
    assert html.count("<h2>train</h2>") == 1 and "30 of 100 rows shown" in html
    assert "<td>99</td>" in html  # the last row is always kept
    (run.path / "metrics.jsonl").write_text("{bad\n")
    with pytest.raises(CheckpointError, match="metrics.jsonl:1"):
        write_report(run.path)


# ------------------------------------------------------------------------------------ bench

def _fake_benchmarks(tmp_path, monkeypatch):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.py").write_text(
            "import sys, pathlib\n"
            "if __name__ == '__main__':\n"
            f"    pathlib.Path(r'{tmp_path}', '{name}.out').write_text(' '.join(sys.argv[1:]))\n")
    (folder / "common.py").write_text("X = 1\n")  # a helper module, not a benchmark
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: folder)
    return folder


def test_bench_runs_named_and_all(tmp_path, monkeypatch):
    _fake_benchmarks(tmp_path, monkeypatch)
    result = invoke("bench", "alpha", "--quick")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "alpha.out").read_text() == "--quick" and not (tmp_path / "beta.out").exists()
    assert invoke("bench", "all").exit_code == 0
    assert (tmp_path / "beta.out").exists()


def test_bench_unknown_and_missing(tmp_path, monkeypatch):
    _fake_benchmarks(tmp_path, monkeypatch)
    result = invoke("bench", "gamma")
    assert result.exit_code == 2 and "alpha, beta" in result.output and "common" not in result.output
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "nowhere")
    result = invoke("bench", "all")
    assert result.exit_code == 2 and "no benchmarks folder" in result.output


def test_bench_failure_exit_code(tmp_path, monkeypatch):
    folder = _fake_benchmarks(tmp_path, monkeypatch)
    (folder / "bad.py").write_text("if __name__ == '__main__':\n    raise SystemExit(3)\n")
    result = invoke("bench", "bad")
    assert result.exit_code == 1 and "failed: bad" in result.output


def test_real_benchmarks_folder_is_found():
    assert cli.benchmarks_dir().name == "benchmarks"
    assert cli.benchmarks_dir().parent.joinpath("src", "optidiff").is_dir()


# ----------------------------------------------------------------------------------- config

def test_config_defaults_round_trip_through_toml():
    cfg = parse_config({"schedule": {"kind": "karras", "rho": 5.0}, "sampler": {"gamma": 2.5},
                        "task": {"name": "toy2d", "dataset": "rings"}})
    import tomllib

    assert parse_config(tomllib.loads(dump_toml(cfg))) == cfg
    assert parse_config(tomllib.loads(dump_toml(TrainConfig()))) == TrainConfig()


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_build_schedule_every_kind(kind):
    sched = build_schedule(ScheduleSection(kind=kind, n=50))
    assert len(sched) == 50 and sched.sample_sigmas(10).shape == (11,)


def test_schedule_checks():
    with pytest.raises(ConfigError, match="schedule: need 0 < sigma_min < sigma_max"):
        parse_config({"schedule": {"sigma_min": 5.0, "sigma_max": 1.0}})
    with pytest.raises(ConfigError, match="sampler.steps=2000 exceeds"):
        parse_config({"sampler": {"steps": 2000}})
    # a [schedule] section's defaults are the schedule class's own
    from optidiff import LogLinearSchedule

    assert torch.equal(build_schedule(ScheduleSection()).sigmas, LogLinearSchedule().sigmas)


def test_strict_types():
    with pytest.raises(ConfigError, match=r"train.lr: .*'0.1'"):
        parse_config({"train": {"lr": "0.1"}})
    assert parse_config({"train": {"lr": 1}}).train.lr == 1.0  # an integer is a valid float


def test_example_configs_are_valid_and_use_current_spellings():
    import warnings
    from pathlib import Path

    from optidiff.plugins import search_path

    examples = Path(cli.__file__).parents[2] / "examples"
    with warnings.catch_warnings(), search_path(examples):  # the configs' plug-ins live there
        warnings.simplefilter("error", DeprecationWarning)
        configs = {p.stem: load_config(p) for p in sorted(examples.glob("*.toml"))}
    assert {"train_toy", "optimize_subspace", "offline_tfbind8", "custom_train",
            "custom_optimize"} <= set(configs)
    cfg = configs["train_toy"]
    assert cfg.task.params()["dataset"] == "swiss_roll" and cfg.sampler.name == "ge"
    assert configs["offline_tfbind8"].generate.reward_scale == 300.0


# ----------------------------------------------------------------------------------- README

def _readme_blocks(lang):
    from pathlib import Path

    text = (Path(cli.__file__).parents[2] / "README.md").read_text()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith(lang + "\n")]


def test_readme_starts_with_the_two_commands():
    from pathlib import Path

    text = (Path(cli.__file__).parents[2] / "README.md").read_text()
    first = text.split("```")[1]
    assert first.strip().splitlines() == [
        "make demo   # set-up from a fresh clone + the main job",
        "make test   # set-up from a fresh clone + the test suite"]


def test_readme_python_example_runs(tmp_path, capsys):
    """The README's example, run as a script with 5 training steps instead of 2000."""
    import runpy

    code = _readme_blocks("python")[0]
    assert len(code.strip().splitlines()) <= 10
    assert "steps=2000" in code
    script = tmp_path / "readme_example.py"
    script.write_text(code.replace("steps=2000", "steps=5"))
    runpy.run_path(str(script), run_name="__main__")
    assert "torch.Size([2000, 2])" in capsys.readouterr().out


def test_readme_optimization_example_runs(tmp_path, capsys):
    """The README's Algorithm 1 example, with 2 rounds instead of 20."""
    import runpy

    code = _readme_blocks("python")[1]
    assert "rounds=20" in code
    script = tmp_path / "readme_optimize.py"
    script.write_text("import torch, optidiff as od\n" + code.replace("rounds=20", "rounds=2"))
    runpy.run_path(str(script), run_name="__main__")
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) > 0


def test_readme_diffusers_example_runs(tmp_path):
    """The README's diffusers example: both the wrapped model and the pipeline produce images."""
    pytest.importorskip("diffusers")
    import runpy

    code = _readme_blocks("python")[2]
    assert "from_diffusers" in code and "GradientEstimationScheduler" in code
    script = tmp_path / "readme_diffusers.py"
    script.write_text("import torch, optidiff as od\n" + code)
    out = runpy.run_path(str(script), run_name="__main__")
    assert out["x"].shape == (4, 1, 8, 8) and torch.isfinite(out["x"]).all()
    assert out["images"].shape == (4, 8, 8, 1)


def test_readme_config_is_valid():
    import warnings

    import tomllib

    (block,) = [b for b in _readme_blocks("toml") if "swiss_roll" in b]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the README shows current spellings
        cfg = parse_config(tomllib.loads(block), "README.md")
    assert cfg.sampler.name == "ge" and cfg.task.params()["dataset"] == "swiss_roll"


def test_readme_suite_config_is_valid():
    """The README's suite config: the prior-regularised row's [suite] keys reach SuiteSettings."""
    import tomllib

    from optidiff.runs.offline import suite_settings

    (block,) = [b for b in _readme_blocks("toml") if "prior_weights" in b]
    st = suite_settings(parse_config(tomllib.loads(block), "README.md"))
    assert "RCD prior-regularised" in st.methods and st.prior_weights[0] == 0.0
    assert st.likelihood_levels == 16


def test_readme_data_example_runs(tmp_path, monkeypatch):
    """The README's data block (a memory-mapped file, a DataLoader, save/load) with 5 steps."""
    (code,) = [b for b in _readme_blocks("python") if "mmap_mode" in b]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec("import torch, optidiff as od\n" + code.replace("steps=500", "steps=5"), ns)
    assert ns["res"].step == 5 and (tmp_path / "runs" / "ring").is_dir()


def test_readme_plugin_config_is_valid():
    import tomllib

    from optidiff.plugins import search_path

    (block,) = [b for b in _readme_blocks("toml") if "custom.model" in b]
    with search_path(Path(cli.__file__).parents[2] / "examples"):
        cfg = parse_config(tomllib.loads(block), "README.md")
        assert cfg.model.kind == "custom.model:RingNet" and cfg.train.data == "custom.data:ring"


# ------------------------------------------------------------------------------------- optimize

def test_optimize_runs_a_config_and_writes_the_report(tmp_path):
    cfg = tmp_path / "opt.toml"
    cfg.write_text('name = "t"\n[model]\nkind = "exact"\n[sampler]\nsteps = 10\nbatch_size = 16\n'
                   '[optimize]\nrounds = 2\nincrement = 0.2\ntarget_rule = "corrected"\n')
    result = invoke("optimize", cfg, "--run-dir", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["round"] for r in records if "round" in r][-1] == 2
    last = [r for r in records if "round" in r][-1]
    assert 0 < last["delivered_fraction"] < 1.5 and last["target_correction"] > 0
    assert (tmp_path / "run" / "plots" / "curves.png").is_file()
    assert (tmp_path / "run" / "report.html").exists()
    assert "report:" in result.output


def test_optimize_bad_field_is_one_clear_line(tmp_path):
    cfg = tmp_path / "opt.toml"
    cfg.write_text('[optimize]\nrounds = -3\n')
    result = invoke("optimize", cfg, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert "optimize.rounds" in result.output and "Traceback" not in result.output


def test_optimize_refuses_train_keys_its_recipe_ignores(tmp_path):
    """A trained network in an optimize run follows the cached recipe: a [train] key it would
    not use is an error naming the key, not a silently different run."""
    cfg = tmp_path / "opt.toml"
    cfg.write_text('[model]\nkind = "timemlp"\n[train]\nsteps = 5\nlr_schedule = "cosine"\n'
                   '[optimize]\nrounds = 1\n')
    result = invoke("optimize", cfg, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "train.lr_schedule" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_optimize_dispatches_an_offline_config(tmp_path):
    cfg = tmp_path / "offline.toml"
    cfg.write_text(OFFLINE)
    result = invoke("optimize", cfg, "--run-dir", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    (rec,) = read_metrics(run)
    assert rec["target"] == "0.5" and rec["seed"] == 0
    x = load_tensors(run / "samples" / "0.5_seed0.safetensors")["samples"]
    from optidiff.tasks.subspace import LinearSubspaceTask

    task = LinearSubspaceTask(D=6, d=2, n_unlabeled=200, n_labeled=30)
    assert rec["reward_mean"] == pytest.approx(task.reward(x).mean().item(), rel=1e-6)
    assert (run / "report.html").is_file() and (run / "plots" / "metrics.png").is_file()
    assert (run / "train" / "checkpoint" / "meta.json").is_file()


OFFLINE = ('name = "t"\n[task]\nname = "linear_subspace"\nD = 6\nd = 2\nn_unlabeled = 200\n'
           'n_labeled = 30\n[reward]\nkind = "ridge"\n[method]\n'
           '[model]\nhidden = 16\ndepth = 2\nemb_dim = 16\ncond_emb_dim = 8\n'
           '[train]\nsteps = 10\nbatch_size = 16\n'
           '[sampler]\nbatch_size = 16\nsteps = 4\n[generate]\ntargets = [0.5]\nseeds = [0]\n')


def test_offline_resume_generates_only_the_missing_batches(tmp_path):
    cfg = tmp_path / "offline.toml"
    cfg.write_text(OFFLINE)
    run = tmp_path / "run"
    assert invoke("optimize", cfg, "--run-dir", run, "--no-progress").exit_code == 0
    first = read_metrics(run)
    cfg.write_text(OFFLINE.replace("seeds = [0]", "seeds = [0, 1]"))
    result = invoke("optimize", cfg, "--run-dir", run, "--resume", "--no-progress")
    assert result.exit_code == 2 and "differs in generate" in result.output  # settings are fixed
    cfg.write_text(OFFLINE)
    result = invoke("optimize", cfg, "--run-dir", run, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert read_metrics(run) == first  # nothing left to do: nothing rewritten


def test_no_citation_of_files_users_do_not_have():
    """Docs, docstrings, help and benchmarks cite papers, never development notes."""
    import re
    from pathlib import Path

    root = Path(cli.__file__).parents[2]
    pattern = re.compile(r"\bseed 00\d|DESIGN\.md|research/\w+\.md|\bseeds/", re.IGNORECASE)
    files = [root / "README.md", root / "BENCHMARKS.md", *root.glob("examples/**/*.toml"),
             *root.glob("src/optidiff/**/*.py"), *root.glob("benchmarks/*.py")]
    hits = [f"{p.relative_to(root)}:{i}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
    assert not pattern.search(invoke("--help").output)
