"""The download meter: what a person reads of a download, and a stop heard by every file."""

from __future__ import annotations

import threading

import pytest

from worker.gptq import download
from worker.gptq.download import Transfer, _Meter


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


def test_reports_are_paced_and_the_last_one_says_everything(monkeypatch) -> None:
    clock = iter(range(0, 1000)).__next__  # one second a call
    monkeypatch.setattr(download.time, "monotonic", lambda: float(clock()))
    seen: list[Transfer] = []
    meter = _Meter(300, 2, seen.append)
    for _ in range(3):
        meter.add(100)
    meter.finish()
    assert [t.done for t in seen] == [100, 200, 300, 300]
    assert seen[-1].total == 300 and seen[-1].files == 2


def test_a_stop_raised_by_a_report_stops_every_files_thread() -> None:
    class Stop(Exception):
        pass

    def refuse(_: Transfer) -> None:
        raise Stop("cancelled")

    meter = _Meter(10 << 20, 3, refuse)
    with pytest.raises(Stop):
        meter.add(1 << 20)  # the first report
    stopped: list[str] = []

    def other_file() -> None:
        try:
            meter.add(1 << 20)  # within the pace: no report of its own, stopped all the same
        except Stop:
            stopped.append("stopped")

    threads = [threading.Thread(target=other_file) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stopped == ["stopped", "stopped"]
