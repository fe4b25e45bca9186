"""One step of the GPU check as a child process: under `timeout`, in a session of its own, and
afterwards every process it started is killed, found by a tag in its environment (so a
process that moved to a session of its own, like `gptqd up`'s worker, is found too).
Also: nvidia-smi sampling while a step runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

TAG_VAR = "GPU_CHECK_TAG"


@dataclass
class Outcome:
    rc: int | None  # None: it outlived its timeout and the grace after it
    seconds: float
    timeout: float
    log: Path

    @property
    def timed_out(self) -> bool:
        # 124: timeout's TERM ended it; 137: its KILL (-k) did
        return self.rc in (None, 124, 137)

    def why(self) -> str:
        """Why it failed, in a few words: the timeout, or its exit code and last log line."""
        if self.timed_out:
            return f"timed out after {self.timeout:.0f} s (last output: {last_line(self.log)})"
        return f"exit {self.rc}: {last_line(self.log)}"


def last_line(path: Path, skip: tuple[str, ...] = ("Warning", "warn(", "W1", "  ")) -> str:
    """The last meaningful line of a log (tracebacks end with the error), cut to 200 chars."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        text = line.strip()
        if text and not line.startswith(skip):
            return text[:200]
    return "empty log"


def run(cmd: list[str], *, env: dict[str, str], timeout: float, log: Path,
        cwd: Path | None = None) -> Outcome:
    """Runs cmd to completion or for timeout seconds; kills all it started either way."""
    tag = uuid.uuid4().hex
    start = time.monotonic()
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            ["timeout", "-k", "10", f"{max(timeout, 1):.0f}", *cmd],
            env={**env, TAG_VAR: tag}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            start_new_session=True,
        )
    try:
        rc: int | None = proc.wait(timeout + 20)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill_tagged(tag)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    return Outcome(rc, time.monotonic() - start, timeout, log)


def tagged(tag: str) -> list[int]:
    """Pids of the processes whose environment holds this run's tag."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                pids.append(int(entry))
    return pids


def kill_tagged(tag: str, rounds: int = 3) -> None:
    # a few rounds: a dying parent may still fork (Celery replaces pool children)
    for _ in range(rounds):
        pids = tagged(tag)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


class GpuSampler:
    """nvidia-smi's GPU utilisation and memory every 500 ms while a step runs (a no-op
    when disabled: CPU mode, or no nvidia-smi)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            with self.path.open("wb") as out:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits", "-lms", "500"],
                    stdout=out, stderr=subprocess.DEVNULL,
                )
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def summary(self) -> dict[str, float] | None:
        """{samples, util_mean, util_max, mem_used_max_mib}; None when nothing was sampled."""
        if not self.enabled or not self.path.exists():
            return None
        util, mem = [], []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                util.append(int(parts[0]))
                mem.append(int(parts[1]))
        if not util:
            return None
        return {"samples": len(util), "util_mean": round(sum(util) / len(util), 1),
                "util_max": max(util), "mem_used_max_mib": max(mem)}
