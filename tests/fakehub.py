"""A model hub on loopback: a real HTTP server answering the routes huggingface_hub,
transformers and datasets call to fetch a model or a dataset (repository info, file trees,
paths-info, HEAD and GET of a file with Range), with the hub's refusals (missing, private,
gated) and its redirects of renamed repositories, serving local directories as repositories.

It takes uploads as the hub does for huggingface_hub's create_repo/create_branch/create_commit
(without Xet, which a test turns off with HF_HUB_DISABLE_XET): who a token belongs to
(whoami-v2), repository creation in the namespaces a token may write to, preupload modes,
the LFS batch API with "basic" transfers (PUT, then verify; an object the hub holds already is
not asked for), and ndjson commits that change the repository's files and head.

Tests point a process at it with HF_ENDPOINT; `rate` (bytes a second, shared by all downloads
as a network link is) slows the file bodies so that progress and cancellation can be seen on
the way. Every request is logged (`requests`), so a test can tell what was fetched and what
came from the cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "feedfacecafebeef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")  # served as LFS files, as the hub does for weights
CHUNK = 64 * 1024
LFS_THRESHOLD = 10 * 1024 * 1024  # larger files go through LFS whatever their name, as on the hub


@dataclass(frozen=True)
class Account:
    """Who a token belongs to, and whether it may write (the hub's "write"; "read" may not)."""

    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"

    def may_write(self, repo_id: str) -> bool:
        return self.role == "write" and repo_id.split("/", 1)[0] in (self.name, *self.orgs)
HUBCHUNKS = Path(__file__).parent / "hubchunks"  # a sitecustomize: reports every MiB


@dataclass
class FakeHub:
    url: str
    repos: dict[str, Path]  # model repositories
    datasets: dict[str, Path] = field(default_factory=dict)  # dataset repositories
    # old names the hub redirects (307) to a repository's id, as it does for renamed ones
    # ("wikitext" -> "Salesforce/wikitext")
    aliases: dict[str, str] = field(default_factory=dict)
    rate: float | None = None  # bytes a second over all file bodies; None: unlimited
    private: set[str] = field(default_factory=set)  # repositories that need a token
    gated: set[str] = field(default_factory=set)  # repositories whose terms need accepting
    token: str = "hf_fake_token"
    # tokens the hub knows besides `token` (which belongs to gptqd-bot, a member of "team")
    accounts: dict[str, Account] = field(default_factory=dict)
    root: Path | None = None  # where repositories created through the API live
    objects: dict[str, bytes] = field(default_factory=dict)  # LFS objects uploaded, by sha256
    commits: list[dict] = field(default_factory=list)  # repo, revision, summary, paths, oid
    heads: dict[str, str] = field(default_factory=dict)  # head commit per repo@revision
    requests: list[tuple[str, str]] = field(default_factory=list)
    sent: int = 0  # bytes of file bodies written to clients
    received: int = 0  # bytes of LFS objects uploaded
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _free_at: float = 0.0  # when the link has carried every byte sent so far

    def pace(self, n: int) -> None:
        """Counts n bytes sent and, with a rate, waits until a link of that speed, shared by
        every download, would have carried them."""
        with self._lock:
            self.sent += n
            if not self.rate:
                return
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + n / self.rate
            wait = self._free_at - now
        time.sleep(wait)

    def account(self, authorization: str | None) -> Account | None:
        known = {self.token: Account("gptqd-bot", ("team",)), **self.accounts}
        scheme, _, token = (authorization or "").partition(" ")
        return known.get(token) if scheme == "Bearer" else None

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.heads.get(f"{repo_id}@{revision}", COMMIT)

    def tree(self, repo_id: str, revision: str = "main") -> Path:
        """A repository's files at a branch (main: the directory it was served from)."""
        if revision == "main":
            return self.repos[repo_id]
        assert self.root is not None
        return self.root / "branches" / repo_id / revision

    def uploads(self) -> list[str]:
        """The LFS objects uploaded (PUT), by sha256."""
        return [path.rsplit("/", 1)[1] for method, path in self.requests
                if method == "PUT" and path.startswith("/lfs/")]

    def downloads(self, suffix: str = "") -> list[str]:
        """The paths of the file bodies served (GET /resolve/), ending with suffix."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path and path.endswith(suffix)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file()}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    sums: dict[Path, str] = {}

    def etag(path: Path) -> str:
        if path not in sums:
            sums[path] = _sha256(path)
        return sums[path]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # the test reads hub.requests instead
            pass

        def _send_json(self, body: object, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _refuse(self, status: int, message: str, code: str | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Message", message)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _repo(self, repos: dict[str, Path], repo_id: str) -> Path | None:
            """The repository's directory, or None after refusing as the hub does: a missing
            repository and a private one without its token alike (401 RepoNotFound, which
            tells nobody a private one exists); a gated one without its token 401 GatedRepo."""
            authorized = hub.account(self.headers.get("Authorization")) is not None
            if repo_id not in repos or (repo_id in hub.private and not authorized):
                self._refuse(401, "Repository not found", "RepoNotFound")
                return None
            if repo_id in hub.gated and not authorized:
                self._refuse(401, "Access to this model is restricted", "GatedRepo")
                return None
            return repos[repo_id]

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def do_PUT(self) -> None:
            self._route()

        def _body(self) -> bytes:
            """The request's body, sent with a length or in chunks (a streamed file)."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _writer(self, repo_id: str) -> bool:
            """Whether the request's token may write to repo_id; refuses as the hub does when
            not (401 without a token it knows, 403 with one that may not write there)."""
            account = hub.account(self.headers.get("Authorization"))
            if account is None:
                self._refuse(401, "Invalid credentials in Authorization header")
                return False
            if not account.may_write(repo_id):
                self._refuse(403, f"You don't have the rights to write to {repo_id}")
                return False
            return True

        def _route(self) -> None:
            url = urlparse(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            hub.requests.append((self.command, path))
            if self._upload_route(path):
                return
            for kind, repos, api, files in (("models", hub.repos, "/api/models/", "/"),
                                            ("datasets", hub.datasets, "/api/datasets/",
                                             "/datasets/")):
                for old, new in hub.aliases.items():
                    for prefix in (api, files):
                        if path.startswith(f"{prefix}{old}/") or path == f"{prefix}{old}":
                            self._redirect(prefix + new + path[len(prefix) + len(old):]
                                           + (f"?{url.query}" if url.query else ""))
                            return
                for repo_id in sorted(repos, key=len, reverse=True):
                    if path == f"{api}{repo_id}" or path.startswith(f"{api}{repo_id}/"):
                        rest = path[len(api) + len(repo_id):]
                        directory = self._repo(repos, repo_id)
                        if directory is not None:
                            self._api(kind, repo_id, directory, rest, query)
                        return
                    if path.startswith(f"{files}{repo_id}/resolve/"):
                        directory = self._repo(repos, repo_id)
                        if directory is not None:
                            name = path[len(files) + len(repo_id) + len("/resolve/"):]
                            self._file(repo_id, directory, name.split("/", 1)[1])
                        return
            self._refuse(401, "Repository not found", "RepoNotFound")

        def _upload_route(self, path: str) -> bool:
            """The routes of an upload that are not under a repository's API path."""
            if path == "/api/whoami-v2":
                account = hub.account(self.headers.get("Authorization"))
                if account is None:
                    self._refuse(401, "Invalid credentials in Authorization header")
                else:
                    self._send_json({
                        "type": "user", "name": account.name,
                        "orgs": [{"name": org, "type": "org"} for org in account.orgs],
                        "auth": {"type": "access_token",
                                 "accessToken": {"displayName": "test", "role": account.role}}})
            elif path == "/api/repos/create" and self.command == "POST":
                self._create_repo(json.loads(self._body()))
            elif path == "/api/validate-yaml" and self.command == "POST":
                self._body()
                self._send_json({"errors": [], "warnings": []})
            elif (found := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path)) and (
                    self.command == "POST"):
                self._lfs_batch(found.group(1), json.loads(self._body()))
            elif (found := re.fullmatch(r"/lfs/([0-9a-f]{64})(/verify)?", path)):
                self._lfs_object(found.group(1), verify=bool(found.group(2)))
            else:
                return False
            return True

        def _create_repo(self, body: dict) -> None:
            account = hub.account(self.headers.get("Authorization"))
            repo_id = f"{body.get('organization') or (account.name if account else '')}/{body['name']}"
            if not self._writer(repo_id):
                return
            if repo_id in hub.repos:
                self._send_json({"error": "You already created this model repo",
                                 "url": f"{hub.url}/{repo_id}"}, 409)
                return
            assert hub.root is not None
            hub.repos[repo_id] = hub.root / "repos" / repo_id
            hub.repos[repo_id].mkdir(parents=True)
            if body.get("visibility") == "private" or body.get("private"):
                hub.private.add(repo_id)
            self._send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _lfs_batch(self, repo_id: str, body: dict) -> None:
            if repo_id not in hub.repos:
                self._refuse(404, "Repository not found", "RepoNotFound")
                return
            if not self._writer(repo_id):
                return
            objects = []
            for obj in body["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.objects:  # the hub asks only for what it lacks
                    href = f"{hub.url}/lfs/{obj['oid']}"
                    entry["actions"] = {"upload": {"href": href},
                                        "verify": {"href": f"{href}/verify"}}
                objects.append(entry)
            self._send_json({"transfer": "basic", "objects": objects})

        def _lfs_object(self, oid: str, verify: bool) -> None:
            if verify:
                self._body()
                if oid in hub.objects:
                    self._send_json({"success": True})
                else:
                    self._refuse(404, f"object {oid} was not uploaded")
                return
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = self._body()
                hub.pace(len(data))
            else:
                parts, length = [], int(self.headers.get("Content-Length", 0))
                while length > 0:  # read (and pace) as a link of the hub's rate would carry it
                    block = self.rfile.read(min(CHUNK, length))
                    if not block:
                        break
                    parts.append(block)
                    length -= len(block)
                    hub.pace(len(block))
                data = b"".join(parts)
            if hashlib.sha256(data).hexdigest() != oid:
                self._refuse(400, "the uploaded content does not match its sha256")
                return
            hub.objects[oid] = data
            hub.received += len(data)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _write(self, repo_id: str, op: str, revision: str) -> None:
            """/api/models/{repo}/preupload|commit|branch/{revision}, with a token that may
            write to the repository."""
            if not self._writer(repo_id):
                return
            if op == "branch":
                self._body()
                if hub.tree(repo_id, revision).exists():
                    self._send_json({"error": f"Branch {revision} already exists"}, 409)
                    return
                shutil.copytree(hub.tree(repo_id), hub.tree(repo_id, revision))
                self._send_json({})
                return
            tree = hub.tree(repo_id, revision)
            if not tree.is_dir():
                self._refuse(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            elif op == "preupload":
                self._send_json({"files": [self._upload_mode(tree, f)
                                           for f in json.loads(self._body())["files"]]})
            else:
                self._commit(repo_id, revision, tree)

        @staticmethod
        def _upload_mode(tree: Path, file: dict) -> dict:
            lfs = file["path"].endswith(LFS_SUFFIXES) or file["size"] > LFS_THRESHOLD
            entry = {"path": file["path"], "uploadMode": "lfs" if lfs else "regular",
                     "shouldIgnore": False}
            present = tree / file["path"]
            if present.is_file():
                data = present.read_bytes()
                entry["oid"] = (hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(
                    b"blob %d\0" % len(data) + data).hexdigest())
            return entry

        def _commit(self, repo_id: str, revision: str, tree: Path) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            paths = []
            for line in lines:
                key, value = line["key"], line["value"]
                if key in ("file", "lfsFile"):
                    if key == "lfsFile" and value["oid"] not in hub.objects:
                        self._refuse(400, f"LFS object {value['oid']} of {value['path']} was "
                                     "never uploaded")
                        return
                    target = tree / value["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(hub.objects[value["oid"]] if key == "lfsFile"
                                       else base64.b64decode(value["content"]))
                    paths.append(value["path"])
                elif key == "deletedFile":
                    (tree / value["path"]).unlink(missing_ok=True)
            oid = hashlib.sha1(f"{hub.head(repo_id, revision)}{paths}{len(hub.commits)}"
                               .encode()).hexdigest()
            hub.heads[f"{repo_id}@{revision}"] = oid
            hub.commits.append({"repo": repo_id, "revision": revision, "oid": oid,
                                "summary": header["summary"], "paths": paths})
            self._send_json({"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                             "commitOid": oid, "pullRequestUrl": None})

        def _redirect(self, location: str) -> None:
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _entry(self, directory: Path, name: str) -> dict:
            p = directory / name
            if p.is_dir():
                return {"type": "directory", "oid": COMMIT, "size": 0, "path": name}
            entry = {"type": "file", "oid": etag(p)[:40], "size": p.stat().st_size, "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": etag(p), "size": p.stat().st_size, "pointerSize": 134}
            return entry

        def _api(self, kind: str, repo_id: str, directory: Path, rest: str,
                 query: dict[str, list[str]]) -> None:
            """/api/{kind}/{repo}[/revision/{rev} | /tree/{rev}[/path] | /paths-info/{rev}]"""
            parts = rest.strip("/").split("/", 2)
            op = parts[0] if parts[0] else "info"
            if op in ("preupload", "commit", "branch") and self.command == "POST" and kind == "models":
                self._write(repo_id, op, rest.strip("/").split("/", 1)[1])
            elif op in ("info", "revision"):
                files = _files(directory)
                self._send_json({"id": repo_id, "sha": hub.head(repo_id),
                                 "private": repo_id in hub.private,
                                 "siblings": [{"rfilename": n} for n in files],
                                 "lastModified": "2026-11-30T00:00:00.000Z"})
            elif op == "tree":
                base = parts[2] if len(parts) > 2 else ""
                if not (directory / base).is_dir():
                    self._refuse(404, f"{base} is not a directory")
                    return
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                found = (directory / base).rglob("*") if recursive else (directory / base).iterdir()
                self._send_json([self._entry(directory, p.relative_to(directory).as_posix())
                                 for p in sorted(found)])
            elif op == "paths-info" and self.command == "POST":
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                asked = form.get("paths", [])
                self._send_json([self._entry(directory, name) for name in asked
                                 if (directory / name).exists()])
            else:
                self._refuse(404, f"{op} is not served by the fake hub")

        def _file(self, repo_id: str, directory: Path, name: str) -> None:
            path = directory / name
            if not path.is_file():
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = path.stat().st_size
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged and self.command == "GET":
                start = min(int(ranged.group(1)), size)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hub.head(repo_id))
            self.send_header("ETag", f'"{etag(path)}"')
            if name.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", f'"{etag(path)}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            with path.open("rb") as f:
                f.seek(start)
                for block in iter(lambda: f.read(CHUNK), b""):
                    try:
                        self.wfile.write(block)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client went away (a cancelled download)
                    hub.pace(len(block))

    return Handler


def hub_env(hub_url: str, cache: Path) -> dict[str, str]:
    """A process's environment to fetch from the fake hub into caches of its own under cache
    (nothing from the machine's ~/.cache/huggingface), with reports every MiB
    (tests/hubchunks), and uploads through LFS (this hub does not speak Xet)."""
    path = os.pathsep.join(p for p in (str(HUBCHUNKS), os.environ.get("PYTHONPATH")) if p)
    return {"HF_ENDPOINT": hub_url, "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub"),
            "HF_DATASETS_CACHE": str(cache / "datasets"), "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "PYTHONPATH": path}


@contextmanager
def fake_hub(repos: dict[str, Path], rate: float | None = None,
             private: set[str] | None = None, gated: set[str] | None = None,
             datasets: dict[str, Path] | None = None,
             aliases: dict[str, str] | None = None,
             accounts: dict[str, Account] | None = None) -> Iterator[FakeHub]:
    """A hub serving repos and datasets (repo id -> directory) on a free loopback port while
    in use; repositories created through it live in a directory removed with it."""
    root = Path(tempfile.mkdtemp(prefix="fakehub-"))
    hub = FakeHub(url="", repos=dict(repos), datasets=dict(datasets or {}), rate=rate,
                  private=set(private or ()), gated=set(gated or ()),
                  aliases=dict(aliases or {}), accounts=dict(accounts or {}), root=root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


WIKITEXT_CARD = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
---
# wikitext (two splits of the fixtures' wikitext-2, laid out as the hub's Salesforce/wikitext)
"""


def wikitext_repo(root: Path) -> Path:
    """A dataset repository shaped like the hub's Salesforce/wikitext (a card naming the
    config's splits, one parquet file each, one row a line), holding the wikitext-2
    fixture's validation text as its train split and its test text as its test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import fixture_path

    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    for split, name in (("train", "valid.txt"), ("test", "test.txt")):
        lines = fixture_path("wikitext-2", name).read_text().splitlines(keepends=True)
        pq.write_table(pa.table({"text": lines}),
                       root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(WIKITEXT_CARD)
    return root
