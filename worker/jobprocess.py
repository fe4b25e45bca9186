"""Every job and every follow-up (verification, publication) runs in a process of its own
that starts clean.

A job process is exec'd (a new interpreter), never forked from the worker: whatever the
worker's process imported or initialised cannot reach it. CUDA above all: a library that
touches CUDA while being imported (torchao does, once installed) breaks every child forked
after it ("Cannot re-initialize CUDA in forked subprocess").

To keep a job's start cheap, the next job process is started ahead of its job (when the
worker starts, and then as each job begins): it imports torch, transformers and the engine,
then waits on its stdin for one line, `job <id>` or `follow-up <id>` (a verification or a
publication). It runs that one item and exits, so everything it allocated (GPU memory
included) goes back to the system. It dies with the process that started it (PR_SET_PDEATHSIG),
so stopping a worker never leaves a job process behind.

Parent side: `Launcher`. Child side: `python -m worker.jobprocess` (main()).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import time
from typing import Literal

log = logging.getLogger("gptqd.worker")

Kind = Literal["job", "follow-up"]  # follow-up: a verification or a publication

# what a job imports on first use (seconds per job otherwise): imported while the process waits
PRELOAD = (
    "torch", "transformers", "accelerate", "tokenizers", "safetensors.torch",
    "transformers.tokenization_utils_fast", "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama",
    "transformers.generation.utils", "huggingface_hub.serialization",
    "worker.gptq.api", "worker.gptq.loader", "worker.gptq.lazyload", "worker.gptq.export",
    "worker.gptq.calibration", "worker.gptq.pipeline", "worker.gptq.blockstore",
    "worker.gptq.evaluate", "worker.jobrunner", "worker.verifier", "worker.followup",
)
PARENT_ENV = "GPTQD_JOB_PARENT"  # the pid the job process must die with
READY_ENV = "GPTQD_JOB_READY_FD"  # where it writes one byte once it has imported the engine
READY_LINE = "job process ready"  # logged then, for people and tests reading a worker's log
PR_SET_PDEATHSIG = 1


class Launcher:
    """Starts job processes ahead of their jobs, one waiting at a time."""

    def __init__(self) -> None:
        self.waiting: subprocess.Popen | None = None
        self._ready: int | None = None  # read end of the waiting process's "imported" pipe

    def prepare(self) -> None:
        """Starts the next job process now, unless one is already waiting."""
        if self.waiting is not None and self.waiting.poll() is None:
            return
        self._close_ready()
        read, write = os.pipe()
        try:
            self.waiting = subprocess.Popen(
                [sys.executable, "-m", "worker.jobprocess"], stdin=subprocess.PIPE,
                env={**os.environ, PARENT_ENV: str(os.getpid()), READY_ENV: str(write)},
                close_fds=True, pass_fds=(write,),
            )
        finally:
            os.close(write)
        self._ready = read

    def wait_ready(self, timeout: float) -> bool:
        """Waits until the waiting job process has imported the engine; False if it died
        first or took longer than timeout."""
        if self._ready is None:
            return False
        readable, _, _ = select.select([self._ready], [], [], timeout)
        done = bool(readable) and os.read(self._ready, 1) == b"1"
        if readable:
            self._close_ready()
        return done

    def _close_ready(self) -> None:
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None

    def run(self, kind: Kind, item_id: str) -> tuple[int, int]:
        """Hands one item to the waiting job process (started now if none waits) and waits
        for it to end: (its pid, its exit code; negative: the signal that killed it)."""
        self.prepare()
        proc, self.waiting = self.waiting, None
        self._close_ready()
        assert proc is not None and proc.stdin is not None
        self.prepare()  # the next job's process imports while this one runs
        try:
            proc.stdin.write(f"{kind} {item_id}\n".encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died while waiting; wait() below says how
            pass
        return proc.pid, proc.wait()


def _die_with_parent() -> None:
    """SIGKILL this process when the one that started it ends (Linux), and exit now if that
    already happened before the request was in place."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    # not glibc (OSError): the parent's end is still seen below and by end-of-file on stdin
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):
        os._exit(0)


def _limit_memory() -> None:
    """The job memory limit (GPTQD_JOB_MEMORY_LIMIT_MB): a job that needs more fails with
    out_of_memory instead of waking the kernel's OOM killer."""
    from app.settings import get_settings

    limit = get_settings().job_memory_limit_mb
    if limit:
        size = limit * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        log.info("job memory limited to %d MiB", limit)


def _say_ready() -> None:
    fd = os.environ.pop(READY_ENV, None)
    if fd is not None:
        with contextlib.suppress(OSError):  # the worker stopped waiting: nothing to tell
            os.write(int(fd), b"1")
        with contextlib.suppress(OSError):
            os.close(int(fd))


def run_item(kind: Kind, item_id: str) -> str | None:
    """Runs one job or follow-up in this process; its final status (None: skipped)."""
    from app.settings import get_settings
    from app.store import Store

    settings = get_settings()
    if settings.hf_token is not None and not os.environ.get("HF_TOKEN"):
        # the worker's token (GPTQD_HF_TOKEN as well) for every hub request of the item: hub
        # datasets take it from the environment only
        os.environ["HF_TOKEN"] = settings.hf_token.get_secret_value()
    store = Store(settings.store_url)
    try:
        if kind == "job":
            from worker.jobrunner import run_job

            return run_job(item_id, store, settings)
        from worker.followup import run_follow_up

        return run_follow_up(item_id, store, settings)
    finally:
        store.dispose()


def main() -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s: %(levelname)s/JobProcess-%(process)d] %(message)s")
    _limit_memory()
    started = time.monotonic()
    for name in PRELOAD:
        importlib.import_module(name)
    _say_ready()
    log.info("%s: engine imported in %.1f s", READY_LINE, time.monotonic() - started)
    line = sys.stdin.readline().split()
    if not line:  # the worker stopped before giving this process a job
        return
    kind, item_id = line
    if kind not in ("job", "follow-up"):
        raise SystemExit(f"unknown item kind {kind!r}")
    status = run_item(kind, item_id)  # type: ignore[arg-type]
    log.info("%s %s: %s", kind, item_id, status or "skipped (not queued)")


if __name__ == "__main__":
    main()
