"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's small-tensor tests on one intra-op thread, then restore the setting.

    The numerical tests work on tensors of a few thousand entries; on a loaded machine, torch's
    multi-threaded kernels spin-wait for cores and run such loops up to 100x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
