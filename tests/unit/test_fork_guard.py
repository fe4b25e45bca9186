"""A pool process is never forked while the worker's reconciler thread is inside a pass (it may
hold SQLite's or a socket library's locks, which the child would inherit held)."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

from worker import reconciler


def test_a_fork_waits_for_the_pass_to_end(monkeypatch) -> None:
    inside, leave = threading.Event(), threading.Event()

    def slow_pass(store, settings, sender, missing_before=frozenset()):  # a pass blocked in a query
        inside.set()
        leave.wait(5)
        return reconciler.Pass()

    monkeypatch.setattr(reconciler, "reconcile", slow_pass)
    thread = reconciler.Reconciler(None, SimpleNamespace(reconcile_seconds=60), None)  # type: ignore[arg-type]
    thread.start()
    try:
        assert inside.wait(5)
        threading.Timer(0.5, leave.set).start()
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: the guard's lock is free here too
            os._exit(0 if reconciler._in_pass.acquire(timeout=1) else 1)
        waited = time.monotonic() - began
        _, status = os.waitpid(pid, 0)
        assert waited >= 0.3, f"forked {waited:.3f}s after the pass began, while it was running"
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        thread.stop()
        thread.join(5)
