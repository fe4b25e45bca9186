"""A directory streamed as one uncompressed tar, file by file, without buffering whole files."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from app.paths import OutsideRoot, inside

BLOCK = 512
CHUNK = 1 << 20


def tar_size(files: list[tuple[str, int]], prefix: str) -> int:
    """Exact byte length of the stream tar_stream() makes for these (name, size) pairs."""
    total = 2 * BLOCK  # end-of-archive marker
    for name, size in files:
        total += len(_header(f"{prefix}/{name}", size, 0)) + size + (-size % BLOCK)
    return total


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def check_files(root: Path, files: list[tuple[str, int]]) -> str | None:
    """Why root does not hold these (name, size) files as plain files inside it, or None.
    Checked before a stream starts: an error midway could only cut the stream short."""
    for name, size in files:
        try:
            path = inside(root, name)
        except OutsideRoot:
            return f"{name!r} is not inside the checkpoint's directory"
        if not path.is_file() or path.stat().st_size != size:
            return f"{name!r} is missing or changed on the server's disk"
    return None


def tar_stream(root: Path, files: list[tuple[str, int]], prefix: str) -> Iterator[bytes]:
    """Yields a tar of root/name for each (name, size), stored as prefix/name.

    Sizes come from the job's artifact list; a file that changed size since is an error
    rather than a silently corrupt archive.
    """
    for name, size in files:
        path = inside(root, name)  # never a symlink out of the job's directory
        yield _header(f"{prefix}/{name}", size, int(path.stat().st_mtime))
        sent = 0
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                sent += len(block)
                yield block
        if sent != size:
            raise OSError(f"{name} changed size while being archived")
        yield b"\0" * (-size % BLOCK)
    yield b"\0" * (2 * BLOCK)
