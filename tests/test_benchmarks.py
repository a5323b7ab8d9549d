"""Smoke runs of benchmark scripts (their --quick mode writes nothing), so they do not rot."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import devices, gp, samplers, samplers_digits


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


from benchmarks import devices, gp, samplers, samplers_digits
    assert "not written" in capsys.readouterr().out
