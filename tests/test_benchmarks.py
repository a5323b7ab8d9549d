"""Smoke runs of benchmark scripts (their --quick mode writes nothing), so they do not rot."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import samplers  # noqa: E402


def test_samplers_quick_runs_and_reports_every_sampler(capsys):
    result = samplers.main(["--quick"])
    names = {row["sampler"] for row in result["rows"]}
    assert {"ddim", "ddpm", "ge", "dpmpp_2m", "heun"} <= names
    assert "not written" in capsys.readouterr().out
