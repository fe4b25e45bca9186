"""Uploaded calibration text: saved as `<datasets>/<id>.<format>` after its content is checked."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from app.bodylimit import too_large
from app.schemas import check_text

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
CHUNK = 1 << 20


class BadUpload(ValueError):
    pass


class TooLarge(ValueError):
    pass


def upload_format(filename: str) -> str:
    try:
        check_text(filename)
    except ValueError as exc:
        raise BadUpload(f"file name {exc}") from exc
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        raise BadUpload(f"file must be .txt, .jsonl or .parquet, got {filename!r}")
    return FORMATS[suffix]


def clean_filename(filename: str) -> str:
    name = Path(filename.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._ -]", "_", name)[:200] or "upload"


def save_upload(src: BinaryIO, dest: Path, limit: int) -> tuple[int, str]:
    """Copies src to dest, refusing more than limit bytes; returns (size, sha256)."""
    h, size = hashlib.sha256(), 0
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with tmp.open("wb") as out:
            while block := src.read(CHUNK):
                size += len(block)
                if size > limit:
                    raise TooLarge(too_large("file", limit))
                h.update(block)
                out.write(block)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size, h.hexdigest()


def check_content(path: Path, fmt: str) -> None:
    """Raises BadUpload when the file cannot be read as the format it claims to be."""
    if path.stat().st_size == 0:
        raise BadUpload("file is empty")
    if fmt == "txt":
        _check_utf8(path)
    elif fmt == "jsonl":
        _check_jsonl(path)
    else:
        _check_parquet(path)


def _check_utf8(path: Path) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        try:
            while block := f.read(CHUNK):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise BadUpload(f"a .txt file must be UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _check_jsonl(path: Path) -> None:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BadUpload(f"line {number} is not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise BadUpload(f"line {number} is not a JSON object")


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except Exception as exc:
        raise BadUpload(f"not a readable parquet file: {exc}") from exc


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
