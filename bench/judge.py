"""An independent judge of GPTQ checkpoints: what a checkpoint loses, whoever wrote it.

The quantized layers are read from the safetensors files with an unpacker written from the
format notes (../shared/gptq-format.md: codes packed LSB first as one bit stream along K,
zeros along N, v1 zeros stored minus one), not with worker.gptq.loader, so our writer and
our reader cannot share a mistake that the judge then misses. Each dequantized weight,
scales[g_idx] * (q - zero), replaces the weight of the same layer in the original fp32 model
(everything else stays the original's, for every tool alike), and the model is compared with
the original on held-out windows: mean KL(p_fp || p_quantized) of the next-token distribution
over all positions, and perplexity.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


def unpack_bits(words: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """int32 words -> codes, unpacked along axis (0: qweight's K, 1: qzeros' N). The words
    along the axis form one LSB-first bit stream: value j holds bits j*b .. j*b+b-1 (for
    3-bit this is the '10 | 1 | 10 | 1 | 10' pattern across three words)."""
    w = words if axis == 1 else words.t()  # [other, words along the axis]
    stream = (w[..., None] >> torch.arange(32, dtype=torch.int32)) & 1  # [other, words, 32]
    stream = stream.reshape(w.shape[0], -1, bits)  # [other, values, bits]
    codes = (stream * (1 << torch.arange(bits, dtype=torch.int32))).sum(-1)
    return codes if axis == 1 else codes.t()


def layer_bits(config: dict, name: str) -> int:
    """A layer's bits: the first `dynamic` rule whose regex matches the start of its name
    (GPTQModel's and vLLM's reading, from the format notes), else the checkpoint's."""
    for key, settings in (config.get("dynamic") or {}).items():
        if re.match(key[2:] if key[:2] in ("+:", "-:") else key, name):
            return int(settings.get("bits", config["bits"]))
    return int(config["bits"])


def dequantized_layers(checkpoint: Path) -> dict[str, torch.Tensor]:
    """{layer name: dequantized weight [K, N] fp32} of every quantized layer in a checkpoint."""
    config = json.loads((checkpoint / "quantize_config.json").read_text())
    fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
    zero_offset = 1 if fmt == "gptq" else 0  # v1 stores zero - 1
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    layers = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        bits = layer_bits(config, name)
        q = unpack_bits(tensors[key], bits, axis=0)  # [K, N]
        zeros = unpack_bits(tensors[f"{name}.qzeros"], bits, axis=1) + zero_offset  # [G, N]
        scales = tensors[f"{name}.scales"].float()  # [G, N]
        g_idx = tensors[f"{name}.g_idx"].long()  # [K]
        layers[name] = scales[g_idx] * (q - zeros[g_idx]).float()
    if not layers:
        raise ValueError(f"no quantized layer in {checkpoint}")
    return layers


def with_weights(model: nn.Module, layers: dict[str, torch.Tensor]) -> nn.Module:
    """The model with each named layer's weight replaced (in place): a Conv1D holds [K, N] as
    it is, an nn.Linear its transpose (decided by type: a square shape would not tell).
    Refuses names or shapes that do not match."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in layers.items():
            # checkpoints of a CausalLM wrapper may name layers with or without its prefix
            module = modules.get(name) or modules.get(name.split(".", 1)[1])
            if module is None:
                raise KeyError(f"{name} is not a layer of the model")
            target = module.weight
            value = weight.t() if isinstance(module, nn.Linear) else weight
            if target.shape != value.shape:
                raise ValueError(f"{name}: checkpoint weight {tuple(weight.shape)} vs {tuple(target.shape)}")
            target.copy_(value)
    return model


@torch.inference_mode()
def log_probs(model: nn.Module, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """[windows, positions, vocab] log-softmax of the model's next-token logits."""
    out = [F.log_softmax(model(input_ids=windows[i : i + batch], use_cache=False).logits.float(), -1)
           for i in range(0, windows.shape[0], batch)]
    return torch.cat(out)


@dataclass(frozen=True)
class Loss:
    kl: float  # mean KL(p_fp || p_q) per predicted token, nats
    ppl: float  # perplexity of the quantized model on the windows


def loss_of(reference: torch.Tensor, quantized: torch.Tensor, windows: torch.Tensor) -> Loss:
    """reference, quantized: log_probs of the original and the quantized model."""
    kl = (reference.exp() * (reference - quantized)).sum(-1).mean()
    nll = -quantized[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    return Loss(kl=float(kl), ppl=math.exp(float(nll)))
