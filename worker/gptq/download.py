"""Fetching a hub repository's files with byte progress.

A job that downloads 16-140 GB before its first block must not look hung (the complaint users
of GPTQ tools file most after out-of-memory), and a cancel must not wait for the download to
end. huggingface_hub does the fetching (cache, files in parallel); it reports the bytes
written through the progress-bar class a caller gives it, and says up front, in a dry run, which
files it would fetch and their sizes: together, bytes done of a known total.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# huggingface_hub's bar for the bytes a snapshot writes to disk (resumed bytes included)
BYTES_BAR = "huggingface_hub.snapshot_download"
REPORT_EVERY_S = 0.5  # how often a download is reported (and a cancel heard)
STOP_GRACE_S = 10.0  # how long a stopped download may take to reach its next chunk


@dataclass(frozen=True)
class Transfer:
    """Where a download stands."""

    done: int  # bytes of the files to fetch that are on disk
    total: int  # bytes of the files to fetch (those the cache does not hold)
    files: int  # how many files are fetched
    seconds: float  # since the download started

    @property
    def rate(self) -> float | None:
        """Bytes a second so far; None before there is anything to measure."""
        return self.done / self.seconds if self.done and self.seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        return None if rate is None else max(0.0, self.total - self.done) / rate

    def describe(self, what: str, verb: str = "downloading") -> str:
        """e.g. 'downloading org/name: 3.2 GB of 16.1 GB in 4 files at 85.0 MB/s, about 2:43
        left' (or uploading)."""
        text = f"{verb} {what}: {size_text(self.done)} of {size_text(self.total)}"
        if self.files > 1:
            text += f" in {self.files} files"
        if self.rate is not None and self.done < self.total:
            eta = math.ceil(self.eta_seconds or 0)
            text += f" at {size_text(self.rate)}/s, about {eta // 60}:{eta % 60:02d} left"
        return text


OnTransfer = Callable[[Transfer], None]  # may raise to stop the download (a cancelled job)


class DownloadStopped(Exception):
    """Raised in a file's download thread once the fetch no longer wants its bytes."""


def fetch(repo_id: str, patterns: list[str], *, revision: str | None = None,
          token: str | None = None, on_transfer: OnTransfer | None = None) -> Path:
    """The repository's files matching patterns in the local hub cache (fetched if missing).

    With on_transfer, the download runs in a thread of its own and the caller's thread hears
    how it goes every REPORT_EVERY_S (whether bytes came or not, so a stalled link shows and a
    cancel is heard at once) and once at the end, always from the caller's thread. When
    on_transfer raises, fetch raises the same once the files' threads have stopped at their
    next chunk (plain HTTP; at most STOP_GRACE_S): a thread still running then (a native Xet
    transfer does not hear the stop) ends with the process."""
    from huggingface_hub import snapshot_download

    common: dict[str, Any] = {"revision": revision, "token": token, "allow_patterns": patterns}
    plan = _plan(repo_id, common) if on_transfer is not None else []
    if not plan:  # nobody listening, nothing to fetch, or offline
        return Path(snapshot_download(repo_id, tqdm_class=_bar_class(None), **common))
    meter = _Meter(sum(plan), len(plan))
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def download() -> None:
        try:
            outcome["path"] = snapshot_download(repo_id, tqdm_class=_bar_class(meter), **common)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=download, name=f"download {repo_id}", daemon=True).start()
    try:
        while not finished.wait(REPORT_EVERY_S):
            on_transfer(meter.transfer())
    except BaseException:
        # the files' threads stop at their next chunk and huggingface_hub removes their
        # partial files: wait for that (briefly), or the process ends first and they stay
        meter.stopped = True
        finished.wait(STOP_GRACE_S)
        raise
    if "error" in outcome:
        raise outcome["error"]
    on_transfer(meter.transfer(complete=True))
    return Path(outcome["path"])


def _plan(repo_id: str, common: dict[str, Any]) -> list[int]:
    """The sizes of the files a fetch would download; empty when the hub cannot say (offline,
    refused): the fetch itself then fails with the real reason, or serves the cache."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        return []
    try:
        planned = snapshot_download(repo_id, dry_run=True, tqdm_class=_bar_class(None),
                                    **common)
    except Exception:  # the real fetch that follows says what is wrong
        return []
    return [f.file_size or 0 for f in planned if f.will_download]


class _Meter:
    """Bytes written by every file's download thread."""

    def __init__(self, total: int, files: int) -> None:
        self.total, self.files = total, files
        self.done, self.start = 0, time.monotonic()
        self.lock = threading.Lock()
        self.stopped = False  # set by the caller's thread: every file's thread stops

    def add(self, n: float) -> None:
        if self.stopped:
            raise DownloadStopped("the download is no longer wanted")
        with self.lock:
            self.done += int(n)

    def transfer(self, complete: bool = False) -> Transfer:
        with self.lock:
            done = self.total if complete else min(self.done, self.total)
        return Transfer(done, self.total, self.files, time.monotonic() - self.start)


def _bar_class(meter: _Meter | None) -> type:
    """A progress-bar class for huggingface_hub: silent (the job reports instead), the
    snapshot's bytes bar feeding meter."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Bar(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.meter = meter if kwargs.get("name") == BYTES_BAR else None
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.meter is not None and n:
                self.meter.add(n)
            return super().update(n)

    return Bar


def size_text(n: float) -> str:
    """Bytes as a person reads them: '999 B', '12.3 MB', '16.1 GB' (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
