"""A hub model downloaded while the job shows it: bytes of a known total, rate and time left in
the loading stage's message, the fraction moving; a cancel stops the download at its next
chunk; a second run reads the cache and fetches no weights. The hub is tests/fakehub.py, a
real HTTP server on loopback that slows its file bodies to a set rate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fakehub import fake_hub, hub_env
from tests.integration.checkpoints import assert_same_checkpoint, tiny_llama
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig

REPO = "acme/tiny-llama"
RATE = 5_000_000  # bytes a second over both files: 20 MB take 4 s
CHILD = textwrap.dedent("""
    import json, sys, time
    from worker.gptq.api import quantize
    from worker.gptq.config import CalibrationSpec, QuantizeConfig
    from worker.gptq.progress import Cancelled

    repo, out, mode = sys.argv[1:4]
    began, seen = time.monotonic(), []

    def show(event):
        seen.append(event.message.startswith("downloading"))
        print(json.dumps({"stage": event.stage, "fraction": event.fraction,
                          "message": event.message}), flush=True)

    def stop():  # a job cancelled once its download is shown under way
        return mode == "cancel" and any(seen)

    try:
        report = quantize(repo, out, QuantizeConfig(bits=4, group_size=32),
                          CalibrationSpec("builtin", num_samples=8, seq_length=64), device="cpu",
                          progress=show, should_stop=stop, lazy=mode != "whole")
        print(json.dumps({"lazy": report.lazy}))
    except Cancelled as exc:
        print(json.dumps({"cancelled": str(exc), "seconds": time.monotonic() - began}))
""")
PROGRESS = re.compile(r"downloading acme/tiny-llama: ([\d.]+ [KM]?B) of ([\d.]+) MB in 2 files"
                      r"(?: at [\d.]+ [KM]?B/s, about (\d+):(\d\d) left)?$")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A two-block Llama whose 40000-row embedding and head make 20 MB in two files (the
    blocks stay tiny, so quantizing it takes a second)."""
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model", layers=2, vocab=40000,
                      max_shard_size="12MB")


def _run(repo: str, hub_url: str, cache: Path, out: Path, mode: str) -> tuple[list[dict], dict]:
    env = {**os.environ, **hub_env(hub_url, cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, repo, str(out), mode],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[:-1], lines[-1]


def _megabytes(size: str) -> float:
    number, unit = size.split()
    return float(number) / {"B": 1e6, "KB": 1e3, "MB": 1}[unit]


def _downloads(events: list[dict]) -> list[tuple[float, float, float, int | None]]:
    """(fraction, MB done, MB total, seconds left) of each download event."""
    found = []
    for event in events:
        match = PROGRESS.fullmatch(event["message"])
        if match:
            assert event["stage"] == "loading", event
            left = None if match.group(3) is None else int(match.group(3)) * 60 + int(match.group(4))
            found.append((event["fraction"], _megabytes(match.group(1)), float(match.group(2)),
                          left))
    return found


@pytest.mark.parametrize("mode", ["streamed", "whole"])
def test_a_hub_download_shows_its_bytes_and_the_checkpoint_is_the_local_ones(
        source: Path, tmp_path: Path, mode: str) -> None:
    local = tmp_path / "local"
    quantize(str(source), local, QuantizeConfig(bits=4, group_size=32),
             CalibrationSpec("builtin", num_samples=8, seq_length=64), device="cpu",
             lazy=mode == "streamed")
    with fake_hub({REPO: source}, rate=RATE) as hub:
        events, result = _run(REPO, hub.url, tmp_path / "cache", tmp_path / "hub", mode)
        fetched = hub.downloads(".safetensors")
    assert result == {"lazy": mode == "streamed"}
    assert sorted(fetched) == ["model-00001-of-00002.safetensors",
                               "model-00002-of-00002.safetensors"]
    downloads = _downloads(events)
    total = sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e6
    assert downloads and all(abs(t - total) < 0.1 for _, _, t, _ in downloads), (downloads, total)
    # on the way: part of the bytes, a rate and the time left; at the end all of them
    assert any(done < total and left is not None for _, done, _, left in downloads), downloads
    assert downloads[-1][1] == downloads[-1][2]
    assert [d for _, d, _, _ in downloads] == sorted(d for _, d, _, _ in downloads)
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and downloads[0][0] < downloads[-1][0] < 0.1
    assert_same_checkpoint(local, tmp_path / "hub")

    if mode == "whole":
        return
    # the hub cache holds the model now: a second job fetches no weights and shows no download
    with fake_hub({REPO: source}, rate=RATE) as hub:
        events, _ = _run(REPO, hub.url, tmp_path / "cache", tmp_path / "again", mode)
        assert hub.downloads(".safetensors") == []
    assert _downloads(events) == []
    assert_same_checkpoint(local, tmp_path / "again")


def test_a_cancel_stops_the_download_at_its_next_chunk(source: Path, tmp_path: Path) -> None:
    with fake_hub({REPO: source}, rate=2_000_000) as hub:  # 20 MB would take 10 s
        events, result = _run(REPO, hub.url, tmp_path / "cache", tmp_path / "out", "cancel")
        sent = hub.sent
    assert result["cancelled"] == f"quantization cancelled while downloading {REPO}"
    total = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    # cancelled at the first report: the download stopped at its next chunks, not at the end
    assert sent < 0.6 * total, (sent, total)
    # and the partial files are gone from the hub cache (the next fetch starts anew)
    assert list((tmp_path / "cache").rglob("*.incomplete")) == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert all(e["stage"] == "loading" for e in events)
    assert _downloads(events), events


GATED = "acme/gated-llama"
CASES = {  # model, calibration, token -> the error code and words of advice (None: succeeds)
    # the hub answers a private repository without its token as a missing one
    "private without a token": (REPO, "builtin", "",
                                ("model_not_found", REPO, "not found on the hub", "HF_TOKEN")),
    "private with its token": (REPO, "builtin", "hf_fake_token", None),
    "gated without a token": (GATED, "builtin", "",
                              ("model_access_denied", GATED, "accept its terms", "HF_TOKEN")),
    "no such model": ("acme/no-such-model", "builtin", "",
                      ("model_not_found", "acme/no-such-model", "not found on the hub")),
    "no such dataset": (REPO, "acme/no-such-text", "hf_fake_token",
                        ("calibration", "acme/no-such-text", "could not be loaded")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hub_refusals_say_what_to_do(source: Path, tmp_path: Path, case: str) -> None:
    model, calibration, token, expected = CASES[case]
    with fake_hub({REPO: source, GATED: source}, private={REPO}, gated={GATED}) as hub:
        env = {**os.environ, **hub_env(hub.url, tmp_path / "cache"), "HF_TOKEN": token}
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "quantize", "--model", model, "--out",
             str(tmp_path / "out"), "--calibration", calibration, "--num-samples", "8",
             "--seq-length", "64", "--group-size", "32"],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2], env=env)
        fetched = hub.downloads(".safetensors")
    if expected is None:
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "out" / "model.safetensors").is_file()
        # the command's progress (one line an event off a terminal) shows the download
        lines = [line for line in done.stderr.splitlines() if line.startswith("loading ")]
        assert any(f"downloading {REPO}: 20.8 MB of 20.8 MB in 2 files" in line
                   for line in lines), lines
        return
    code, *advice = expected
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error [{code}]" in done.stderr, done.stderr[-2000:]
    assert all(words in done.stderr for words in advice), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if code != "calibration":  # refused before any weight: the calibration text is read first
        assert fetched == []
