"""The tensor-at-a-time safetensors writer writes exactly what safetensors' own save_file writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.gptq.stwriter import TensorSpec, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.qweight": torch.randint(-2**31, 2**31 - 1, (16, 24), dtype=torch.int32, generator=g),
        "model.layers.0.mlp.down_proj.scales": torch.randn(2, 24, generator=g).half(),
        "model.embed_tokens.weight": torch.randn(7, 5, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(5, generator=g),
        "a.codes": torch.randint(0, 255, (3, 3), dtype=torch.uint8, generator=g),
        "a.signed": torch.randint(-100, 100, (3,), dtype=torch.int8, generator=g),
        "b.big": torch.randn(3, generator=g).double(),
        "b.short": torch.randint(-100, 100, (2, 2), dtype=torch.int16, generator=g),
        "c.scalar": torch.tensor(3, dtype=torch.int64),
        "d.empty": torch.zeros(0, 4),
        "e.flags": torch.tensor([True, False]),
        "f.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "g.fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "h.ünïcode": torch.ones(2),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}


@pytest.mark.parametrize("order", ["given", "reversed"])
def test_bytes_equal_save_file(tmp_path: Path, order: str) -> None:
    tensors = _tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors",
              metadata={"format": "pt"})
    items = list(tensors.items())
    if order == "reversed":  # tensors may come in any order: each goes to its own offset
        items.reverse()
    write_safetensors(tmp_path / "ours.safetensors", _specs(tensors), iter(items), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k].float(), v.float()) for k, v in tensors.items())


def test_without_metadata_and_empty(tmp_path: Path) -> None:
    tensors = {"x": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    save_file(tensors, tmp_path / "ref.safetensors")
    write_safetensors(tmp_path / "ours.safetensors", _specs(tensors), tensors.items())
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"x": torch.ones(2, 3)}, r"no tensor was given for \['y'\]"),
        ({"x": torch.ones(2, 3), "y": torch.ones(4, dtype=torch.int32), "z": torch.ones(1)}, "z is not in the file's header"),
        ({"x": torch.ones(3, 2), "y": torch.ones(4, dtype=torch.int32)}, r"x was made as torch.float32 \(3, 2\), announced as torch.float32 \(2, 3\)"),
        ({"x": torch.ones(2, 3).half(), "y": torch.ones(4, dtype=torch.int32)}, "x was made as torch.float16"),
    ],
)
def test_what_was_announced_is_what_is_written(tmp_path: Path, given: dict, error: str) -> None:
    specs = {"x": TensorSpec(torch.float32, (2, 3)), "y": TensorSpec(torch.int32, (4,))}
    with pytest.raises(ValueError, match=error):
        write_safetensors(tmp_path / "out.safetensors", specs, given.items())
    assert list(tmp_path.iterdir()) == []  # no half-written file


def test_a_tensor_given_twice_is_refused(tmp_path: Path) -> None:
    specs = {"x": TensorSpec(torch.float32, (2,))}
    with pytest.raises(ValueError, match="x given twice"):
        write_safetensors(tmp_path / "out.safetensors", specs, [("x", torch.ones(2)), ("x", torch.ones(2))])
    assert list(tmp_path.iterdir()) == []


def test_a_failing_producer_leaves_no_file(tmp_path: Path) -> None:
    def produce():
        yield "x", torch.ones(2)
        raise RuntimeError("disk on fire")

    specs = {"x": TensorSpec(torch.float32, (2,)), "y": TensorSpec(torch.float32, (2,))}
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(tmp_path / "out.safetensors", specs, produce())
    assert list(tmp_path.iterdir()) == []
