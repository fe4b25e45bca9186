"""Secrets never leave the server's environment: with API keys and an HF_TOKEN configured and
jobs run (one succeeds, one fails), neither appears in any API answer, in the job store's
files, in a checkpoint or in the logs. Also: which routes are open without a key, and
trust_remote_code needs the server's permission and a pinned revision."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import NO_VERIFY, TERMINAL, Box, start_box, tiny_spec, wait_status

pytestmark = pytest.mark.service

KEYS = {"alice": "sk-alice-7f3a9c", "ops": "sk-ops-51e0d2"}
HF_TOKEN = "hf_secretTOKENshouldNEVERleak42"
SECRETS = [*KEYS.values(), HF_TOKEN]
SMALL = {"dataset": "builtin", "num_samples": 2, "seq_length": 16}


@pytest.fixture(scope="module")
def secret_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Box]:
    keys = ",".join(f"{n}:{s}" for n, s in KEYS.items())
    box = start_box(tmp_path_factory.mktemp("secrets"), models_dir,
                    {"GPTQD_API_KEYS": keys, "GPTQD_ADMIN_KEYS": "ops", "HF_TOKEN": HF_TOKEN,
                     "GPTQD_ALLOW_TRUST_REMOTE_CODE": "true", "HF_HUB_OFFLINE": "1"},
                    workers=1)
    yield box
    box.close()


def client(box: Box, who: str) -> httpx.Client:
    return httpx.Client(base_url=box.url, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS[who]}"})


def test_only_health_and_the_api_description_are_open(secret_box: Box) -> None:
    anon = secret_box.http
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"):
        assert anon.get(path).status_code == 200, path
    # the docs pages work without internet: every script and style is served by the box
    for page in ("/docs", "/redoc"):
        html = anon.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
        assert assets, html
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            r = anon.get(asset)
            assert r.status_code == 200 and len(r.content) > 10_000, asset
    # the description says so: Swagger's "Authorize" sends the key on every guarded call
    api = anon.get("/openapi.json").json()
    assert api["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": api["components"]["securitySchemes"]
        ["HTTPBearer"]["description"]}
    guarded = (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/job_x"),
               ("GET", "/jobs/job_x/events"), ("GET", "/jobs/job_x/artifacts"),
               ("GET", "/datasets"), ("POST", "/datasets"), ("GET", "/metrics"))
    for method, path in guarded:
        route = path.replace("job_x", "{job_id}")
        if route in api["paths"]:  # /metrics is not in the description
            assert api["paths"][route][method.lower()]["security"] == [{"HTTPBearer": []}], path
    for path in ("/healthz", "/readyz"):
        assert "security" not in api["paths"][path]["get"], path
    for method, path in guarded:
        r = anon.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": f"Bearer {KEYS['alice']}x"}
    assert anon.get("/jobs", headers=wrong).status_code == 401
    assert anon.get("/jobs", headers={"Authorization": KEYS["alice"]}).status_code == 401


def test_trust_remote_code_needs_the_server_and_a_pinned_revision(secret_box: Box) -> None:
    alice = client(secret_box, "alice")
    r = alice.post("/jobs", json=tiny_spec(trust_remote_code=True, verify=NO_VERIFY))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "revision"]
    r = alice.post("/jobs", json=tiny_spec(trust_remote_code=True, revision="0123abc",
                                           verify=NO_VERIFY, calibration=SMALL))
    assert r.status_code == 202, r.text
    wait_status(alice, r.json()["id"], TERMINAL)


def test_keys_and_the_hub_token_are_never_stored_returned_or_logged(secret_box: Box) -> None:
    alice, ops = client(secret_box, "alice"), client(secret_box, "ops")
    answers: list[str] = []
    ok = alice.post("/jobs", json=tiny_spec(calibration=SMALL, verify=NO_VERIFY))
    bad = alice.post("/jobs", json=tiny_spec(model_id="gated-org/gated-model",
                                             verify=NO_VERIFY))  # needs the hub: fails
    answers += [ok.text, bad.text]
    for r in (ok, bad):
        job = wait_status(alice, r.json()["id"], TERMINAL)
        answers.append(str(job))
        for path in ("", "/events", "/artifacts", "/verifications"):
            answers.append(ops.get(f"/jobs/{job['id']}{path}").text)
    assert wait_status(alice, ok.json()["id"], TERMINAL)["status"] == "succeeded"
    failed = wait_status(alice, bad.json()["id"], TERMINAL)
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_not_found"
    answers.append(alice.get(f"/jobs/{ok.json()['id']}/archive").text)
    for path in ("/jobs", "/datasets", "/metrics", "/openapi.json", "/readyz"):
        answers.append(ops.get(path).text)
    for text in answers:
        for secret in SECRETS:
            assert secret not in text

    # every file the box wrote: SQLite store and its WAL, broker, checkpoints, logs
    files = [p for p in secret_box.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "gptqd.sqlite" for p in files)
    assert any(p.suffix == ".log" for p in files)
    assert any(p.name == "model.safetensors" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, (secret[:6], path)
