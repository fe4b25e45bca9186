"""Malformed requests against a real server: each gets a 4xx naming the field and the reason,
never a 5xx or a traceback, on SQLite and on PostgreSQL (which refuses a NUL in text, and times
whose UTC conversion leaves years 1..9999, that SQLite stores). The server has two API keys and
no worker (nothing here runs). A job that "succeeded" is written into the store directly, with
a symlink out of its directory planted among its files, to try the artifact path tricks on."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import NO_VERIFY, STORES, Box, start_box, store_env, tiny_spec
from tests.service.helpers import raw_status

pytestmark = pytest.mark.service

KEYS = {"alice": "sk-alice-bad-input", "bob": "sk-bob-bad-input"}
UPLOAD_LIMIT = 100_000


@pytest.fixture(scope="module", params=STORES)
def box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Box]:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("not yours")
    models = tmp_path_factory.mktemp("bad-models")
    (models / "escape").symlink_to(outside)  # a model "directory" that points out of the root
    (models / "short").mkdir()  # a local model whose context is 256 tokens (its config is enough)
    (models / "short" / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    keys = ",".join(f"{n}:{s}" for n, s in KEYS.items())
    with store_env(request.param) as store:
        b = start_box(tmp_path_factory.mktemp("bad-input"), models,
                      {"GPTQD_API_KEYS": keys, "GPTQD_ADMIN_KEYS": "",
                       "GPTQD_MAX_QUEUED_PER_KEY": "3", "GPTQD_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
                       "GPTQD_PUBLISH_NAMESPACES": "team, labs",
                       **store}, workers=0)
        b.env["OUTSIDE"] = str(outside)
        yield b
        b.close()


@pytest.fixture(scope="module")
def alice(box: Box) -> httpx.Client:
    return httpx.Client(base_url=box.url, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS['alice']}"})


@pytest.fixture(scope="module")
def done_job(box: Box) -> str:
    """A succeeded job of alice's, made in the store: one real file and one symlink out."""
    from app.settings import Settings
    from app.store import Store

    settings = Settings(data_dir=box.data_dir, database_url=box.env["GPTQD_DATABASE_URL"])
    store = Store(settings.store_url)
    job, _ = store.create_job(owner="alice", model_id="tiny", spec={}, spec_hash="x",
                              name=None, idempotency_key=None)
    store.claim_job(job.id, "test")
    root = settings.artifacts_dir / job.id
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    os.symlink(Path(box.env["OUTSIDE"]) / "secret.txt", root / "link.txt")
    listed = [{"name": n, "size": 2, "sha256": "0" * 64} for n in ("config.json", "link.txt")]
    assert store.finish_job(job.id, 1, "succeeded", artifacts=listed)
    store.dispose()
    return job.id


def spec(**changes: object) -> dict:
    base = tiny_spec(verify=NO_VERIFY)
    base.update(changes)
    return base


def calib(**changes: object) -> dict:
    return spec(calibration={"dataset": "builtin", **changes})


# (case, method, path, request kwargs, expected status, text the error must contain)
BODY = [
    ("missing model_id", {k: v for k, v in spec().items() if k != "model_id"}, "model_id"),
    ("model_id int", spec(model_id=5), "model_id"),
    ("model_id null", spec(model_id=None), "model_id"),
    ("model_id empty", spec(model_id=""), "model_id"),
    ("model_id dotdot", spec(model_id="../etc"), "model_id"),
    ("model_id dotdot deeper", spec(model_id="org/../../etc"), "model_id"),
    ("model_id encoded dotdot", spec(model_id="%2e%2e/etc"), "model_id"),
    ("model_id backslash dotdot", spec(model_id="..\\etc"), "model_id"),
    ("model_id encoded backslash", spec(model_id="..%5cetc"), "model_id"),
    ("model_id absolute", spec(model_id="/etc/passwd"), "model_id"),
    ("model_id home", spec(model_id="~root/x"), "model_id"),
    ("model_id nul", spec(model_id="tiny\x00"), "model_id"),
    ("model_id too long", spec(model_id="a" * 300), "model_id"),
    ("model_id three parts", spec(model_id="a/b/c"), "model_id"),
    ("model_id symlink out of root", spec(model_id="escape"), "model_id"),
    ("bits 5", spec(bits=5), "bits"),
    ("bits string", spec(bits="four"), "bits"),
    ("bits float", spec(bits=4.5), "bits"),
    ("group_size 100", spec(group_size=100), "group_size"),
    ("group_size 0", spec(group_size=0), "group_size"),
    ("damp 0", spec(damp_percent=0), "damp_percent"),
    ("damp 1", spec(damp_percent=1), "damp_percent"),
    ("damp negative", spec(damp_percent=-0.1), "damp_percent"),
    ("damp string", spec(damp_percent="lots"), "damp_percent"),
    ("desc_act not bool", spec(desc_act="maybe"), "desc_act"),
    ("dynamic bad regex", spec(dynamic={"+:(": {"bits": 8}}), "dynamic"),
    ("dynamic skip with settings", spec(dynamic={"-:.*o_proj": {"bits": 8}}), "dynamic"),
    ("dynamic sym", spec(dynamic={".*o_proj": {"sym": False}}), "dynamic"),
    ("dynamic bits 5", spec(dynamic={".*o_proj": {"bits": 5}}), '".*o_proj", "bits"'),
    ("dynamic with original names", spec(dynamic={".*": {"bits": 8}}, tensor_names="original"), "dynamic"),
    ("num_samples 0", calib(num_samples=0), "num_samples"),
    ("num_samples huge", calib(num_samples=10**6), "num_samples"),
    ("num_samples float", calib(num_samples=2.5), "num_samples"),
    ("seq_length 1", calib(seq_length=1), "seq_length"),
    ("seq_length huge", calib(seq_length=10**7), "seq_length"),
    # a local model's context (256 tokens) is known at submit: refused now, not once the job runs
    ("seq_length over the model's context",
     {**calib(seq_length=512), "model_id": "short"}, '"calibration", "seq_length"'),
    ("verify seq_length over the model's context",
     spec(model_id="short", verify={"seq_length": 257}), '"verify", "seq_length"'),
    ("seed negative", calib(seed=-1), "seed"),
    ("calibration not object", spec(calibration="wikitext"), "calibration"),
    ("calibration unknown field", calib(shuffle=True), "shuffle"),
    ("dataset dotdot", spec(calibration={"dataset": "../x"}), "dataset"),
    ("dataset absolute", spec(calibration={"dataset": "/etc/x"}), "dataset"),
    ("split path", spec(calibration={"dataset": "builtin", "split": "a/b"}), "split"),
    ("text_field dot", spec(calibration={"dataset": "builtin", "text_field": ".x"}), "text_field"),
    ("dataset_id malformed", spec(calibration={"dataset_id": "../../x"}), "dataset_id"),
    ("dataset_id wrong prefix", spec(calibration={"dataset_id": "xx_" + "0" * 32}), "dataset_id"),
    ("dataset_id unknown", spec(calibration={"dataset_id": "ds_" + "0" * 32}), "dataset_id"),
    ("dataset and dataset_id", spec(calibration={"dataset": "wikitext",
                                                 "dataset_id": "ds_" + "0" * 32}), "dataset_id"),
    ("verify dataset_id bad", spec(verify={"dataset_id": "nope"}), "dataset_id"),
    ("verify prompts not list", spec(verify={"prompts": "hi"}), "prompts"),
    ("verify too many prompts", spec(verify={"prompts": ["x"] * 100}), "prompts"),
    ("verify empty prompt", spec(verify={"prompts": [""]}), "prompts"),
    ("verify max_new_tokens huge", spec(verify={"max_new_tokens": 10**6}), "max_new_tokens"),
    ("unknown top-level field", spec(quantize_everything=True), "quantize_everything"),
    ("revision dotdot", spec(revision="../main"), "revision"),
    ("trust_remote_code refused", spec(trust_remote_code=True, revision="abc123"),
     "trust_remote_code"),
    ("name too long", spec(name="n" * 500), "name"),
    # a NUL fails PostgreSQL; no other C0 control character has a place in a request either
    ("name nul", spec(name="a\x00b"), "name"),
    ("name escape sequence", spec(name="a\x1b[31mb"), "name"),
    ("name backspace", spec(name="ab\x08"), "name"),
    ("revision nul", spec(revision="main\x00"), "revision"),
    ("config nul", spec(calibration={"dataset": "builtin", "config": "a\x00"}), "config"),
    ("verify prompt nul", spec(verify={"prompts": ["Once\x00upon"]}), "prompts"),
    ("verify prompt bell", spec(verify={"prompts": ["ok", "ring\x07"]}), "prompts"),
    ("unknown field named with a nul", spec(**{"a\x00b": 1}), "a\\u0000b"),
    ("body is a list", [spec()], "body"),
    # JSON types as they are: no coercion from strings (a typo'd client must hear of it)
    ("bits as a string", spec(bits="4"), "bits"),
    ("group_size as a string", spec(group_size="128"), "group_size"),
    ("damp as a numeric string", spec(damp_percent="0.01"), "damp_percent"),
    ("sym as a string", spec(sym="true"), "sym"),
    ("desc_act as a number", spec(desc_act=1), "desc_act"),
    ("num_samples as a string", calib(num_samples="8"), "num_samples"),
    ("verify perplexity as a string", spec(verify={"perplexity": "false"}), "perplexity"),
]


# (case, publication body, the field its 422 names)
PUBLICATION = [
    ("missing repo_id", {}, "repo_id"),
    ("repo_id without a namespace", {"repo_id": "tiny-gptq"}, "repo_id"),
    ("repo_id of three parts", {"repo_id": "a/b/c"}, "repo_id"),
    ("repo_id dotdot", {"repo_id": "team/a..b"}, "repo_id"),
    ("repo_id double dash", {"repo_id": "team/a--b"}, "repo_id"),
    ("repo_id ending .git", {"repo_id": "team/x.git"}, "repo_id"),
    ("repo_id name too long", {"repo_id": "team/" + "a" * 97}, "repo_id"),
    ("repo_id with a space", {"repo_id": "team/my model"}, "repo_id"),
    ("private as a string", {"repo_id": "team/x", "private": "yes"}, "private"),
    ("branch dotdot", {"repo_id": "team/x", "branch": "a..b"}, "branch"),
    ("branch with a space", {"repo_id": "team/x", "branch": "a b"}, "branch"),
    ("empty commit message", {"repo_id": "team/x", "commit_message": ""}, "commit_message"),
    ("a token in the body (the workers' own is used)", {"repo_id": "team/x", "token": "hf_x"},
     "token"),
]


@pytest.mark.parametrize("case,body,field", PUBLICATION, ids=[c[0] for c in PUBLICATION])
def test_a_bad_publication_body_is_a_422_naming_the_field(
        alice: httpx.Client, done_job: str, case: str, body: dict, field: str) -> None:
    r = alice.post(f"/jobs/{done_job}/publications", json=body)
    assert r.status_code == 422, (case, r.status_code, r.text)
    assert field in json.dumps(r.json()["detail"]), (case, r.text)


def test_a_publication_needs_a_hub_token_on_the_server(alice: httpx.Client, done_job: str) -> None:
    """This server publishes only to its namespaces (a 422 naming repo_id otherwise) and has no
    token: refused before anything is queued, saying what to set; a verification's id is not a
    publication's."""
    r = alice.post(f"/jobs/{done_job}/publications", json={"repo_id": "acme/tiny-gptq"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "repo_id"]
    assert "publishes only to team, labs (GPTQD_PUBLISH_NAMESPACES), not to 'acme'" in r.text
    r = alice.post(f"/jobs/{done_job}/publications", json={"repo_id": "team/tiny-gptq"})
    assert r.status_code == 409 and "GPTQD_HF_TOKEN" in r.json()["detail"], r.text
    assert alice.get(f"/jobs/{done_job}/publications").json()["items"] == []
    v = alice.post(f"/jobs/{done_job}/verifications", json={}).json()
    assert alice.get(f"/jobs/{done_job}/publications/{v['id']}").status_code == 404
    assert alice.get(f"/jobs/{done_job}/publications/pub_{'0' * 32}").status_code == 404


@pytest.mark.parametrize("case,body,field", BODY, ids=[c[0] for c in BODY])
def test_a_bad_job_body_is_a_422_naming_the_field(alice: httpx.Client, case: str, body: object,
                                                  field: str) -> None:
    r = alice.post("/jobs", json=body)
    assert r.status_code == 422, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert field in json.dumps(detail), (case, detail)
    assert all(d.get("msg") for d in detail)
    assert "Traceback" not in r.text


A_JOB_ID = "job_" + "0" * 32


def cursor(*parts: object) -> str:
    """A validly encoded cursor holding whatever a forger put in it."""
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def raw_upload(filename: bytes) -> dict:
    """Request kwargs of a multipart upload whose file name goes as these bytes (httpx would
    percent-encode control characters in it)."""
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + filename
            + b'"\r\nContent-Type: text/plain\r\n\r\nsome text\r\n--b--\r\n')
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=b"}}


RAW = [
    # (case, method, path, kwargs, status, text in the answer)
    ("bad JSON", "POST", "/jobs", {"content": b'{"model_id": "tiny",',
                                   "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("not JSON at all", "POST", "/jobs", {"content": b"\xff\xfe",
                                          "headers": {"content-type": "application/json"}},
     422, "body"),
    ("huge body", "POST", "/jobs", {"json": spec(name="x" * (2 * 1024 * 1024))}, 413,
     "request body: larger than the limit of 1048576 bytes"),
    ("huge body, streamed without a length", "POST", "/jobs",
     {"content": [b'{"model_id": "', *[b"x" * 65536] * 20, b'"}'],
      "headers": {"content-type": "application/json"}}, 413, "limit of 1048576 bytes"),
    ("upload just past the limit", "POST", "/datasets",
     {"files": {"file": ("a.txt", b"x" * (UPLOAD_LIMIT + 1))}}, 413,
     f"file: larger than the limit of {UPLOAD_LIMIT} bytes"),
    ("upload far past the limit", "POST", "/datasets",
     {"files": {"file": ("a.txt", b"x" * (4 * UPLOAD_LIMIT))}}, 413,
     f"file: larger than the limit of {UPLOAD_LIMIT} bytes"),
    ("bad cursor", "GET", "/jobs?cursor=!!!not-a-cursor", {}, 422, "cursor"),
    ("forged cursor", "GET", "/jobs?cursor=WyJ4Il0", {}, 422, "cursor"),
    ("cursor with a naive time", "GET", "/jobs?cursor=" + cursor("2999-01-01T00:00:00", "zzz"),
     {}, 422, "cursor"),
    ("cursor with a naive time and a job id", "GET",
     "/jobs?cursor=" + cursor("2999-01-01T00:00:00", A_JOB_ID), {}, 422, "cursor"),
    ("cursor in year 0 once in UTC", "GET",
     "/jobs?cursor=" + cursor("0001-01-01T00:00:00+14:00", A_JOB_ID), {}, 422, "cursor"),
    ("cursor in year 10000 once in UTC", "GET",
     "/jobs?cursor=" + cursor("9999-12-31T23:59:59-14:00", A_JOB_ID), {}, 422, "cursor"),
    ("cursor id with a nul", "GET",
     "/jobs?cursor=" + cursor("2999-01-01T00:00:00+00:00", "job_\x00"), {}, 422, "cursor"),
    ("cursor id not an id", "GET",
     "/jobs?cursor=" + cursor("2999-01-01T00:00:00+00:00", "x' OR 1=1"), {}, 422, "cursor"),
    ("cursor id not a string", "GET",
     "/jobs?cursor=" + cursor("2999-01-01T00:00:00+00:00", 5), {}, 422, "cursor"),
    ("cursor time not a string", "GET", "/jobs?cursor=" + cursor(5, A_JOB_ID), {}, 422,
     "cursor"),
    ("cursor of three parts", "GET",
     "/jobs?cursor=" + cursor("2999-01-01T00:00:00+00:00", A_JOB_ID, 1), {}, 422, "cursor"),
    ("cursor with a raw nul", "GET", "/jobs?cursor=%00", {}, 422, "cursor"),
    ("limit 0", "GET", "/jobs?limit=0", {}, 422, "limit"),
    ("limit huge", "GET", "/jobs?limit=100000", {}, 422, "limit"),
    ("limit text", "GET", "/jobs?limit=ten", {}, 422, "limit"),
    ("status unknown", "GET", "/jobs?status=exploded", {}, 422, "status"),
    ("job id traversal", "GET", "/jobs/..%2f..%2fetc%2fpasswd", {}, 404, ""),
    ("job id huge", "GET", "/jobs/" + "j" * 5000, {}, 404, ""),
    ("events of unknown job", "GET", "/jobs/job_nope/events", {}, 404, ""),
    # ids not of the store's shape are not found, without a query (a NUL fails PostgreSQL)
    ("job id with a nul", "GET", "/jobs/job_%00x", {}, 404, ""),
    ("events of a job id with a nul", "GET", "/jobs/job_%00x/events", {}, 404, ""),
    ("cancel a job id with a nul", "POST", "/jobs/job_%00x/cancel", {}, 404, ""),
    ("delete a job id with a nul", "DELETE", "/jobs/job_%00x", {}, 404, ""),
    ("verifications of a job id with a nul", "GET", "/jobs/job_%00x/verifications", {}, 404, ""),
    ("publications of a job id with a nul", "GET", "/jobs/job_%00x/publications", {}, 404, ""),
    ("job id with upper-case hex", "GET", "/jobs/job_" + "A" * 32, {}, 404, ""),
    ("job id of the right shape, unknown", "GET", f"/jobs/{A_JOB_ID}", {}, 404, ""),
    ("idempotency key too long", "POST", "/jobs",
     {"json": spec(), "headers": {"Idempotency-Key": "k" * 500}}, 422, "idempotency-key"),
    ("upload without file", "POST", "/datasets", {"data": {"x": "y"}}, 422, "file"),
    ("upload bad extension", "POST", "/datasets", {"files": {"file": ("x.exe", b"MZ")}},
     422, "file"),
    ("upload traversal name", "POST", "/datasets",
     {"files": {"file": ("../../x.sh", b"echo")}}, 422, "file"),
    ("upload name with a nul", "POST", "/datasets", raw_upload(b"a\x00.txt"), 422, "file"),
    ("upload name with a control character", "POST", "/datasets", raw_upload(b"a\x1bb.txt"),
     422, "file"),
    ("upload empty", "POST", "/datasets", {"files": {"file": ("a.txt", b"")}}, 422, "empty"),
    ("upload not utf-8", "POST", "/datasets", {"files": {"file": ("a.txt", b"\xff\xfe\x00")}},
     422, "UTF-8"),
    ("upload bad jsonl", "POST", "/datasets", {"files": {"file": ("a.jsonl", b"{nope\n")}},
     422, "line 1"),
    ("upload bad parquet", "POST", "/datasets", {"files": {"file": ("a.parquet", b"PAR")}},
     422, "parquet"),
]


@pytest.mark.parametrize("case,method,path,kwargs,status,text", RAW, ids=[c[0] for c in RAW])
def test_a_malformed_request_is_a_clear_4xx(alice: httpx.Client, case: str, method: str,
                                            path: str, kwargs: dict, status: int,
                                            text: str) -> None:
    r = alice.request(method, path, **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text[:500])
    assert text.lower() in r.text.lower(), (case, r.text[:500])
    assert r.json()["detail"], (case, r.headers["content-type"])  # the API's one shape, JSON
    assert "Traceback" not in r.text


@pytest.mark.parametrize("char", [b"\x01", b"\x1b", b"\x7f"])
def test_a_control_character_in_the_idempotency_key_is_refused(box: Box, char: bytes) -> None:
    """The key is stored with the job; the HTTP parser or the shared text check refuses it."""
    body = json.dumps(spec(name="idem")).encode()
    headers = [f"Authorization: Bearer {KEYS['bob']}".encode(),
               b"Content-Type: application/json", b"Idempotency-Key: k" + char + b"k"]
    assert raw_status(box.url, "POST", "/jobs", headers, body) in (400, 422)


def test_a_bad_last_event_id_is_a_422(alice: httpx.Client, done_job: str) -> None:
    # past 2**63 SQLite cannot bind it: that failed inside the stream, after its 200;
    # b"\xb9\xb2" are latin-1 superscript digits, which str.isdigit() takes and int() does not
    for value in ("abc", "-1", "1e9", "9" * 30, "9" * 20, str(2**63), str(2**31), b"\xb9\xb2"):
        r = alice.get(f"/jobs/{done_job}/events", headers={"Last-Event-ID": value})
        assert r.status_code == 422, (value, r.text)
        assert "last-event-id" in r.text.lower()
    r = alice.get(f"/jobs/{done_job}/events", headers={"Last-Event-ID": str(2**31 - 1)})
    assert r.status_code == 200 and "data:" not in r.text  # after the end: nothing, and it ends


def test_a_verification_refuses_control_characters_but_keeps_newlines(
        alice: httpx.Client, done_job: str) -> None:
    r = alice.post(f"/jobs/{done_job}/verifications", json={"prompts": ["a\x00b"]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "prompts"]
    text = "Line one\n\tline two\r\n"  # tab and newlines belong in a prompt
    r = alice.post(f"/jobs/{done_job}/verifications", json={"prompts": [text]})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["prompts"] == [text]
    assert alice.get(f"/jobs/{done_job}/verifications/{r.json()['id']}").status_code == 200
    for vid in ("ver_%00x", "ver_" + "0" * 32, "x" * 5000):
        assert alice.get(f"/jobs/{done_job}/verifications/{vid}").status_code == 404, vid


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+00:00", "0001-01-01T13:00:00+13:00",
                                   "9999-12-31T23:59:59.999999+00:00",
                                   "9999-12-31T10:00:00-13:59"])
def test_a_cursor_at_the_edge_of_the_range_is_answered(alice: httpx.Client, done_job: str,
                                                       stamp: str) -> None:
    r = alice.get("/jobs", params={"cursor": cursor(stamp, "job_" + "f" * 32)})
    assert r.status_code == 200, r.text
    ids = [j["id"] for j in r.json()["items"]]
    assert (done_job in ids) == stamp.startswith("9999"), ids  # only jobs older than the cursor


def test_a_forged_cursor_keeps_the_connection(alice: httpx.Client) -> None:
    # a 500 made the server drop the keep-alive connection; a 422 must not
    r = alice.get("/jobs", params={"cursor": cursor("2999-01-01T00:00:00", "zzz")})
    assert r.status_code == 422, r.text
    assert r.headers.get("connection", "").lower() != "close"
    assert r.json()["detail"][0]["loc"] == ["query", "cursor"]


TRICKS = ["../../../etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd",
          "..%5c..%5cetc%5cpasswd", "%2fetc%2fpasswd", "config.json%00.txt", "link.txt",
          "%2e%2e", "%2e%2e%2f%2e%2e%2fsecret.txt"]  # (plain ./ and .. are resolved by httpx)


@pytest.mark.parametrize("name", TRICKS)
def test_artifact_names_cannot_leave_the_job_directory(box: Box, alice: httpx.Client,
                                                       done_job: str, name: str) -> None:
    r = alice.get(f"/jobs/{done_job}/artifacts/{name}")
    assert r.status_code == 404, (name, r.status_code, r.text)
    assert "not yours" not in r.text and "root:" not in r.text
    assert alice.get(f"/jobs/{done_job}/artifacts/config.json").text == "{}"
    # and the other key cannot see the job at all
    bob = httpx.Client(base_url=box.url, headers={"Authorization": f"Bearer {KEYS['bob']}"})
    assert bob.get(f"/jobs/{done_job}/artifacts/config.json").status_code == 404


def test_the_archive_does_not_follow_a_symlink_out(alice: httpx.Client, done_job: str) -> None:
    r = alice.get(f"/jobs/{done_job}/archive")
    assert r.status_code == 410, r.text
    assert "link.txt" in r.json()["detail"] and "not yours" not in r.text


def test_a_key_over_its_queued_job_limit_gets_429_with_retry_after(box: Box,
                                                                   alice: httpx.Client) -> None:
    bob = httpx.Client(base_url=box.url, headers={"Authorization": f"Bearer {KEYS['bob']}"})
    ids = [alice.post("/jobs", json=spec(name=f"q{i}")).json()["id"] for i in range(3)]
    r = alice.post("/jobs", json=spec(name="one too many"))
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    assert "3" in r.json()["detail"]
    assert bob.post("/jobs", json=spec()).status_code == 202  # the limit is per key
    assert set(alice.get(f"/jobs/{ids[0]}").json()["links"]) == {
        "self", "events", "verifications", "publications", "cancel"}
    r = alice.post(f"/jobs/{ids[1]}/publications", json={"repo_id": "team/x"})
    assert r.status_code == 409 and "only a succeeded job has a checkpoint" in r.text, r.text
    cancelled = alice.post(f"/jobs/{ids[0]}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert "cancel" not in cancelled["links"]  # an ended job offers no cancel (it would be a 409)
    assert alice.post("/jobs", json=spec(name="fits again")).status_code == 202


def test_a_succeeded_job_links_its_checkpoint_and_no_cancel(alice: httpx.Client, done_job: str) -> None:
    links = alice.get(f"/jobs/{done_job}").json()["links"]
    assert set(links) == {"self", "events", "verifications", "publications", "artifacts",
                          "archive"}
    assert alice.get(links["artifacts"]).status_code == 200
