"""Bit packing of GPTQ codes and zero points into int32 words (gptq-format.md §3, §4).

Every width uses the same layout: consecutive values form a little-endian bit stream, value j
at bit j·b, cut into 32-bit words. For 2/4/8 bits a word holds 32/b whole values; for 3 bits,
32 values fill 3 words and values 10 and 21 straddle a word boundary ("10 | 1 | 10 | 1 | 10").
qweight packs along the input axis (rows of Wᵀ); qzeros packs along the output axis.
"""

from __future__ import annotations

import math

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


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # two's-complement reinterpretation of the low 32 bits
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [R, C] integer values in [0, 2^bits) along dim 0 into int32 [R·bits/32, C], on
    the values' device."""
    n_values, n_words = _chunk(bits)
    rows, cols = values.shape
    if rows % n_values:
        raise ValueError(f"{rows} rows of {bits}-bit values do not fill whole int32 words")
    v = values.to(torch.int64).reshape(rows // n_values, n_values, cols)
    if not bool(((v >= 0) & (v < 2**bits)).all()):  # one read back (on a GPU: one wait)
        raise ValueError(f"values out of range for {bits} bits")
    words = torch.zeros(rows // n_values, n_words, cols, dtype=torch.int64, device=values.device)
    for j in range(n_values):
        word, shift = divmod(j * bits, 32)
        words[:, word] |= v[:, j] << shift
        if shift + bits > 32:  # straddles into the next word
            words[:, word + 1] |= v[:, j] >> (32 - shift)
    return _to_int32(words.reshape(-1, cols))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [rows·bits/32, C] -> int32 [rows, C]."""
    n_values, n_words = _chunk(bits)
    mask = 2**bits - 1
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(-1, n_words, packed.shape[1])
    out = torch.zeros(words.shape[0], n_values, packed.shape[1], dtype=torch.int64, device=packed.device)
    for j in range(n_values):
        word, shift = divmod(j * bits, 32)
        val = words[:, word] >> shift
        if shift + bits > 32:
            val = val | (words[:, word + 1] << (32 - shift))
        out[:, j] = val & mask
    out = out.reshape(-1, packed.shape[1])
    if out.shape[0] != rows:
        raise ValueError(f"packed tensor holds {out.shape[0]} rows, expected {rows}")
    return out.to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K·bits/32, N] (packed along the input axis)."""
    return pack_rows(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight [K·bits/32, N] -> codes int32 [N, K]."""
    return unpack_rows(qweight, bits, in_features).t().contiguous()


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
    return pack_rows(stored.t(), bits).t().contiguous()


def unpack_qzeros(
    qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str
) -> torch.Tensor:
    """qzeros [G, N·bits/32] -> true zero points int32 [G, N]."""
    _check_format(checkpoint_format)
    zeros = unpack_rows(qzeros.t().contiguous(), bits, out_features).t().contiguous()
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 loaders add the one back, without masking
    return zeros
