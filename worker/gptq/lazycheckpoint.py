"""A GPTQ checkpoint read one decoder block at a time, to score it in one block's memory.

The model is built on the meta device from the checkpoint's config (experts split per expert,
as the checkpoint stores them); embeddings, final norm and head are read like any streamed
model's (lazyload.LazyModel); a block's tensors are read just before it runs: its quantized
linears become DequantLinear layers (loader.py), its other tensors are assigned as they are.
It offers what streameval.streamed_perplexity needs of a LazyModel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.gptq.arch import get_arch
from worker.gptq.errors import InvalidCheckpoint
from worker.gptq.lazyload import LazyModel, WeightFiles, meta_model


class LazyCheckpoint(LazyModel):
    """LazyModel over a GPTQ checkpoint: load_block builds the block's quantized layers."""

    def __init__(self, path: Path, device: torch.device, *, trust_remote_code: bool = False) -> None:
        """Weights in the dtype a run computes in on device (fp32 on the CPU)."""
        from transformers import AutoConfig

        from worker.gptq.loader import read_quantization_config
        from worker.gptq.modelio import compute_dtype

        self.qconfig = read_quantization_config(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the layers are replaced here, block by block
        model = meta_model(config, trust_remote_code=trust_remote_code)
        super().__init__(model, WeightFiles(path), get_arch(model), compute_dtype(config, device))

    def load_block(self, index: int, block: nn.Module, as_stored: Any = (),
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
        from worker.gptq.loader import replace_quantized_layers
        from worker.gptq.tensornames import in_memory_names

        prefix = self.arch.block_prefix(index) + "."
        if tensors is None:
            tensors = self.files.read([key for key in self.files.where if key.startswith(prefix)])
        tensors = in_memory_names(tensors, self.model.config.model_type)  # either naming
        replace_quantized_layers(self.model, tensors, self.qconfig, dtype=self.dtype)
        rest = {key: t.to(self.dtype) if t.is_floating_point() else t for key, t in tensors.items()}
        _, unexpected = self.model.load_state_dict(rest, strict=False, assign=True)
        if unexpected:
            raise InvalidCheckpoint(f"tensors the model does not have: {sorted(unexpected)[:10]}")
        still_meta = [name for name, p in block.named_parameters() if p.device.type == "meta"]
        if still_meta:
            raise InvalidCheckpoint(f"tensors missing from the checkpoint: {prefix}{still_meta[0]}")


def open_lazy_checkpoint(path: Path, device: torch.device, *,
                         trust_remote_code: bool = False) -> LazyCheckpoint | None:
    """None when a quantized layer lies outside the blocks (a quantized head): such a
    checkpoint is read whole (loader.load_quantized)."""
    lazy = LazyCheckpoint(Path(path), device, trust_remote_code=trust_remote_code)
    prefix = lazy.arch.blocks_path + "."
    outside = [k for k in lazy.files.where if k.endswith(".qweight") and not k.startswith(prefix)]
    if outside:
        return None
    lazy.load_outside_blocks()  # what the capture of block 0's inputs runs
    return lazy
