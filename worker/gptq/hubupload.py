"""Uploading a checkpoint to a Hugging Face hub repository in one commit.

The token is checked first (whoami: a read-only token, or one whose account may not write to
the repository's namespace, is refused before any byte is sent). The repository is created if
missing (private unless asked otherwise; an existing one keeps its visibility), and a branch
other than main likewise. The files then go up one at a time (huggingface_hub's preupload:
Xet or LFS, as the client and the hub agree), so progress can say which file is on its way and
how many bytes of the whole are up; one commit then names them all, so the repository never
shows half a checkpoint. The hub keeps what it already holds: publishing the same checkpoint
again sends no weights, and makes no commit when no file changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.gptq.download import OnTransfer, Transfer
from worker.gptq.errors import (
    EngineError,
    HubAccessDenied,
    HubAuthFailed,
    HubUnreachable,
    InvalidCheckpoint,
    UploadFailed,
)
from worker.gptq.progress import ProgressCallback, ProgressEvent

# where the token comes from, for the messages that ask for one
SET_TOKEN = ("set HF_TOKEN (GPTQD_HF_TOKEN for a gptqd server and its workers) to a token with "
             "write access to the repository's namespace")


@dataclass(frozen=True)
class Destination:
    repo_id: str  # namespace/name
    private: bool = True  # for a repository created now
    branch: str | None = None  # None: main
    commit_message: str | None = None


@dataclass
class Upload:
    """What to send: the checkpoint's files, some replaced or added (a model card, a report
    without server paths) by their path in the repository."""

    checkpoint: Path
    replaced: dict[str, bytes] = field(default_factory=dict)

    def entries(self) -> list[tuple[str, Path | bytes]]:
        files = {p.relative_to(self.checkpoint).as_posix(): p
                 for p in sorted(self.checkpoint.rglob("*")) if p.is_file()}
        return list({**files, **self.replaced}.items())


def upload(what: Upload, to: Destination, *, token: str | None,
           on_transfer: OnTransfer | None = None) -> dict[str, Any]:
    """Sends the files and commits them; on_transfer hears the bytes up before each file and
    once at the end. Returns the repository's url, the commit, the files and their bytes."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    # huggingface_hub's own bars would fill a job's log (and a terminal) with one per file
    shown = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        return _upload(HfApi(token=token), what, to, on_transfer)
    except Exception as exc:
        mapped = _error(exc, to)
        if mapped is None:
            raise
        raise mapped from exc
    finally:
        if shown:
            enable_progress_bars()


def _upload(api: Any, what: Upload, to: Destination,
            on_transfer: OnTransfer | None) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd

    who = _writer(api, to.repo_id)
    repo_url = api.create_repo(to.repo_id, private=to.private, exist_ok=True)
    if to.branch:
        api.create_branch(to.repo_id, branch=to.branch, exist_ok=True)
    # the largest first: the pace (and so the time left) is known once the first is up, not
    # guessed from a few small files (which go with the commit in any case)
    entries = sorted(what.entries(), key=lambda e: -_size(e[1]))
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(
        data, bytes) else str(data)) for name, data in entries]
    sizes = [_size(data) for _, data in entries]
    started, done = time.monotonic(), 0
    for op, size in zip(ops, sizes, strict=True):
        if on_transfer is not None:
            on_transfer(Transfer(done, sum(sizes), len(ops), time.monotonic() - started))
        api.preupload_lfs_files(to.repo_id, [op], revision=to.branch, free_memory=False)
        done += size
    if on_transfer is not None:
        on_transfer(Transfer(done, sum(sizes), len(ops), time.monotonic() - started))
    commit = api.create_commit(
        to.repo_id, ops, revision=to.branch,
        commit_message=to.commit_message or f"Upload GPTQ checkpoint ({len(ops)} files)")
    return {"repo_id": to.repo_id, "url": str(repo_url), "branch": to.branch or "main",
            "commit": commit.oid, "commit_url": commit.commit_url, "account": who,
            "files": sorted(name for name, _ in entries), "bytes": sum(sizes),
            "seconds": round(time.monotonic() - started, 3)}


def _size(data: Path | bytes) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


def _writer(api: Any, repo_id: str) -> str:
    """The token's account name, once it is known that it may write to repo_id's namespace."""
    from huggingface_hub import errors as hub

    try:
        who = api.whoami()
    except hub.LocalTokenNotFoundError as exc:
        raise HubAuthFailed(f"there is no hub token: {SET_TOKEN}") from exc
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessDenied(f"the hub token (of {who.get('name')}) is read-only: {SET_TOKEN}")
    namespace = repo_id.split("/", 1)[0]
    mine = [who.get("name"), *(org.get("name") for org in who.get("orgs") or [])]
    if namespace not in mine:
        raise HubAccessDenied(
            f"the hub token belongs to {who.get('name')}, who may not create "
            f"repositories under {namespace!r}: use one of {', '.join(map(repr, mine))}, or a "
            f"token of a member of {namespace!r}")
    return str(who.get("name"))


def _error(exc: BaseException, to: Destination) -> EngineError | None:
    """The error saying what to do for what huggingface_hub raised (looking down the cause
    chain: a failed file upload comes wrapped); None when it is not the hub's answer."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    from worker.gptq.modelio import chain

    where = f"{to.repo_id}" + (f" (branch {to.branch})" if to.branch else "")
    for cause in chain(exc):
        if isinstance(cause, httpx.TransportError):
            return HubUnreachable(f"the hub ({constants.ENDPOINT}) could not be reached "
                                  f"({type(cause).__name__}: {cause}); publish again once it "
                                  "answers")
        if not isinstance(cause, hub.HfHubHTTPError):
            continue
        status = cause.response.status_code if cause.response is not None else None
        server = cause.server_message or str(cause).splitlines()[0]
        if status == 401:
            return HubAuthFailed(f"the hub refused the token for {where} (HTTP 401: {server}): "
                                 f"{SET_TOKEN}")
        if status == 403:
            return HubAccessDenied(f"the hub token may not write to {where} ({server}): give "
                                   "it write access to the repository's namespace")
        return UploadFailed(f"the hub refused the upload to {where} (HTTP {status}: {server})")
    return None


# a publication's fraction: checking the token and the repository, then the bytes, then the
# commit
UPLOAD_SHARE = (0.02, 0.98)


def publish_checkpoint(checkpoint: Path, to: Destination, *, token: str | None,
                       base_model: str | None, model_card: bool = True,
                       progress: ProgressCallback | None = None) -> dict[str, Any]:
    """A checkpoint directory written by the engine, uploaded with a model card from its
    report (unless model_card is False) and that report without the paths of the machine
    that made it; progress hears preparing, uploading (bytes, rate, time left) and
    committing. base_model: the hub id it was quantized from (None: a local model)."""
    from worker.gptq.export import REPORT_NAME
    from worker.gptq.modelcard import model_card as card_of
    from worker.gptq.modelcard import public_report

    started = time.monotonic()

    def emit(stage: str, fraction: float, message: str, eta: float | None = None) -> None:
        if progress is not None:
            progress(ProgressEvent(stage=stage, fraction=fraction, message=message,
                                   seconds=time.monotonic() - started, eta_seconds=eta))

    emit("preparing", 0.0, f"checking the token and {to.repo_id}")
    path = checkpoint / REPORT_NAME
    if not path.is_file():
        raise InvalidCheckpoint(f"{checkpoint} has no {REPORT_NAME}: not a checkpoint gptqd wrote")
    stored = json.loads(path.read_text())
    report = public_report(stored)
    replaced: dict[str, bytes] = {}
    if report != stored:  # a local model's or a local text's path
        replaced[REPORT_NAME] = (json.dumps(report, indent=2) + "\n").encode()
    if model_card:
        replaced["README.md"] = card_of(report, to.repo_id, base_model).encode()

    def on_transfer(t: Transfer) -> None:
        low, high = UPLOAD_SHARE
        share = t.done / t.total if t.total else 1.0
        if t.done < t.total:
            emit("uploading", low + (high - low) * share, t.describe(to.repo_id, "uploading"),
                 t.eta_seconds)
        else:
            emit("committing", high, f"committing {t.files} files to {to.repo_id}", 0.0)

    result = upload(Upload(checkpoint, replaced), to, token=token, on_transfer=on_transfer)
    return {**result, "model_card": model_card}
