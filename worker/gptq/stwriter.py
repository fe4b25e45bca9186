"""A safetensors file written one tensor at a time.

safetensors.torch.save_file needs every tensor of a file in memory at once; a checkpoint shard
(5 GB by default) would then cost its whole size in RAM at the end of a streamed run that held
one block at a time until then. Here each tensor is appended to a scratch file as it is made
and dropped; the final file is the header followed by the tensors copied over in save_file's
order, so the result is byte for byte what save_file writes (tests/unit/test_stwriter.py).

Format (https://github.com/huggingface/safetensors): u64 little-endian header length, a JSON
header {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}} padded
with spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
# safetensors orders a file's tensors by dtype, in the reverse of its Dtype enum's order (this
# list), then by name
_DTYPE_ORDER = ["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]
_COPY_CHUNK = 16 << 20


def save_streamed(
    tensors: Iterable[tuple[str, torch.Tensor]], path: Path, metadata: dict[str, str] | None = None
) -> dict[str, int]:
    """Write the (name, tensor) pairs as they come; returns each tensor's size in bytes."""
    path = Path(path)
    scratch = path.with_name(path.name + ".data.tmp")
    layout: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # dtype, shape, offset, size
    try:
        with open(scratch, "wb") as out:
            for name, tensor in tensors:
                if name in layout:
                    raise ValueError(f"tensor {name} given twice")
                data = tensor.detach().to("cpu").contiguous()
                raw = data.reshape(-1).view(torch.uint8).numpy()
                layout[name] = (data.dtype, list(data.shape), out.tell(), raw.nbytes)
                out.write(memoryview(raw))
                del data, raw
        order = sorted(layout, key=lambda n: (-_DTYPE_ORDER.index(_DTYPES[layout[n][0]]), n))
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        begin = 0
        for name in order:
            dtype, shape, _, size = layout[name]
            header[name] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [begin, begin + size]}
            begin += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(scratch, "rb") as src, open(path, "wb") as dst:
            dst.write(struct.pack("<Q", len(encoded)))
            dst.write(encoded)
            for name in order:
                _, _, offset, size = layout[name]
                src.seek(offset)
                _copy(src, dst, size)
    finally:
        scratch.unlink(missing_ok=True)
    return {name: entry[3] for name, entry in layout.items()}


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    while size > 0:
        chunk = src.read(min(size, _COPY_CHUNK))
        if not chunk:
            raise OSError("scratch file ended early")
        dst.write(chunk)
        size -= len(chunk)

