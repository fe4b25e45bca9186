"""A job on a private hub model, on a box whose worker reaches a hub (tests/fakehub.py, a real
HTTP server on loopback, slowed to a few MB/s) with its token: the API shows the download's
bytes and time left in the job's progress; a cancel stops it mid-way; the next job fetches it,
calibrates on a private hub dataset and succeeds with the same checkpoint as a job on the same
model from the models directory."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, fake_hub, hub_env, wikitext_repo
from tests.integration.checkpoints import assert_same_checkpoint, tiny_llama
from tests.service.conftest import NO_VERIFY, TERMINAL, Box, start_box, wait_status
from tests.service.helpers import download_all, wait_for

pytestmark = pytest.mark.service

REPO = "acme/tiny-llama"
TEXT = "acme/private-text"  # a private dataset: wikitext-2, as the hub's Salesforce/wikitext
SPEC = {"bits": 4, "group_size": 32, "verify": NO_VERIFY,
        "calibration": {"dataset": "builtin", "num_samples": 8, "seq_length": 64}}
PRIVATE_TEXT = {"dataset": TEXT, "config": "wikitext-2-raw-v1", "num_samples": 8,
                "seq_length": 64}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny blocks and a 40000-row embedding and head: 20 MB in two files."""
    return tiny_llama(tmp_path_factory.mktemp("hubmodel") / "model", layers=2, vocab=40000,
                      max_shard_size="12MB")


@pytest.fixture(scope="module")
def hub(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    text = wikitext_repo(tmp_path_factory.mktemp("hubtext") / "text")
    with fake_hub({REPO: model}, rate=2_000_000, private={REPO, TEXT},
                  datasets={TEXT: text}) as served:
        yield served


@pytest.fixture(scope="module")
def hub_box(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub, model: Path) -> Iterator[Box]:
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(model, models / "tiny-llama")
    root = tmp_path_factory.mktemp("hubbox")
    # a private model: the worker's token (GPTQD_HF_TOKEN) goes with every request it makes
    box = start_box(root, models, {**hub_env(hub.url, root / "hub"),
                                   "GPTQD_HF_TOKEN": hub.token}, workers=1)
    yield box
    box.close()


def test_a_hub_job_shows_its_download_and_a_cancel_stops_it(
        hub_box: Box, hub: FakeHub, model: Path, tmp_path: Path) -> None:
    http = hub_box.http
    total = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    job = http.post("/jobs", json={"model_id": REPO, **SPEC}).json()

    def downloading() -> dict | None:
        progress = http.get(f"/jobs/{job['id']}").json()["progress"]
        message = progress["message"] or ""
        # wait for a report on the way (one with a rate and the time left)
        return progress if message.startswith("downloading") and "left" in message else None

    seen = wait_for("the download in the job's progress", downloading, timeout=120)
    assert seen["stage"] == "loading" and 0 < seen["fraction"] < 0.1, seen
    assert re.fullmatch(r"downloading acme/tiny-llama: [\d.]+ MB of 20\.\d MB in 2 files "
                        r"at [\d.]+ (KB|MB)/s, about \d+:\d\d left", seen["message"]), seen
    assert http.post(f"/jobs/{job['id']}/cancel").status_code == 202
    ended = wait_status(http, job["id"], TERMINAL, timeout=60)
    assert ended["status"] == "cancelled", ended
    assert hub.sent < 0.9 * total, (hub.sent, total)  # stopped, not fetched to the end
    # and left no partial file in the hub cache (huggingface_hub removes its own)
    cache = hub_box.data_dir / "hub"
    assert cache.is_dir() and list(cache.rglob("*.incomplete")) == []

    # the next job on the model fetches it and succeeds, calibrated on a private hub dataset
    # (which datasets fetches with the worker's token from the environment)
    hub.rate = None
    again = http.post("/jobs", json={"model_id": REPO, **SPEC,
                                     "calibration": PRIVATE_TEXT}).json()
    done = wait_status(http, again["id"], TERMINAL, timeout=240)
    assert done["status"] == "succeeded", done
    assert "wikitext-2-raw-v1/train-00000-of-00001.parquet" in hub.downloads()
    download_all(http, again["id"], tmp_path / "from-hub")

    local = http.post("/jobs", json={"model_id": "tiny-llama", **SPEC,
                                     "calibration": PRIVATE_TEXT}).json()
    assert wait_status(http, local["id"], TERMINAL, timeout=240)["status"] == "succeeded"
    download_all(http, local["id"], tmp_path / "local")
    assert_same_checkpoint(tmp_path / "local", tmp_path / "from-hub")
