"""Which text a job's perplexity is measured on, and whether results may call it held out."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.encoders import jsonable_encoder

from app.schemas import JobIn
from app.settings import Settings
from app.store import Dataset, Store
from worker.jobspec import eval_source, held_out

UPLOAD = "ds_" + "c" * 32


@pytest.fixture
def box(tmp_path: Path) -> tuple[Store, Settings]:
    settings = Settings(data_dir=tmp_path, database_url="")
    settings.ensure_dirs()
    store = Store(settings.store_url)
    store.create_all()
    store.add_dataset(Dataset(id=UPLOAD, owner="a", filename="c.txt", format="txt", size=1,
                              sha256="0" * 64, created_at=datetime.now(UTC)))
    return store, settings


def spec(calibration: dict) -> dict:
    return jsonable_encoder(JobIn(model_id="m", calibration=calibration))


@pytest.mark.parametrize(("calibration", "expected", "apart"), [
    ({"dataset": "builtin"}, "builtin-heldout", True),
    ({}, "wikitext:wikitext-2-raw-v1:test", True),
    ({"dataset_id": UPLOAD}, f"{UPLOAD}.txt", False),  # an upload has no held-out part
])
def test_the_default_eval_text_and_whether_it_is_held_out(box, calibration, expected, apart) -> None:
    store, settings = box
    job = spec(calibration)
    source, text_field = eval_source(job, None, store, settings)
    assert Path(source).name == expected and text_field == "text"
    assert held_out(source, job, store, settings) is apart


def test_an_explicit_eval_dataset_wins(box) -> None:
    store, settings = box
    job = spec({"dataset": "builtin"})
    source, _ = eval_source(job, UPLOAD, store, settings)
    assert Path(source).name == f"{UPLOAD}.txt" and held_out(source, job, store, settings)
