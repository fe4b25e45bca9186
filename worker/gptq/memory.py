"""Give freed memory back to the operating system while streaming a model block by block.

glibc raises its mmap threshold every time a large block is freed (up to 32 MB), after which
tensors of a few MB come from the heap, whose freed pages are kept: the RSS of a streamed run
then grows by about one block per block although nothing is held. Fixing the threshold (and
trimming at 1 MB) makes every tensor over 1 MB its own mapping, returned to the system when
freed. Measured on a 4-block Llama (hidden 1024): RSS after each block 533 -> 625 MB without,
a flat 414 MB with; peak 794 -> 634 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 20
_done = False


def return_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _done
