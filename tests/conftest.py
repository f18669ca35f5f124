"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's torch ops on one thread, restoring the thread count after it.

    Small tensors (tiny U-Nets, scalar chains) run 10-100x slower on two OpenMP threads of a busy 2-core machine
    than on one, because the threads wait on each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
