"""Publishing a job's checkpoint to the hub (tests/fakehub.py: a real HTTP hub on loopback that
takes uploads as the hub does, slowed to a few MB/s) from a real worker, with the workers'
token: the upload shows its bytes in the API, the repository holds the checkpoint as the job
stored it (plus a model card), a second publication sends
no weights and makes no commit, `gptqd publish --wait` shows the upload and where it went, and
a token that may not write there fails the publication with a message that says so."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakehub import Account, FakeHub, fake_hub, hub_env
from tests.integration.checkpoints import tiny_llama
from tests.service.conftest import TERMINAL, Box, start_box, wait_status
from tests.service.helpers import download_all, scrape, wait_for

pytestmark = pytest.mark.service

BASE = "acme/tiny-llama"  # the model the job quantizes, from the hub
SPEC = {"model_id": BASE, "bits": 4, "group_size": 32,
        "calibration": {"dataset": "builtin", "num_samples": 8, "seq_length": 64},
        "verify": {"max_windows": 4, "prompts": [], "max_new_tokens": 0}}
READER = "hf_read_only"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    model = tiny_llama(tmp_path_factory.mktemp("pubmodel") / "model", layers=2, vocab=40000)
    with fake_hub({BASE: model}, accounts={READER: Account("reader", role="read")}) as served:
        yield served


@pytest.fixture(scope="module")
def pub_box(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Box]:
    root = tmp_path_factory.mktemp("pubbox")
    box = start_box(root, tmp_path_factory.mktemp("models"),
                    {**hub_env(hub.url, root / "hub"), "GPTQD_HF_TOKEN": hub.token}, workers=1)
    yield box
    box.close()


@pytest.fixture(scope="module")
def job(pub_box: Box) -> dict:
    created = pub_box.http.post("/jobs", json=SPEC).json()
    done = wait_status(pub_box.http, created["id"], TERMINAL, timeout=240)
    assert done["status"] == "succeeded", done
    return done


def publish(http: httpx.Client, job_id: str, body: dict) -> dict:
    r = http.post(f"/jobs/{job_id}/publications", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/jobs/{job_id}/publications/{r.json()['id']}"
    return r.json()


def ended(http: httpx.Client, job_id: str, pid: str) -> dict:
    def done() -> dict | None:
        p = http.get(f"/jobs/{job_id}/publications/{pid}").json()
        return p if p["status"] in TERMINAL else None

    return wait_for(f"publication {pid} to end", done, timeout=120)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_checkpoint_is_published_as_stored_with_a_card_and_not_sent_twice(
        pub_box: Box, hub: FakeHub, job: dict, tmp_path: Path) -> None:
    http, repo = pub_box.http, "team/tiny-llama-gptq"
    stored = tmp_path / "stored"
    download_all(http, job["id"], stored)
    weights = sum(p.stat().st_size for p in stored.glob("*.safetensors"))
    received = hub.received
    hub.rate = 1_000_000  # a slow link: the upload is seen on its way
    p = publish(http, job["id"], {"repo_id": repo, "commit_message": "4-bit g32"})

    def uploading() -> dict | None:
        got = http.get(f"/jobs/{job['id']}/publications/{p['id']}").json()
        assert got["status"] in ("queued", "running"), got
        progress = got["progress"]
        return progress if progress and progress["stage"] == "uploading" else None

    seen = wait_for("the upload in the publication's progress", uploading, timeout=60)
    assert 0 < seen["fraction"] < 1 and re.fullmatch(
        rf"uploading {repo}: [\d.]+ (B|KB|MB) of [\d.]+ MB in \d+ files.*", seen["message"]), seen
    done = ended(http, job["id"], p["id"])
    hub.rate = None
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert done["progress"]["stage"] == "done" and done["progress"]["message"] == "published"
    assert result["commit"] == hub.head(repo) and result["branch"] == "main"
    assert result["url"] == f"{hub.url}/{repo}" and result["account"] == "gptqd-bot"
    assert hub.commits[-1]["summary"] == "4-bit g32" and repo in hub.private
    assert hub.received - received == weights  # the weights went up once, through LFS

    # the repository holds the checkpoint as stored, with a card and a report without paths
    tree = hub.tree(repo)
    assert sorted(result["files"]) == sorted(p.name for p in tree.iterdir())
    assert {p.name for p in stored.iterdir()} | {"README.md"} == set(result["files"])
    for path in stored.iterdir():  # the report too: a hub model's holds no server path
        assert sha(tree / path.name) == sha(path), path.name
    card = (tree / "README.md").read_text()
    metrics = job["metrics"]
    assert card.startswith("---\nbase_model: \"acme/tiny-llama\"\n"), card
    assert f"| original | {metrics['perplexity_before']:.3f} |" in card
    assert f"| this checkpoint | {metrics['perplexity_after']:.3f} |" in card
    assert "| group_size | 32 |" in card and f'from_pretrained("{repo}"' in card

    # again: the hub holds every file already, so nothing is sent and no commit is made
    commits, uploads = len(hub.commits), hub.uploads()
    again = ended(http, job["id"], publish(http, job["id"], {"repo_id": repo})["id"])
    assert again["status"] == "succeeded", again
    assert again["result"]["commit"] == result["commit"]
    assert len(hub.commits) == commits and hub.uploads() == uploads
    listed = http.get(f"/jobs/{job['id']}/publications").json()["items"]
    assert [x["id"] for x in listed] == [again["id"], p["id"]]
    assert http.get(f"/jobs/{job['id']}/verifications").json()["items"] == []
    m = scrape(pub_box.url)
    assert m[("gptqd_follow_ups", (("kind", "publication"), ("status", "succeeded")))] == 2
    assert m[("gptqd_follow_ups", (("kind", "verification"), ("status", "succeeded")))] == 0


def test_the_cli_publishes_to_a_branch_and_shows_the_upload(
        pub_box: Box, hub: FakeHub, job: dict) -> None:
    repo = "gptqd-bot/tiny-public"
    # the hub would hold the weights from another test's upload and ask for none: forget them,
    # so that they go up again, slowly enough for the polls to see the upload
    hub.objects.clear()
    received = hub.received
    hub.rate = 1_000_000
    try:
        run = subprocess.run(
            [sys.executable, "-m", "app.cli", "publish", job["id"], repo, "--public",
             "--branch", "gptq-4bit", "--no-model-card", "--wait", "--url", pub_box.url],
            capture_output=True, text=True, timeout=180)
    finally:
        hub.rate = None
    assert run.returncode == 0, run.stderr
    head = hub.head(repo, "gptq-4bit")
    assert run.stdout.splitlines()[0].endswith(": succeeded")
    assert re.search(rf"{hub.url}/{repo} \(gptq-4bit\): commit {head}, \d+ files, [\d.]+ MB",
                     run.stdout), run.stdout
    # off a terminal, the polled progress is a line a poll
    assert re.search(rf"^uploading +\d+%  uploading {repo}: ", run.stderr, re.M), run.stderr
    assert repo not in hub.private and hub.commits[-1]["revision"] == "gptq-4bit"
    assert hub.received > received
    assert "README.md" not in hub.commits[-1]["paths"]
    listed = subprocess.run([sys.executable, "-m", "app.cli", "publications", job["id"],
                             "--url", pub_box.url], capture_output=True, text=True, timeout=60)
    assert re.search(rf"pub_\w+ +succeeded +.* {repo}$", listed.stdout, re.M), listed.stdout


def test_a_token_that_may_not_write_there_fails_the_publication_saying_so(
        pub_box: Box, hub: FakeHub, job: dict) -> None:
    http, commits = pub_box.http, len(hub.commits)
    p = ended(http, job["id"], publish(http, job["id"], {"repo_id": "acme/stolen"})["id"])
    assert p["status"] == "failed" and p["error"]["code"] == "hub_access_denied", p
    assert "token belongs to gptqd-bot, who may not create repositories under 'acme'" in p["error"]["message"]
    assert "acme/stolen" not in hub.repos and len(hub.commits) == commits


def test_the_dashboard_publishes_a_job_and_lists_where_it_went(
        pub_box: Box, hub: FakeHub, job: dict, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{pub_box.url}/#/jobs/{job['id']}")
    form = page.locator("#publish-form")
    form.wait_for()
    form.locator("[name=repo_id]").fill("team/from-the-browser")
    form.locator("[name=private]").uncheck()
    form.locator("button[type=submit]").click()
    done = page.locator("#publications tr.publication[data-status=succeeded]",
                        has_text="team/from-the-browser")
    done.wait_for(timeout=120_000)
    link = done.locator("a")
    assert link.get_attribute("href") == f"{hub.url}/team/from-the-browser"
    assert re.search(r"\d+ files · commit [0-9a-f]{10}", done.inner_text()), done.inner_text()
    assert "team/from-the-browser" in hub.repos and "team/from-the-browser" not in hub.private
    # a repository the token may not write to: the row says why
    form.locator("[name=repo_id]").fill("acme/nope")
    form.locator("button[type=submit]").click()
    failed = page.locator("#publications tr.publication[data-status=failed]", has_text="acme/nope")
    failed.wait_for(timeout=60_000)
    assert "hub_access_denied" in failed.inner_text()
    assert errors == [], errors
