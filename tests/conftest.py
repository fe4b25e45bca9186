"""Shared test helpers: where the real fixtures live, and skipping/failing when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("GPTQD_FIXTURES", ROOT.parent / "shared" / "fixtures")).resolve()


def fixture_path(*parts: str) -> Path:
    """Path into ../shared/fixtures; fails in CI (CI=true) and skips elsewhere when missing."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        reason = f"fixture {path} is missing (set GPTQD_FIXTURES to the shared fixtures dir)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return fixture_path()
