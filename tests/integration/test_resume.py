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
from worker.gptq.errors import DiskFull
from worker.gptq.evaluate import EvalSpec
from worker.gptq.progress import ProgressEvent

CALIBRATION = CalibrationSpec("builtin", num_samples=8, seq_length=64)
CONFIG = QuantizeConfig(bits=4, group_size=32)
BLOCKS, KILL_AFTER = 4, 2

# quantize() in a child process that SIGKILLs itself once block KILL_AFTER is reported done:
# at once ("early": its files may still be being written), or once the work dir's state says it
# is committed ("committed")
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from worker.gptq.api import quantize
    from worker.gptq.config import CalibrationSpec, QuantizeConfig
    from worker.gptq.evaluate import EvalSpec

    model, out, work, kill_after, lazy, when, eval_text = sys.argv[1:8]

    def committed():
        try:
            return json.loads((Path(work) / "state.json").read_text())["finished"] >= int(kill_after)
        except (OSError, ValueError):
            return False

    def progress(event):
        if event.message == f"block {kill_after}/{event.num_blocks} done":
            while when == "committed" and not committed():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    quantize(model, out, QuantizeConfig(bits=4, group_size=32),
             CalibrationSpec("builtin", num_samples=8, seq_length=64), device="cpu",
             progress=progress, work_dir=work, lazy=lazy == "lazy",
             evaluate=EvalSpec(eval_text, seq_length=64, max_windows=4, prompts=()) if eval_text else None)
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"), layers=BLOCKS)


def _kill_midway(model_dir: Path, out: Path, work: Path, lazy: str, when: str = "committed",
                 eval_text: str = "", kill_after: int = KILL_AFTER) -> int:
    """Blocks committed when the run was killed."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), str(out), str(work), str(kill_after), lazy, when,
         eval_text],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    finished = json.loads((work / "state.json").read_text())["finished"]
    assert finished in (kill_after - 1, kill_after)  # the block after the last commit in flight
    assert (work / f"hidden-{finished:05d}.pt").is_file()
    return finished


def _block_messages(events: list[ProgressEvent]) -> list[str]:
    return [e.message for e in events if e.message.startswith(("block ", "resumed "))]


@pytest.mark.parametrize(("lazy", "when"), [("lazy", "committed"), ("eager", "committed"),
                                             ("lazy", "early")])
def test_killed_run_resumes_after_the_last_committed_block(model_dir, tmp_path, lazy, when) -> None:
    clean = quantize(str(model_dir), tmp_path / "clean", CONFIG, CALIBRATION, device="cpu")
    work = tmp_path / "work"
    finished = _kill_midway(model_dir, tmp_path / "killed", work, lazy, when)
    if when == "committed":
        assert finished == KILL_AFTER

    events: list[ProgressEvent] = []
    resumed = quantize(str(model_dir), tmp_path / "resumed", CONFIG, CALIBRATION, device="cpu",
                       progress=events.append, work_dir=work, lazy=lazy == "lazy")

    messages = _block_messages(events)
    assert messages[0] == f"resumed at block {finished + 1}/{BLOCKS}: blocks 1-{finished} restored from the work dir"
    started = [m for m in messages if m.startswith("block ") and not m.endswith("done")]
    assert started == [f"block {i}/{BLOCKS}" for i in range(finished + 1, BLOCKS + 1)]
    assert assert_same_checkpoint(tmp_path / "clean", tmp_path / "resumed") > 10
    assert [m["name"] for m in resumed.modules] == [m["name"] for m in clean.modules]
    assert [m["loss"] for m in resumed.modules] == [m["loss"] for m in clean.modules]
    # emptied once the checkpoint is written
    assert not work.exists() or not any(work.iterdir()), sorted(p.name for p in work.iterdir())


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
    assert (resumed.kl_divergence, resumed.top1_agreement) == (clean.kl_divergence, clean.top1_agreement)


@pytest.mark.parametrize("kill_after", [KILL_AFTER, BLOCKS])
def test_resumed_streamed_run_measures_what_the_clean_run_measures(model_dir, tmp_path, kill_after) -> None:
    """A streamed run's evaluation windows ride through the blocks (streameval.py): their
    hidden states are saved with each block (after the last one too), so a resumed run scores
    the same perplexities."""
    text = str(fixture_path("tinystories", "tinystories_valid_excerpt.txt"))
    spec = EvalSpec(source=text, seq_length=64, max_windows=4, prompts=())
    clean = quantize(str(model_dir), tmp_path / "clean", CONFIG, CALIBRATION, device="cpu", evaluate=spec)
    work = tmp_path / "work"
    finished = _kill_midway(model_dir, tmp_path / "killed", work, "lazy", eval_text=text, kill_after=kill_after)
    events: list[ProgressEvent] = []
    resumed = quantize(str(model_dir), tmp_path / "resumed", CONFIG, CALIBRATION, device="cpu",
                       evaluate=spec, work_dir=work, progress=events.append)
    assert clean.lazy and resumed.lazy
    where = f"at block {finished + 1}/{BLOCKS}" if finished < BLOCKS else "after the last block"
    assert _block_messages(events)[0] == f"resumed {where}: blocks 1-{finished} restored from the work dir"
    assert (resumed.perplexity_before, resumed.perplexity_after) == (clean.perplexity_before, clean.perplexity_after)
    assert (resumed.kl_divergence, resumed.top1_agreement) == (clean.kl_divergence, clean.top1_agreement)
    assert assert_same_checkpoint(tmp_path / "clean", tmp_path / "resumed") > 10


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


def test_a_block_is_written_while_the_next_one_is_worked_on(model_dir, tmp_path, monkeypatch) -> None:
    """The first block's file write is held until the second block's last layer is solved: the
    run goes on meanwhile, and the checkpoint is the same."""
    import threading

    from worker.gptq import blockstore

    clean = tmp_path / "clean"
    quantize(str(model_dir), clean, CONFIG, CALIBRATION, device="cpu")
    release, order = threading.Event(), []
    real_save = blockstore.save_file

    def held_save(tensors, path, metadata=None):
        if "block-00000" in path:
            assert release.wait(120), "the second block never started"
            order.append("block 1 written")
        return real_save(tensors, path, metadata=metadata)

    def progress(event: ProgressEvent) -> None:
        if event.block == 2 and event.module == "mlp.down_proj":
            order.append("block 2 solved")
            release.set()

    monkeypatch.setattr(blockstore, "save_file", held_save)
    quantize(str(model_dir), tmp_path / "overlapped", CONFIG, CALIBRATION, device="cpu",
             progress=progress, work_dir=tmp_path / "work")
    assert order == ["block 2 solved", "block 1 written"]
    assert_same_checkpoint(clean, tmp_path / "overlapped")


def test_a_failed_block_write_fails_the_run_with_its_error(model_dir, tmp_path, monkeypatch) -> None:
    import errno

    from worker.gptq import blockstore

    def full_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blockstore, "save_file", full_disk)
    with pytest.raises(DiskFull) as raised:  # the engine's name for ENOSPC, with its advice
        quantize(str(model_dir), tmp_path / "out", CONFIG, CALIBRATION, device="cpu",
                 work_dir=tmp_path / "work")
    assert raised.value.code == "disk_full" and "free disk space" in raised.value.message
    assert not (tmp_path / "out").exists()
