"""An httpx client for the gptqd API, used by the CLI and the demo."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        try:
            detail: Any = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # FastAPI's validation errors: name each field
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}"
                for d in detail
            )
        super().__init__(f"HTTP {response.status_code}: {detail}")
        self.status_code = response.status_code


class Unreachable(Exception):
    """Nothing answers at the server's address: say how to start one or point at another."""

    def __init__(self, base_url: str) -> None:
        super().__init__(
            f"no gptqd server answers at {base_url}: start one with `gptqd up`, "
            f"or point --url (or GPTQD_URL) at a running one"
        )
        self.base_url = base_url


# a refused or timed-out connection: the server is not there (other transport errors may be
# a server that died mid-answer, which the caller may retry)
_NOT_THERE = (httpx.ConnectError, httpx.ConnectTimeout)


def parse_sse(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Server-sent events from a stream of lines: {"id", "event", "data"} per event."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            event["data"] = event["data"] + "\n" + value if "data" in event else value
        elif field in ("id", "event"):
            event[field] = value
    if "data" in event:
        yield event


def _items(body: Any) -> list[dict]:
    """A listing's rows, whether the server answers a bare list or a page {"items": [...]}."""
    return body["items"] if isinstance(body, dict) else body


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except _NOT_THERE as exc:
            raise Unreachable(self.base_url) from exc

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        r = self._request(method, url, **kwargs)
        if r.status_code >= 400:
            raise ApiError(r)
        return r.json() if r.content else None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def jobs(self, status: str | None = None, limit: int = 50, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items()
                  if v is not None}
        return self._json("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def upload_dataset(self, path: Path) -> dict:
        with Path(path).open("rb") as f:
            return self._json("POST", "/datasets", files={"file": (Path(path).name, f)})

    def events(self, job_id: str, last_event_id: int | None = None,
               give_up_after: float = 60.0) -> Iterator[dict]:
        """The job's events as dicts (with "seq"), reconnecting with Last-Event-ID when the
        connection drops, until the terminal event; Unreachable once the server has refused
        every connection for give_up_after seconds (a restart takes less)."""
        import json

        last = last_event_id
        refused_since: float | None = None
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise ApiError(r)
                    refused_since = None
                    for ev in parse_sse(r.iter_lines()):
                        data = json.loads(ev["data"])
                        last = int(ev["id"])
                        yield data
                return  # the server ends the stream after the terminal event
            except _NOT_THERE as exc:
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > give_up_after:
                    raise Unreachable(self.base_url) from exc
                time.sleep(1.0)
            except (httpx.TransportError, httpx.StreamError):
                refused_since = None
                time.sleep(1.0)

    def wait(self, job_id: str, on_event: Callable[[dict], None] | None = None) -> dict:
        """Follows the job's events until it ends; returns the final job."""
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
        return self.job(job_id)

    def artifacts(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/jobs/{job_id}/artifacts")

    def download(self, job_id: str, dest: Path) -> list[Path]:
        """Every artifact into dest, each checked against its listed sha256."""
        dest = Path(dest)
        paths = []
        for art in self.artifacts(job_id):
            path = dest / art["name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                digest = self._save(f"/jobs/{job_id}/artifacts/{art['name']}", path)
            except _NOT_THERE as exc:
                raise Unreachable(self.base_url) from exc
            if digest != art["sha256"]:
                raise ValueError(f"{art['name']}: sha256 does not match the listing")
            paths.append(path)
        return paths

    def _save(self, url: str, path: Path) -> str:
        """Streams url into path; returns the sha256 of what was written."""
        h = hashlib.sha256()
        with self.http.stream("GET", url) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r)
            with path.open("wb") as f:
                for chunk in r.iter_bytes():
                    h.update(chunk)
                    f.write(chunk)
        return h.hexdigest()

    def datasets(self) -> list[dict]:
        return _items(self._json("GET", "/datasets"))

    def verifications(self, job_id: str) -> list[dict]:
        return _items(self._json("GET", f"/jobs/{job_id}/verifications"))

    def verify(self, job_id: str, body: dict[str, Any] | None = None) -> dict:
        return self._json("POST", f"/jobs/{job_id}/verifications", json=body or {})

    def verification(self, job_id: str, verification_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}/verifications/{verification_id}")

    def publications(self, job_id: str) -> list[dict]:
        return _items(self._json("GET", f"/jobs/{job_id}/publications"))

    def publish(self, job_id: str, body: dict[str, Any]) -> dict:
        return self._json("POST", f"/jobs/{job_id}/publications", json=body)

    def publication(self, job_id: str, publication_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}/publications/{publication_id}")

    def wait_verification(self, job_id: str, verification_id: str,
                          on_poll: Callable[[dict], None] | None = None,
                          poll: float = 0.5) -> dict:
        return _wait_ended(lambda: self.verification(job_id, verification_id), on_poll, poll)

    def wait_publication(self, job_id: str, publication_id: str,
                         on_poll: Callable[[dict], None] | None = None,
                         poll: float = 0.5) -> dict:
        return _wait_ended(lambda: self.publication(job_id, publication_id), on_poll, poll)


def _wait_ended(get: Callable[[], dict], on_poll: Callable[[dict], None] | None,
                poll: float) -> dict:
    """Polls a verification or publication until it ends (the server fails it if its worker
    is lost, so there is no deadline here); on_poll sees each answer while it has not."""
    while True:
        item = get()
        if item["status"] in TERMINAL:
            return item
        if on_poll is not None:
            on_poll(item)
        time.sleep(poll)
