"""API keys against a real server: each key sees only its own jobs, datasets and events."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import NO_VERIFY, Box, start_box, tiny_spec
from tests.service.helpers import raw_status

pytestmark = pytest.mark.service

KEYS = {"alice": "sk-alice-1", "bob": "sk-bob-2", "ops": "sk-ops-3"}


@pytest.fixture(scope="module")
def keyed_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    keys = ",".join(f"{name}:{secret}" for name, secret in KEYS.items())
    # no worker: jobs stay queued, which is all these checks need
    box = start_box(tmp_path_factory.mktemp("keyed"), models_dir,
                    {"GPTQD_API_KEYS": keys, "GPTQD_ADMIN_KEYS": "ops"}, workers=0)
    yield box
    box.close()


def as_(box: Box, who: str) -> httpx.Client:
    return httpx.Client(base_url=box.url, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS[who]}"})


def test_keys_isolate_jobs_and_datasets(keyed_box: Box) -> None:
    anon = keyed_box.http
    assert anon.get("/healthz").status_code == 200
    r = anon.get("/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert anon.get("/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401

    alice, bob, ops = (as_(keyed_box, w) for w in ("alice", "bob", "ops"))
    job = alice.post("/jobs", json=tiny_spec(verify=NO_VERIFY)).json()
    assert KEYS["alice"] not in str(job)
    for path in ("", "/events", "/artifacts", "/archive", "/verifications"):
        assert bob.get(f"/jobs/{job['id']}{path}").status_code == 404, path
    assert bob.post(f"/jobs/{job['id']}/cancel").status_code == 404
    assert job["id"] not in [j["id"] for j in bob.get("/jobs").json()["items"]]
    assert job["id"] in [j["id"] for j in alice.get("/jobs").json()["items"]]
    assert job["id"] in [j["id"] for j in ops.get("/jobs").json()["items"]]
    assert ops.get(f"/jobs/{job['id']}").status_code == 200

    ds = alice.post("/datasets", files={"file": ("a.txt", b"some text " * 100)}).json()
    assert ds["id"] not in [d["id"] for d in bob.get("/datasets").json()["items"]]
    r = bob.post("/jobs", json=tiny_spec(calibration={"dataset_id": ds["id"]}))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "calibration", "dataset_id"]
    assert alice.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_metrics_need_an_admin_key(keyed_box: Box) -> None:
    # the numbers are totals over every owner: an ordinary key must not read them
    alice, ops = as_(keyed_box, "alice"), as_(keyed_box, "ops")
    r = alice.get("/metrics")
    assert r.status_code == 403, r.text
    assert "admin" in r.json()["detail"] and "gptqd_jobs" not in r.text
    assert keyed_box.http.get("/metrics").status_code == 401
    r = ops.get("/metrics")
    assert r.status_code == 200 and "gptqd_jobs" in r.text


def status_with_authorization(box: Box, value: bytes) -> int:
    return raw_status(box.url, "GET", "/jobs", [b"Authorization: " + value])


@pytest.mark.parametrize("space", [b"\xa0", b"\x85", b"\xc2\xa0", b"\xc2\x85", b"\x0b", b"\x0c"])
def test_a_secret_is_compared_exactly(keyed_box: Box, space: bytes) -> None:
    """Unicode (and other non-blank) whitespace around a secret makes it another secret;
    str.strip() used to remove it."""
    secret = KEYS["alice"].encode()
    for value in (b"Bearer " + secret + space, b"Bearer " + space + secret):
        assert status_with_authorization(keyed_box, value) in (400, 401), value


def test_ascii_blanks_around_a_secret_are_allowed(keyed_box: Box) -> None:
    secret = KEYS["alice"].encode()
    for value in (b"Bearer  " + secret, b"Bearer " + secret + b" \t", b"bearer " + secret,
                  b"\tBearer " + secret):
        assert status_with_authorization(keyed_box, value) == 200, value
