"""Bit packing of GPTQ codes and zero points into int32 words (gptq-format.md §3, §4).

Every width uses the same layout: consecutive values form a little-endian bit stream, value j
at bit j·b, cut into 32-bit words. For 2/4/8 bits a word holds 32/b whole values; for 3 bits,
32 values fill 3 words and values 10 and 21 straddle a word boundary ("10 | 1 | 10 | 1 | 10").
qweight packs along the input axis (rows of Wᵀ); qzeros packs along the output axis.
"""

from __future__ import annotations

import math
import sys

import torch

FORMATS = ("gptq", "gptq_v2")


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) in the smallest run of values that fills whole int32 words."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit values into int32 words")
    values = 32 // math.gcd(32, bits)
    return values, values * bits // 32


def word_multiple(bits: int) -> int:
    """Lengths packed with this layout must be multiples of this to fill whole int32 words."""
    return _chunk(bits)[0]


def pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [R, C] integer values in [0, 2^bits) along dim 1 into int32 [R, C·bits/32], on the
    values' device: each row's values are one bit stream."""
    n_values, _ = _chunk(bits)
    cols = values.shape[1]
    if cols % n_values:
        raise ValueError(f"{cols} values of {bits} bits do not fill whole int32 words")
    # one read back (on a GPU: one wait); uint8 widened, or 2^8 would compare as 0
    checked = values.to(torch.int16) if values.dtype == torch.uint8 else values
    low, high = torch.stack(torch.aminmax(checked)).tolist() if values.numel() else (0, 0)
    if low < 0 or high >= 2**bits:
        raise ValueError(f"values out of range for {bits} bits")
    if sys.byteorder != "little":  # the int32 views below read bytes little-endian
        raise RuntimeError("packing GPTQ words needs a little-endian host")
    return _pack_bytes(values, bits) if 8 % bits == 0 else _pack_octets(values, bits)


def _pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """2, 4 and 8 bits: whole values to a byte, first value lowest; the four bytes of an int32
    are its bits 0-7, 8-15, ... (uint8 work: 1/8 of an int64 path's memory traffic, 12-15x
    faster on the CPU)."""
    per_byte = 8 // bits
    v = values.to(torch.uint8)
    packed = v[:, 0::per_byte].clone(memory_format=torch.contiguous_format)  # never the caller's codes
    for j in range(1, per_byte):
        packed |= v[:, j::per_byte] << (j * bits)  # < 2^8: nothing shifted out
    return packed.view(torch.int32)


def _pack_octets(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths that do not divide a byte (3 bits): every 8 values fill exactly `bits` bytes of
    the stream, so each octet is packed into one integer and cut into its bytes."""
    rows, cols = values.shape
    v = values.to(_octet_dtype(bits)).reshape(rows, cols // 8, 8)
    octet = v[..., 0].clone()
    for j in range(1, 8):
        octet |= v[..., j] << (j * bits)
    stream = torch.empty(rows, cols // 8, bits, dtype=torch.uint8, device=values.device)
    for byte in range(bits):
        stream[..., byte] = (octet >> (8 * byte)) & 0xFF
    return stream.reshape(rows, -1).view(torch.int32)


def _octet_dtype(bits: int) -> torch.dtype:
    """An integer type that holds 8 values of `bits` bits."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def unpack_last(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_last: int32 [R, count·bits/32] -> int32 [R, count]."""
    _chunk(bits)  # a width we pack
    rows, mask = packed.shape[0], 2**bits - 1
    if packed.shape[1] * 32 != count * bits:
        raise ValueError(f"packed tensor holds {packed.shape[1] * 32 / bits:g} values a row, expected {count}")
    stream = packed.contiguous().view(torch.uint8)  # little-endian, as pack_last wrote it
    if 8 % bits == 0:
        units, per_unit = stream, 8 // bits  # whole values in each byte
    else:  # each `bits` bytes hold 8 values
        groups = stream.reshape(rows, -1, bits).to(_octet_dtype(bits))
        units, per_unit = groups[..., 0].clone(), 8
        for byte in range(1, bits):
            units |= groups[..., byte] << (8 * byte)
    out = torch.empty(rows, units.shape[1], per_unit, dtype=torch.int32, device=packed.device)
    for j in range(per_unit):
        out[..., j] = (units >> (j * bits)) & mask
    return out.reshape(rows, count)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K·bits/32, N] (packed along the input axis)."""
    return pack_last(codes, bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight [K·bits/32, N] -> codes int32 [N, K]."""
    return unpack_last(qweight.t(), bits, in_features)


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """True zero points [G, N] -> qzeros int32 [G, N·bits/32]; format v1 ('gptq') stores zero - 1."""
    _check_format(checkpoint_format)
    stored = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if (stored < 1).any():
            raise ValueError("a zero point of 0 cannot be stored in format 'gptq' (v1); use gptq_v2")
        stored = stored - 1
    return pack_last(stored, bits)


def unpack_qzeros(
    qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str
) -> torch.Tensor:
    """qzeros [G, N·bits/32] -> true zero points int32 [G, N]."""
    _check_format(checkpoint_format)
    zeros = unpack_last(qzeros, bits, out_features)
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 loaders add the one back, without masking
    return zeros
