"""Breaks forked children the way an initialised CUDA does, for tests on a machine without one.

Importing this module registers an at-fork hook: in a child forked from this process, torch's
compute entry points raise "Cannot re-initialize CUDA in forked subprocess", as every CUDA call
does in a child forked from a process that initialised CUDA (pytorch #40403). A process that was
exec'd (not forked) after the import is unaffected, like a fresh process on a GPU box.
"""

from __future__ import annotations

import builtins
import os
import sys

MESSAGE = "Cannot re-initialize CUDA in forked subprocess (simulated by tests/forkpoison)"
_poisoned = False


def _raise(*_: object, **__: object) -> None:
    raise RuntimeError(MESSAGE)


def _poison_torch(torch: object) -> None:
    import torch.nn.functional as F

    for owner, name in ((torch, "matmul"), (torch, "mm"), (torch, "addmm"), (torch, "bmm"),
                        (torch, "manual_seed"), (F, "linear"), (F, "embedding")):
        setattr(owner, name, _raise)
    torch.Tensor.__matmul__ = _raise  # type: ignore[attr-defined]
    torch.Tensor.addmm_ = _raise  # type: ignore[attr-defined]


def _after_fork_in_child() -> None:
    global _poisoned
    _poisoned = True
    if "torch.nn.functional" in sys.modules:
        _poison_torch(sys.modules["torch"])
        return
    # torch not imported yet: poison it as soon as an outermost import that loaded it returns
    # (not while torch is still half-initialised)
    real_import = builtins.__import__
    depth = 0

    def importing(name: str, *args: object, **kwargs: object) -> object:
        nonlocal depth
        depth += 1
        try:
            module = real_import(name, *args, **kwargs)
        finally:
            depth -= 1
        if depth == 0 and "torch.nn.functional" in sys.modules:
            builtins.__import__ = real_import
            _poison_torch(sys.modules["torch"])
        return module

    builtins.__import__ = importing


def poisoned() -> bool:
    """True in a process forked from one that imported this module."""
    return _poisoned


os.register_at_fork(after_in_child=_after_fork_in_child)
