"""Devices and precisions: one spelling for the library and the command line.

:func:`resolve_device` turns ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into a
``torch.device`` (``"auto"``: CUDA if available, else Apple's MPS, else the CPU), refusing a device
this machine does not have with a ValueError naming it. :data:`PRECISIONS` and :func:`autocast`
are the mixed-precision option of training and sampling: ``"fp32"``, or the forward passes under
``torch.autocast`` to bfloat16 (``"bf16"``) or float16 (``"fp16"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast", "check_precision", "resolve_device", "torch_threads"]

#: training/sampling precisions
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The ``torch.device`` of ``spec`` (None and ``"auto"``: the best available)."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {spec!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                         f"precision={precision!r}")
    return precision


def autocast(device: torch.device | str, precision: str):
    """``torch.autocast`` of ``precision`` on ``device`` (a no-op context for fp32)."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``threads`` torch intra-op threads inside the block (None: unchanged), the previous count
    restored afterwards."""
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)
