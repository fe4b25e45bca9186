"""A GPU worker end to end, on the CPU: every process of the box runs on the simulated card of
tests/simcuda.py (tests/simcard on PYTHONPATH) and the worker is told GPTQD_DEVICE=cuda, as
docker-compose.yml's workers are. Its device probe passes, the job runs in a clean process on
"cuda" with every tensor on the card, its metrics carry the card's peak, and a verification reads the checkpoint back on
the card to the perplexity the job reported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import TINY, Box, start_box, tiny_spec
from tests.service.helpers import run_full_job, verify_stored

pytestmark = pytest.mark.service

SIMCARD = Path(__file__).parents[1] / "simcard"


@pytest.fixture(scope="module")
def card_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    path = os.pathsep.join(p for p in (str(SIMCARD), os.environ.get("PYTHONPATH")) if p)
    box = start_box(tmp_path_factory.mktemp("card"), models_dir,
                    {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "GPTQD_DEVICE": "cuda",
                     "GPTQD_COLUMN_KERNEL": "torch"}, workers=1)
    yield box
    box.close()


def test_a_gpu_worker_runs_a_job_and_a_verification_on_its_card(card_box: Box, tmp_path: Path) -> None:
    job = run_full_job(card_box.url, tiny_spec(name="on-card"), tmp_path / "ckpt", TINY.layers)
    metrics = job["metrics"]
    assert metrics["device"] == "cuda" and metrics["column_kernel"] == "torch", metrics
    assert metrics["peak_memory"]["cuda_bytes"] > 0, metrics["peak_memory"]
    result = verify_stored(card_box.http, job)  # on the card, with its perplexity
    assert len(result["samples"]) == 1  # greedy samples from the model held on the card
