"""A safetensors file written one tensor at a time, each straight to its place.

safetensors' save_file needs every tensor of a file in memory at once: a checkpoint shard
(4 GB by default) would cost its whole size in RAM at the end of a streamed run that held one
block at a time until then. When the names, dtypes and shapes are known beforehand, so is the
header and with it every tensor's offset: each tensor is written at its offset as it is made,
then dropped. Nothing is staged elsewhere (a nearly full disk needs no more room than for
save_file), and the file is byte for byte what save_file writes (tests/unit/test_stwriter.py).

Format (https://github.com/huggingface/safetensors): u64 little-endian header length, a JSON
header {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}} padded
with spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' names, in the order of its Dtype enum: a file holds its tensors sorted by dtype,
# last of this list first, then by name
_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(_DTYPES)}
DTYPE_OF = {name: dtype for dtype, name in _DTYPES.items()}  # a safetensors header's dtype name


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of a tensor before it exists."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(
    path: Path,
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the (name, tensor) pairs as they come, each exactly as its spec announced; every
    spec must be given a tensor. A failure leaves no file behind."""
    path = Path(path)
    header, offsets = _header(specs, metadata)
    written: set[str] = set()
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            base = out.tell()
            for name, tensor in tensors:
                _check(name, tensor, specs, written)
                data = tensor.detach().to("cpu").contiguous()
                out.seek(base + offsets[name])
                out.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                written.add(name)
                del data
            if written != specs.keys():
                raise ValueError(f"no tensor was given for {sorted(specs.keys() - written)}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _header(specs: Mapping[str, TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    for name, spec in specs.items():
        if spec.dtype not in _DTYPES:
            raise ValueError(f"{name}: safetensors has no dtype {spec.dtype}")
    order = sorted(specs, key=lambda name: (-_RANK[specs[name].dtype], name))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets: dict[str, int] = {}
    begin = 0
    for name in order:
        spec = specs[name]
        header[name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [begin, begin + spec.nbytes]}
        offsets[name] = begin
        begin += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return encoded + b" " * (-len(encoded) % 8), offsets


def _check(name: str, tensor: torch.Tensor, specs: Mapping[str, TensorSpec], written: set[str]) -> None:
    spec = specs.get(name)
    if spec is None:
        raise ValueError(f"{name} is not in the file's header")
    if name in written:
        raise ValueError(f"{name} given twice")
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{name} was made as {tensor.dtype} {tuple(tensor.shape)}, "
                         f"announced as {spec.dtype} {spec.shape}")
