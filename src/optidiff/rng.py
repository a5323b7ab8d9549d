"""Randomness helpers: derived seeds, seeded initialisation, Haar-random bases.

optidiff draws every random number from an explicit ``torch.Generator`` (or a seed): the same
seed gives the same result on the CPU.

- :func:`derive_seed`: independent 63-bit seeds for named streams of one seed (SHA-256 of the
  parts), so adding a stream never shifts the draws of another.
- :func:`generator`: a ``torch.Generator`` from an int seed (a generator passes through).
- :func:`seeded`: initialise modules from a seed without touching the caller's global RNG.
- :func:`haar_orthogonal`: a Haar-random orthogonal matrix (Mezzadri 2007).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["MAX_SEED", "check_seed", "derive_seed", "generator", "haar_orthogonal", "seeded"]

#: seeds are non-negative and below 2⁶³ (``torch.Generator.manual_seed`` takes a 64-bit integer)
MAX_SEED = 2**63 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2⁶³)``; ValueError naming ``name`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {name}={seed!r}")
    return seed


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the SHA-256 of ``":".join(parts)``, e.g.
    ``derive_seed("optidiff", seed, rank, "noise")``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int | torch.Generator, device: torch.device | str = "cpu") -> torch.Generator:
    """``torch.Generator(device).manual_seed(seed)``; a Generator is returned as is."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device).manual_seed(check_seed(seed))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block (typically a module's construction) with the global CPU RNG seeded by
    ``seed``; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed(seed))
        yield


def haar_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random n×n orthogonal matrix, float64: Q of the QR decomposition of an n×n standard
    Gaussian matrix with the columns' signs fixed by sign(diag R) (Mezzadri 2007, "How to generate
    random matrices from the classical compact groups"; as ``scipy.stats.ortho_group``)."""
    z = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r))
