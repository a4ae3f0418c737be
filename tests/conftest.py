"""Session-wide test isolation: nothing a test writes lands in the checkout or the user's home."""

from __future__ import annotations

import os
import tempfile


def pytest_configure(config) -> None:  # noqa: ARG001 - pytest hook signature
    """Point DIFFAD_HOME at a fresh temporary folder for tests that do not set their own."""
    os.environ["DIFFAD_HOME"] = tempfile.mkdtemp(prefix="diffad-tests-home-")
