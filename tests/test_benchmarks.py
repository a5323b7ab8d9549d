"""Smoke runs of benchmark scripts (their --quick mode writes nothing), so they do not rot."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import devices, gp, guidance_subspace, lowdim, samplers, samplers_digits


def test_samplers_quick_runs_and_reports_every_sampler(capsys):
    result = samplers.main(["--quick"])
    names = {row["sampler"] for row in result["rows"]}
    assert {"ddim", "ddpm", "ge", "dpmpp_2m", "heun"} <= names
    assert "not written" in capsys.readouterr().out


def test_samplers_digits_quick_matches_the_diffusers_reference(monkeypatch, tmp_path, capsys):
    """Part (b) end to end on a 200-step 8×8 model trained into an empty cache: every quick cell
    has a finite FD and diffusers' DPM-Solver++ reproduces optidiff's ``dpmpp_2m``."""
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path))
    result = samplers_digits.main(["--quick", "--threads", "1"])
    res = result["datasets"]["digits8"]
    assert {r["sampler"] for r in res["rows"]} == {"ddim", "ge γ=2", "dpmpp_2m",
                                                    "diffusers dpmpp_2m"}
    assert all(0 < r["fd"] < float("inf") for r in res["rows"])
    assert res["agreement"] and all(a["max abs difference"] < 1e-3 for a in res["agreement"])
    assert "not written" in capsys.readouterr().out


def test_offline_suites_quick_run_every_method(capsys):
    """The TF-suite and Ehrlich parts end to end on tiny settings (SIX6 only, Ehrlich L = 32):
    every method and baseline gets a row, enumeration only where the space is small."""
    pytest.importorskip("holo")
    from benchmarks import offline

    from optidiff.optimize.suite import METHODS

    result = offline.main(["--quick", "--part", "tfsuite,ehrlich"])
    tf = {r["method"] for r in result["tfsuite"]["table"]}
    eh = {r["method"] for r in result["ehrlich"]["table"]}
    assert tf == set(METHODS) and eh == set(METHODS) - {"enumeration"}
    assert "tfsuite_item4_holds" in result["claims"]
    assert "not written" in capsys.readouterr().out


def test_devices_quick_measures_every_device_and_precision():
    result = devices.run(quick=True)
    cells = {(r["network"], r["device"], r["precision"]) for r in result["rows"]}
    assert cells == {(n, d, p) for n in ("TimeMLP", "UNet") for d in devices.devices()
                     for p in devices.precisions(d)}
    assert all(r["train steps/s"] > 0 and r["sample NFE/s"] > 0 for r in result["rows"])


def test_lowdim_quick_runs_both_networks_against_their_floor(capsys):
    result = lowdim.main(["--quick"])
    assert {r["network"] for r in result["dims"]} == {"SubspaceNet", "TimeMLP"}
    assert [r["D"] for r in result["dims"]][::2] == list(lowdim.QUICK["dims"])
    assert all(r["W2²"] > 0 and r["floor W2²"] > 0 for r in result["rows"])
    assert {r["n"] for r in result["ns"]} == set(lowdim.QUICK["ns"])
    assert 0 < result["claim"]["exact floor"] < 1 and "Reading:" in result["markdown"]
    assert "not written" in capsys.readouterr().out


def test_gp_quick_reports_every_model_claim_and_floor(capsys):
    result = gp.main(["--quick"])
    assert {r["model"] for r in result["rows"]} == set(gp.MODELS)
    assert all(r["w2_floor_sampler"] > 0 and r["score_err"] > 0 for r in result["rows"])
    ids = {c["id"] for c in result["claims"]}
    assert set(gp.ASSERTED) <= ids and {"goal_w2_ou", "goal_w2_se"} <= ids
    assert {(r["kernel"], r["n"]) for r in result["rows"]} == {
        (k, n) for k in gp.KERNELS for n in result["sizes"]}
    assert [r["model"] for r in result["guidance"]] == ["exact", *gp.MODELS]
    assert "not written" in capsys.readouterr().out


def test_guidance_subspace_quick_runs_every_section_and_claim(monkeypatch, tmp_path, capsys):
    """Every run of the plan (small networks trained into an empty cache, one seed, few rounds)
    and every table and claim of the full benchmark; its figures are written."""
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path / "cache"))
    result = guidance_subspace.run(quick=True, workers=1, plots_dir=tmp_path / "plots")
    assert {r["network"] for r in result["alg1"]} == {"TimeMLP", "SubspaceNet"}
    assert len(result["alg1"]) == 10 and len(result["alg2"]) == 5
    assert {(r["guidance"], r["δ"]) for r in result["sphere"]} == {
        (g, d) for g in ("G", "G_loss") for d in guidance_subspace.SPHERE_DELTAS}
    assert len(result["claims"]) == 7 and all(isinstance(c["holds"], bool) for c in result["claims"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "alg1_subspace_net.png", "alg1_timemlp.png", "alg2.png", "sphere_pareto.png"]


def test_gp_cell_gives_the_same_numbers_in_a_spawned_worker():
    """Results do not depend on which process (or how many workers) runs a cell."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    args = ("se", 64, 4, 3, 40, False)
    here = gp.cell(*args)["rows"]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = pool.submit(gp.cell, *args).result()["rows"]
    drop = {"train_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in here] == [
        {k: v for k, v in r.items() if k not in drop} for r in there]
