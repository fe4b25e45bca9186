"""The streaming safetensors writer writes exactly what safetensors' own save_file writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.gptq.stwriter import save_streamed


def test_bytes_equal_save_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.down_proj.qweight": torch.randint(-2**31, 2**31 - 1, (16, 24), dtype=torch.int32, generator=g),
        "model.layers.0.mlp.down_proj.scales": torch.randn(2, 24, generator=g).half(),
        "model.embed_tokens.weight": torch.randn(7, 5, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(5, generator=g),
        "a.codes": torch.randint(0, 255, (3, 3), dtype=torch.uint8, generator=g),
        "b.big": torch.randn(3, generator=g).double(),
        "c.scalar": torch.tensor(3, dtype=torch.int64),
        "d.empty": torch.zeros(0, 4),
        "e.flags": torch.tensor([True, False]),
        "f.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors",
              metadata={"format": "pt"})
    sizes = save_streamed(iter(tensors.items()), tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sizes == {k: v.numel() * v.element_size() for k, v in tensors.items()}
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "ref.safetensors"]


def test_a_failing_producer_leaves_no_scratch_file(tmp_path: Path) -> None:
    def produce():
        yield "x", torch.ones(2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_streamed(produce(), tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
