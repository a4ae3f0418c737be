"""Session-wide test isolation: nothing a test writes lands in the checkout or the user's home."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


def pytest_configure(config) -> None:  # noqa: ARG001 - pytest hook signature
    """Point DIFFAD_HOME at a fresh temporary folder for tests that do not set their own."""
    os.environ["DIFFAD_HOME"] = tempfile.mkdtemp(prefix="diffad-tests-home-")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test (small tensors; the 2 CI cores are shared)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
