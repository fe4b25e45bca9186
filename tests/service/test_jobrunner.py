"""The job runner's fencing, in process on a SQLite store: an attempt whose job was handed to
another attempt meanwhile (its worker looked dead) stops, publishes nothing, records nothing
and leaves the work dir for the attempt that now owns the job."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.encoders import jsonable_encoder

from app.db import utcnow
from app.schemas import JobIn
from app.settings import Settings
from app.store import Store
from tests.service.conftest import NO_VERIFY, tiny_spec
from worker.jobrunner import _attempt, run_job
from worker.progress_writer import job_writer

pytestmark = pytest.mark.service


@pytest.fixture
def setup(tmp_path: Path, models_dir: Path) -> tuple[Store, Settings]:
    settings = Settings(data_dir=tmp_path / "data", models_dir=models_dir, database_url="",
                        heartbeat_seconds=0.5, stale_seconds=2, progress_interval=0.0)
    settings.ensure_dirs()
    store = Store(settings.store_url)
    store.create_all()
    return store, settings


def new_job(store: Store, **extra: str) -> str:
    spec = jsonable_encoder(JobIn(**tiny_spec(verify=NO_VERIFY, calibration={
        "dataset": "builtin", "num_samples": 2, "seq_length": 16}))) | extra
    job, _ = store.create_job(owner="a", model_id="tiny", spec=spec, spec_hash="h", name=None,
                              idempotency_key=None)
    return job.id


def test_an_attempt_that_lost_its_job_publishes_and_records_nothing(
    setup: tuple[Store, Settings],
) -> None:
    store, settings = setup
    job_id = new_job(store)
    first = store.claim_job(job_id, "slow-worker")
    # its heartbeat looked stale: the job went to another worker (attempt 2)
    store.requeue_stale(utcnow() + timedelta(seconds=1), 3)
    assert store.claim_job(job_id, "other-worker").attempts == 2

    writer = job_writer(store, job_id, 1, 0.0)
    status, ended = _attempt(first, 1, writer, store, settings)
    assert not ended and writer.lost
    job = store.get_job(job_id)
    assert job.status == "running" and job.attempts == 2 and job.worker == "other-worker"
    assert not (settings.artifacts_dir / job_id).exists()
    assert not list(settings.artifacts_dir.glob(f"{job_id}.*"))
    statuses = [e.data["status"] for e in store.events_after(job_id, 0) if e.type == "status"]
    assert statuses == ["queued", "running", "queued", "running"], status


def test_a_redelivered_message_for_a_job_that_ran_does_nothing(
    setup: tuple[Store, Settings],
) -> None:
    store, settings = setup
    job_id = new_job(store)
    assert run_job(job_id, store, settings) == "succeeded"
    seq = store.get_job(job_id).event_seq
    assert run_job(job_id, store, settings) is None  # the claim refuses it
    job = store.get_job(job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.event_seq == seq
    assert (settings.artifacts_dir / job_id / "model.safetensors").is_file()
    assert not (settings.work_dir / job_id).exists()


def test_a_local_model_removed_after_submission_is_not_fetched_from_the_hub(
    setup: tuple[Store, Settings], tmp_path: Path, models_dir: Path,
) -> None:
    import shutil

    store, settings = setup
    settings.models_dir = tmp_path / "models"
    shutil.copytree(models_dir / "tiny", settings.models_dir / "tiny")
    job_id = new_job(store, model_source="local")
    shutil.rmtree(settings.models_dir / "tiny")
    assert run_job(job_id, store, settings) == "failed"
    job = store.get_job(job_id)
    assert job.error_code == "model_not_found"
    assert "no longer in the server's models directory" in job.error_message


@pytest.mark.parametrize("prompts", [[], ["Once upon"]])
def test_a_verification_reports_its_progress_and_keeps_where_it_ended(
    setup: tuple[Store, Settings], monkeypatch: pytest.MonkeyPatch, prompts: list[str],
) -> None:
    """Read block by block (no sample text asked) its progress goes block by block with the
    time left; held whole (sample text) batch by batch, then the sample text."""
    from worker.followup import run_follow_up

    store, settings = setup
    job_id = new_job(store)
    assert run_job(job_id, store, settings) == "succeeded"
    seen: list[dict] = []
    beat = store.heartbeat_follow_up

    def watched(verification_id: str, attempt: int, progress: dict | None = None) -> bool:
        if progress is not None:
            seen.append(progress)
        return beat(verification_id, attempt, progress)

    monkeypatch.setattr(store, "heartbeat_follow_up", watched)
    v = store.create_follow_up(job_id, {"max_windows": 4, "prompts": prompts,
                                           "max_new_tokens": 4 if prompts else 0})
    assert run_follow_up(v.id, store, settings) == "succeeded"
    assert [p["stage"] for p in seen][:1] == ["loading"]
    steps = [p for p in seen if p["stage"] == "evaluating"]
    fractions = [p["fraction"] for p in seen]
    assert fractions == sorted(fractions) and 0 < fractions[-1] <= 1
    if not prompts:  # the tiny model's two blocks, the second with nothing left
        blocks = [p for p in steps if p["block"] is not None]  # after the stage's start
        assert [(p["block"], p["num_blocks"]) for p in blocks] == [(1, 2), (2, 2)]
        assert blocks[-1]["eta_seconds"] == 0 and blocks[0]["eta_seconds"] >= 0
    else:
        assert [p["message"] for p in steps][-2:] == ["batch 1 of 1", "generating sample text"]
    final = store.get_follow_up(v.id).progress
    assert final["stage"] == "done" and final["fraction"] == 1.0 and final["message"] == "verified"
