"""Packing round trip, checked by an unpacker written from gptq-format.md, not by our own inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.gptq.config import QuantizeConfig
from worker.gptq.gptq import GPTQ
from worker.gptq.packing import (
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)


def _words(packed: torch.Tensor) -> np.ndarray:
    return packed.numpy().astype(np.int64) & 0xFFFFFFFF


def reference_unpack_column(words: list[int], bits: int) -> list[int]:
    """Decode one column of packed words exactly as the format notes spell it out."""
    mask = (1 << bits) - 1
    out: list[int] = []
    if bits in (2, 4, 8):
        for w in words:  # element j of the run sits at bit offset j·b, first row lowest
            out.extend((w >> (j * bits)) & mask for j in range(32 // bits))
        return out
    assert bits == 3
    for k in range(0, len(words), 3):
        w0, w1, w2 = words[k : k + 3]
        vals = [(w0 >> (3 * j)) & 7 for j in range(10)]  # values 0-9 at 0,3,...,27
        vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))  # value 10: bits 30-31 + bit 0
        vals.extend((w1 >> (1 + 3 * j)) & 7 for j in range(10))  # 11-20 at 1,4,...,28
        vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))  # value 21: bit 31 + bits 0-1
        vals.extend((w2 >> (2 + 3 * j)) & 7 for j in range(10))  # 22-31 at 2,5,...,29
        out.extend(vals)
    return out


def reference_unpack_qweight(qweight: torch.Tensor, bits: int) -> np.ndarray:
    w = _words(qweight)
    cols = [reference_unpack_column(list(map(int, w[:, n])), bits) for n in range(w.shape[1])]
    return np.array(cols, dtype=np.int64)  # [N, K]


def reference_unpack_qzeros(qzeros: torch.Tensor, bits: int, fmt: str) -> np.ndarray:
    w = _words(qzeros)
    rows = [reference_unpack_column(list(map(int, w[g, :])), bits) for g in range(w.shape[0])]
    z = np.array(rows, dtype=np.int64)  # [G, N]
    return z + 1 if fmt == "gptq" else z  # v1 stores zero - 1


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_qweight_matches_reference_layout(bits: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 96), generator=gen).to(dtype)  # [N, K]
    codes[0, :] = 2**bits - 1  # the top code (255 at 8 bits: no uint8 wrap in the range check)
    for given in (codes, codes.t().contiguous().t()):  # contiguous or not
        packed = pack_qweight(given, bits)
        assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 7)
        assert np.array_equal(reference_unpack_qweight(packed, bits), codes.long().numpy())
        assert torch.equal(unpack_qweight(packed, bits, 96), codes.int())


def test_packing_leaves_the_codes_alone_and_takes_any_offset() -> None:
    """8-bit codes already in uint8 are one byte a value: the words must still be a copy, and
    a slice starting mid-word must pack."""
    codes = torch.randint(0, 256, (5, 65), dtype=torch.uint8)[:, 1:]  # storage offset 1
    before = codes.clone()
    packed = pack_qweight(codes, 8)
    packed.add_(1)
    assert torch.equal(codes, before)
    assert torch.equal(unpack_qweight(packed.sub_(1), 8, 64), codes.int())


def test_sym_4bit_v1_zeros_are_sevens() -> None:
    zeros = torch.full((3, 64), 8)
    packed = pack_qzeros(zeros, 4, "gptq")
    assert set((_words(packed)).ravel().tolist()) == {0x77777777}
    assert set(_words(pack_qzeros(zeros, 4, "gptq_v2")).ravel().tolist()) == {0x88888888}


def test_v1_refuses_zero_point_zero() -> None:
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_qzeros(torch.zeros(1, 32, dtype=torch.int32), 4, "gptq")


def test_rejects_unpackable_sizes() -> None:
    with pytest.raises(ValueError, match="whole int32 words"):
        pack_qweight(torch.zeros(4, 20, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_qweight(torch.full((1, 8), 16), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_qweight(torch.full((1, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_qweight(torch.full((1, 8), 2**16 + 3), 4)  # never cut to its low bits
    with pytest.raises(ValueError, match="out of range"):
        pack_qweight(torch.full((1, 8), -1), 4)
    with pytest.raises(ValueError, match="expected 64"):
        unpack_qweight(torch.zeros(4, 2, dtype=torch.int32), 4, 64)


CASES = [
    (bits, group, sym, desc_act)
    for bits in (2, 3, 4, 8)
    for group in (-1, 32, 128)
    for sym in (True, False)
    for desc_act in (False, True)
]


@pytest.mark.parametrize(("bits", "group", "sym", "desc_act"), CASES)
def test_solver_output_round_trips_through_checkpoint_tensors(
    bits: int, group: int, sym: bool, desc_act: bool
) -> None:
    torch.manual_seed(bits * 7 + group)
    K, N = 256, 64
    weight = torch.randn(N, K)
    x = torch.randn(512, K) * torch.linspace(0.1, 2.0, K)
    config = QuantizeConfig(bits=bits, group_size=group, sym=sym, desc_act=desc_act)
    solver = GPTQ(weight)
    solver.add_batch(x)
    res = solver.solve(config)
    fmt = config.checkpoint_format

    qweight = pack_qweight(res.codes, bits)
    qzeros = pack_qzeros(res.zeros, bits, fmt)
    scales = res.scales.to(torch.float16)
    G = 1 if group == -1 else K // group
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (G, N * bits // 32)

    codes = reference_unpack_qweight(qweight, bits)
    zeros = reference_unpack_qzeros(qzeros, bits, fmt)
    assert np.array_equal(codes, res.codes.numpy())
    assert np.array_equal(zeros, res.zeros.numpy())
    assert torch.equal(scales.float(), res.scales)  # scales survive fp16 storage exactly
    assert torch.equal(unpack_qweight(qweight, bits, K), res.codes)
    assert torch.equal(unpack_qzeros(qzeros, bits, N, fmt), res.zeros)

    # the weight a loader rebuilds from these tensors is the solver's weight, bit for bit
    g_idx = res.g_idx.long()
    rebuilt = scales.float()[g_idx].t() * (
        torch.from_numpy(codes).float() - torch.from_numpy(zeros).float()[g_idx].t()
    )
    assert torch.equal(rebuilt, res.weight)
    if not desc_act and group != -1:
        assert torch.equal(res.g_idx, (torch.arange(K) // group).int())
