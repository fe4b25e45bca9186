"""A run killed (SIGKILL) after block k of n resumes from its work dir at block k+1 and writes
a checkpoint bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import fixture_path
from tests.integration.checkpoints import assert_same_checkpoint, tiny_llama
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.evaluate import EvalSpec
from worker.gptq.progress import ProgressEvent

CALIBRATION = CalibrationSpec("builtin", num_samples=8, seq_length=64)
CONFIG = QuantizeConfig(bits=4, group_size=32)
BLOCKS, KILL_AFTER = 4, 2

# quantize() in a child process that SIGKILLs itself once block KILL_AFTER is reported done
# (the block is on disk by then: the done event follows the work dir's commit)
CHILD = textwrap.dedent("""
    import os, signal, sys
    from worker.gptq.api import quantize
    from worker.gptq.config import CalibrationSpec, QuantizeConfig

    model, out, work, kill_after, lazy = sys.argv[1:6]

    def progress(event):
        if event.message == f"block {kill_after}/{event.num_blocks} done":
            os.kill(os.getpid(), signal.SIGKILL)

    quantize(model, out, QuantizeConfig(bits=4, group_size=32),
             CalibrationSpec("builtin", num_samples=8, seq_length=64), device="cpu",
             progress=progress, work_dir=work, lazy=lazy == "lazy")
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"), layers=BLOCKS)


def _kill_midway(model_dir: Path, out: Path, work: Path, lazy: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), str(out), str(work), str(KILL_AFTER), lazy],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    state = json.loads((work / "state.json").read_text())
    assert state["finished"] == KILL_AFTER
    assert (work / f"hidden-{KILL_AFTER:05d}.pt").is_file()


def _block_messages(events: list[ProgressEvent]) -> list[str]:
    return [e.message for e in events if e.message.startswith(("block ", "resumed "))]


@pytest.mark.parametrize("lazy", ["lazy", "eager"])
def test_killed_run_resumes_after_the_last_finished_block(model_dir, tmp_path, lazy) -> None:
    clean = quantize(str(model_dir), tmp_path / "clean", CONFIG, CALIBRATION, device="cpu")
    work = tmp_path / "work"
    _kill_midway(model_dir, tmp_path / "killed", work, lazy)

    events: list[ProgressEvent] = []
    resumed = quantize(str(model_dir), tmp_path / "resumed", CONFIG, CALIBRATION, device="cpu",
                       progress=events.append, work_dir=work, lazy=lazy == "lazy")

    messages = _block_messages(events)
    assert messages[0] == f"resumed at block {KILL_AFTER + 1}/{BLOCKS}: blocks 1-{KILL_AFTER} restored from the work dir"
    started = [m for m in messages if m.startswith("block ") and not m.endswith("done")]
    assert started == [f"block {i}/{BLOCKS}" for i in range(KILL_AFTER + 1, BLOCKS + 1)]
    assert assert_same_checkpoint(tmp_path / "clean", tmp_path / "resumed") > 10
    assert [m["name"] for m in resumed.modules] == [m["name"] for m in clean.modules]
    assert [m["loss"] for m in resumed.modules] == [m["loss"] for m in clean.modules]
    assert not work.exists() or not any(work.iterdir())  # emptied once the checkpoint is written


def test_resumed_whole_model_run_evaluates_the_restored_blocks(model_dir, tmp_path) -> None:
    """Without lazy loading, restored blocks get their quantized weights back in memory, so
    the perplexity after quantization is the clean run's."""
    spec = EvalSpec(source=str(fixture_path("tinystories", "tinystories_valid_excerpt.txt")),
                    seq_length=64, max_windows=4)
    clean = quantize(str(model_dir), tmp_path / "clean", CONFIG, CALIBRATION, device="cpu", evaluate=spec)
    work = tmp_path / "work"
    _kill_midway(model_dir, tmp_path / "killed", work, "eager")
    resumed = quantize(str(model_dir), tmp_path / "resumed", CONFIG, CALIBRATION, device="cpu",
                       evaluate=spec, work_dir=work)
    assert resumed.perplexity_after == clean.perplexity_after
    assert resumed.perplexity_after != resumed.perplexity_before


def test_work_dir_of_another_run_is_not_resumed_from(model_dir, tmp_path) -> None:
    work = tmp_path / "work"
    _kill_midway(model_dir, tmp_path / "killed", work, "lazy")
    (work / "notes.txt").write_text("not ours")  # a work dir given by mistake loses nothing else
    other = CalibrationSpec("builtin", num_samples=8, seq_length=64, seed=1)
    events: list[ProgressEvent] = []
    quantize(str(model_dir), tmp_path / "other", CONFIG, other, device="cpu", work_dir=work,
             progress=events.append)
    assert any("work dir not resumed from" in e.message for e in events)
    assert not any(m.startswith("resumed") for m in _block_messages(events))
    assert [p.name for p in work.iterdir()] == ["notes.txt"]
    clean = quantize(str(model_dir), tmp_path / "clean", CONFIG, other, device="cpu")
    assert clean.lazy
    assert_same_checkpoint(tmp_path / "clean", tmp_path / "other")
