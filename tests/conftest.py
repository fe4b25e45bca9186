"""Shared test helpers: where the real fixtures live, and skipping/failing when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton decides when triton.language is first imported whether its jit functions (tl.sum
# among them) run in its CPU interpreter; something a test imports (torchao, via GPTQModel)
# imports it before tests/unit/test_columns_triton.py could ask, so ask here, first. No test
# has a GPU: every Triton kernel a test reaches runs interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("GPTQD_FIXTURES", ROOT.parent / "shared" / "fixtures")).resolve()


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, `kill`) ends the run like Ctrl-C: fixtures are torn down, so the
    servers, workers and job processes the service tests started stop with it."""
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


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


@pytest.fixture(autouse=True)
def _fresh_hub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test probes the hub afresh, and the offline mode an unreachable hub turns on
    (worker/gptq/hubstatus.py) ends with the test: no test depends on the ones before it."""
    import huggingface_hub.constants

    from worker.gptq import hubstatus

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        huggingface_hub.constants.HF_HUB_OFFLINE)
    if "HF_HUB_OFFLINE" in os.environ:
        monkeypatch.setenv("HF_HUB_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hubstatus.unreachable.cache_clear()
