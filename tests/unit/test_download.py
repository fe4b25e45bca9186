"""The download meter: what a person reads of a download, and a stop heard by every file."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from worker.gptq import download
from worker.gptq.download import DownloadStopped, Transfer, _Meter


def test_a_transfer_says_bytes_of_total_rate_and_time_left() -> None:
    assert Transfer(0, 16_100_000_000, 4, 0.0).describe("org/m") == \
        "downloading org/m: 0 B of 16.1 GB in 4 files"
    assert Transfer(6_400_000_000, 16_100_000_000, 4, 57.0).describe("org/m") == \
        "downloading org/m: 6.4 GB of 16.1 GB in 4 files at 112.3 MB/s, about 1:27 left"
    # one file; the time left rounds up, so it reads 0:00 only when nothing is left
    assert Transfer(999_000, 1_000_000, 1, 1.0).describe("m") == \
        "downloading m: 999.0 KB of 1.0 MB at 999.0 KB/s, about 0:01 left"
    assert Transfer(1_000_000, 1_000_000, 1, 1.0).describe("m") == \
        "downloading m: 1.0 MB of 1.0 MB"


class FakeSnapshot:
    """snapshot_download of one 100-byte file whose transfer reports `chunks` bytes, then
    (a native transfer deaf to stops) hangs until released."""

    def __init__(self, chunks: list[int]) -> None:
        self.chunks, self.release = chunks, threading.Event()

    def __call__(self, repo_id: str, *, dry_run: bool = False, tqdm_class=None, **_: object):
        if dry_run:
            return [SimpleNamespace(file_size=100, will_download=True)]
        bar = tqdm_class(name=download.BYTES_BAR, total=100, unit="B")
        for n in self.chunks:
            bar.update(n)
        self.release.wait(30)
        return "/snapshot"


@pytest.fixture
def snapshot(monkeypatch) -> Iterator[FakeSnapshot]:
    import huggingface_hub

    fake = FakeSnapshot([40])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(download, "REPORT_EVERY_S", 0.05)
    monkeypatch.setattr(download, "STOP_GRACE_S", 0.5)
    yield fake
    fake.release.set()


def test_a_download_is_reported_from_the_callers_thread_until_it_ends(snapshot) -> None:
    seen: list[tuple[int, str]] = []

    def hear(transfer: Transfer) -> None:
        seen.append((transfer.done, threading.current_thread().name))
        if len(seen) == 3:
            snapshot.release.set()

    assert download.fetch("org/m", ["*"], on_transfer=hear) == Path("/snapshot")
    assert {name for _, name in seen} == {threading.current_thread().name}
    dones = [done for done, _ in seen]
    assert 40 in dones and dones[-1] == 100 and dones == sorted(dones)  # on the way, then all


def test_a_cancel_is_heard_while_the_transfer_does_not_report(snapshot) -> None:
    class Cancelled(Exception):
        pass

    def cancel(_: Transfer) -> None:
        raise Cancelled

    began = time.monotonic()
    with pytest.raises(Cancelled):
        download.fetch("org/m", ["*"], on_transfer=cancel)
    # after the grace for the files' threads, not when the (hanging) transfer ends
    assert time.monotonic() - began < 5


def test_a_stopped_meter_stops_every_files_thread() -> None:
    meter = _Meter(300, 3)
    meter.add(100)
    assert meter.transfer().done == 100 and meter.transfer(complete=True).done == 300
    meter.stopped = True
    with pytest.raises(DownloadStopped):
        meter.add(100)
