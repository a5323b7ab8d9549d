"""Results as data: training and optimization results saved and loaded back, and the run
directories of the library calls and of the commands read with the same call."""

import pytest
import torch

import optidiff as od
from optidiff.checkpoint import CheckpointError
from optidiff.tasks.subspace import SubspaceTask


def _data(n=512):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0))


def _same_modules(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("written_by", ["save", "run_dir"])
def test_train_result_round_trip(tmp_path, written_by):
    torch.manual_seed(0)
    net = od.models.TimeMLP(3, hidden=16, depth=2, emb_dim=8)
    kw = {"run_dir": tmp_path / "run"} if written_by == "run_dir" else {}
    res = od.train(net, _data(), steps=12, batch_size=32, ema_decay=0.9, progress=False, **kw)
    where = res.save(tmp_path / "saved") if written_by == "save" else tmp_path / "run"
    back = od.TrainResult.load(where)
    assert back.step == 12 and back.losses == res.losses
    assert _same_modules(back.model, res.model) and _same_modules(back.ema, res.ema)
    assert not _same_modules(back.model, back.ema)  # the two sets of weights stay apart
    opt, ref = back.optimizer.state_dict(), res.optimizer.state_dict()
    assert opt["param_groups"][0]["lr"] == ref["param_groups"][0]["lr"]
    assert all(torch.equal(opt["state"][i]["exp_avg"], ref["state"][i]["exp_avg"])
               for i in ref["state"])
    res.save(tmp_path / "copy")
    with pytest.raises(FileExistsError, match="already holds checkpoint"):
        res.save(tmp_path / "copy")  # never over another result


def _optimize(run_dir=None, rounds=2):
    task = SubspaceTask(seed=0)
    sig = od.LogLinearSchedule(0.01, 40).sample_sigmas(8, final_zero=True)
    return od.optimize.gradient_guided(task.exact_model(), task.objective("f1_in"), sig,
                                       rounds=rounds, batch_size=8, increment=0.2,
                                       metrics=task.metrics, run_dir=run_dir, seed=0,
                                       progress=False)


def _check_same(back, res):
    assert back.history == res.history
    for k in ("samples", "rewards", "best_samples", "best_rewards"):
        assert torch.equal(getattr(back, k), getattr(res, k)), k
    assert back.curve("reward_mean") == res.curve("reward_mean")


def test_optimize_result_round_trip_saved_and_from_its_run_dir(tmp_path):
    res = _optimize(run_dir=tmp_path / "run")
    _check_same(od.optimize.load_result(tmp_path / "run"), res)  # the run's own directory
    res.save(tmp_path / "saved")
    back = od.optimize.load_result(tmp_path / "saved")
    _check_same(back, res)
    model = type(res.model)
    assert back.objective is None  # the exact denoiser is not a registered network: named only
    assert back.model == {"class": f"{model.__module__}:{model.__qualname__}", "saved": False}
    with pytest.raises(FileExistsError, match="already holds metrics.jsonl"):
        res.save(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        od.optimize.load_result(tmp_path / "nothing")


def test_a_saved_network_comes_back_as_a_network(tmp_path):
    res = _optimize()
    torch.manual_seed(0)
    res.model = od.models.TimeMLP(64, hidden=16, depth=2, emb_dim=8)
    res.save(tmp_path / "r")
    back = od.optimize.load_result(tmp_path / "r")
    assert isinstance(back.model, od.models.TimeMLP) and _same_modules(back.model, res.model)


def test_command_run_directories_load(tmp_path):
    from typer.testing import CliRunner

    from optidiff.cli import app

    def run(command: str, config: str, run_dir: str) -> None:
        cfg = tmp_path / f"{run_dir}.toml"
        cfg.write_text(config)
        out = CliRunner().invoke(app, [command, str(cfg), "--run-dir", str(tmp_path / run_dir),
                                       "--no-progress"])
        assert out.exit_code == 0, out.output

    run("optimize", 'name = "t"\n[model]\nkind = "exact"\n[sampler]\nsteps = 6\nbatch_size = 8\n'
        '[optimize]\nrounds = 2\nincrement = 0.2\n', "o")
    back = od.optimize.load_result(tmp_path / "o")
    assert [r["round"] for r in back.history] == [0, 1, 2] and back.model == {"kind": "exact"}
    assert back.samples.shape == (8, 64)
    run("train", '[task]\nname = "toy2d"\nn = 256\n[train]\nsteps = 5\nbatch_size = 16\n'
        '[sampler]\nsteps = 2\nbatch_size = 8\n', "t")
    tr = od.TrainResult.load(tmp_path / "t")
    assert tr.step == 5 and len(tr.losses) == 5 and isinstance(tr.ema, od.models.TimeMLP)
    with pytest.raises(CheckpointError):
        od.TrainResult.load(tmp_path / "o")  # an optimization run is not a training run


def test_curves_figure_clips_an_overlay_that_runs_off_the_curves():
    """The implied plateau δr/(1 − r) explodes as r → 1: it must not set the reward axis."""
    from optidiff.report import curves_figure
    hist = [{"round": k, "reward_mean": float(k), "plateau": 1e3 if k == 2 else float(k)}
            for k in range(5)]
    fig = curves_figure({"run": hist}, [("reward_mean", "mean reward", "plateau", "plateau")],
                        {"max": 10.0})
    lo, hi = fig.axes[0].get_ylim()
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(11.0)
