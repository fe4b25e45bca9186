"""Rebuild a torch model from a GPTQ checkpoint (ours or any other tool's), for verification.

Every module P with a P.qweight tensor becomes a DequantLinear, which unpacks the codes and
zero points with the format's rules (v1 'gptq' zeros stored minus one, v2 'gptq_v2' true
zeros) and computes W[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n]) on the
CPU. GPT-2's Conv1D layers are replaced the same way: y = x Wᵀ + b is what Conv1D computes
with its [in, out] weight. Everything else is loaded into a model built from config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .config import SUPPORTED_BITS
from .errors import InvalidCheckpoint
from .experts import unfuse_experts
from .lazyload import INDEX_FILE
from .module_rules import matching_rule
from .packing import FORMATS, unpack_qweight, unpack_qzeros
from .tensornames import in_memory_names

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


def dequantize_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str,
) -> torch.Tensor:
    """The float32 [N, K] weight a GPTQ layer's tensors stand for."""
    in_features, out_features = g_idx.numel(), qweight.shape[1]
    codes = unpack_qweight(qweight, bits, in_features)  # [N, K]
    zeros = unpack_qzeros(qzeros, bits, out_features, checkpoint_format)  # [G, N]
    g = g_idx.long()
    # fp16 scale x small integer is exact in fp32, so this equals the solver's weight bit for bit
    return scales.float()[g].t() * (codes - zeros[g].t()).float()


class DequantLinear(nn.Module):
    """A linear layer stored as GPTQ tensors, dequantized on the CPU.

    With cache=True the dequantized weight is kept (fast, full-size memory); otherwise it is
    rebuilt at every forward (slow, only the packed tensors stay in memory).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        bits: int,
        checkpoint_format: str,
        dtype: torch.dtype = torch.float32,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.checkpoint_format = checkpoint_format
        self.in_features = g_idx.numel()
        self.out_features = qweight.shape[1]
        self.compute_dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        cached = self.dequantize().to(dtype) if cache else None
        self.register_buffer("_cached_weight", cached, persistent=False)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [out, in] weight."""
        if self._cached_weight is not None:
            return self._cached_weight
        return self.dequantize().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"format={self.checkpoint_format}"
        )


def read_quantization_config(path: Path) -> dict[str, Any]:
    """The GPTQ settings of a checkpoint dir: config.json's quantization_config, else quantize_config.json."""
    path = Path(path)
    config_file = path / "config.json"
    if config_file.is_file():
        qconfig = json.loads(config_file.read_text()).get("quantization_config")
        if qconfig:
            return qconfig
    for name in QUANT_CONFIG_FILES:
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    raise InvalidCheckpoint(f"{path} has no quantization_config in config.json nor a quantize_config.json")


def is_quantized_dir(path: Path) -> bool:
    try:
        read_quantization_config(path)
    except (InvalidCheckpoint, OSError, ValueError):
        return False
    return True


def checkpoint_format_of(qconfig: dict[str, Any]) -> str:
    """'gptq' (v1) or 'gptq_v2'; a config without either key is v1, as every loader assumes."""
    fmt = qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq"
    if fmt not in FORMATS:
        raise InvalidCheckpoint(f"checkpoint_format {fmt!r} is not supported (expected one of {FORMATS})")
    return fmt


def _check_qconfig(qconfig: dict[str, Any]) -> int:
    method = qconfig.get("quant_method", qconfig.get("method", "gptq"))
    if method != "gptq":
        raise InvalidCheckpoint(f"quant_method {method!r} is not GPTQ")
    bits = qconfig.get("bits")
    if bits not in SUPPORTED_BITS:
        raise InvalidCheckpoint(f"bits={bits!r} is not supported (expected one of {SUPPORTED_BITS})")
    return bits


def module_settings(qconfig: dict[str, Any], name: str, bits: int) -> tuple[int, int | None]:
    """(bits, group_size) of module `name`: the checkpoint's, or its first matching `dynamic`
    rule's (mixed-precision checkpoints, GPTQModel's format)."""
    group_size = qconfig.get("group_size", -1)
    try:
        rule = matching_rule(qconfig.get("dynamic") or {}, name)
    except (re.error, TypeError, AttributeError) as exc:  # another tool's malformed rules
        raise InvalidCheckpoint(f"the checkpoint's dynamic rules cannot be read: {exc}") from exc
    if rule is None or rule[0]:
        return bits, group_size
    overrides = rule[1]
    own = overrides.get("bits", bits)
    if own not in SUPPORTED_BITS:
        raise InvalidCheckpoint(f"{name}: its dynamic rule sets bits={own!r} (expected one of {SUPPORTED_BITS})")
    return own, overrides.get("group_size", group_size)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from its index when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidCheckpoint(f"{path} holds no .safetensors weights")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                tensors[key] = f.get_tensor(key)
    return tensors


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _expected_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of the module being replaced: nn.Linear or GPT-2's Conv1D ([in, out] weight)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf
    return None


def replace_quantized_layers(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    qconfig: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
) -> list[str]:
    """Swap every module with a `.qweight` tensor for a DequantLinear; pops the tensors it uses."""
    base_bits = _check_qconfig(qconfig)
    fmt = checkpoint_format_of(qconfig)
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    if not names:
        raise InvalidCheckpoint("the checkpoint has no .qweight tensor: it is not GPTQ-quantized")
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise InvalidCheckpoint(f"{name}.qweight names no module of the model") from exc
        qweight = tensors.pop(f"{name}.qweight")
        bits, group_size = module_settings(qconfig, name, base_bits)
        expected = _expected_shape(module)
        in_features = expected[0] if expected else qweight.shape[0] * 32 // bits
        g_idx = tensors.pop(f"{name}.g_idx", None)
        if g_idx is None:  # old checkpoints without act-order omit it
            g = in_features if group_size in (-1, None) else group_size
            g_idx = torch.arange(in_features, dtype=torch.int32) // g
        try:
            layer = DequantLinear(
                qweight,
                tensors.pop(f"{name}.qzeros"),
                tensors.pop(f"{name}.scales"),
                g_idx.to(torch.int32),
                tensors.pop(f"{name}.bias", None),
                bits=bits,
                checkpoint_format=fmt,
                dtype=dtype,
                cache=cache,
            )
        except (KeyError, ValueError, IndexError, RuntimeError) as exc:
            raise InvalidCheckpoint(f"{name}: inconsistent GPTQ tensors ({exc})") from exc
        if expected is not None and (layer.in_features, layer.out_features) != expected:
            raise InvalidCheckpoint(
                f"{name}: GPTQ tensors are {layer.in_features}x{layer.out_features}, the model "
                f"expects {expected[0]}x{expected[1]}"
            )
        _set_submodule(model, name, layer)
    return names


def _build_model(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we replace the layers ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    unfuse_experts(model)  # a mixture of experts: one linear per expert, as the checkpoint has
    return model


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: list[str]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise InvalidCheckpoint(f"tensors the model does not have: {sorted(unexpected)[:10]}")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    quantized_prefixes = tuple(f"{name}." for name in quantized)
    missing = [k for k in missing if k not in tied and not k.startswith(quantized_prefixes)]
    if missing:
        raise InvalidCheckpoint(f"tensors missing from the checkpoint: {sorted(missing)[:10]}")


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    trust_remote_code: bool = False,
    cache: bool = True,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a GPTQ checkpoint directory; tokenizer is None if none was saved."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidCheckpoint(f"{path} is not a checkpoint directory")
    qconfig = read_quantization_config(path)
    model = _build_model(path, dtype, trust_remote_code)
    # a copy made for vLLM names Mixtral's experts as its own checkpoints do (tensornames.py)
    tensors = in_memory_names(read_tensors(path), model.config.model_type)
    quantized = replace_quantized_layers(model, tensors, qconfig, dtype=dtype, cache=cache)
    _load_rest(model, tensors, quantized)
    tied_targets = {k.removesuffix(".weight") for k in getattr(model, "all_tied_weights_keys", None) or {}}
    if not tied_targets & set(quantized):  # a quantized lm_head (lm_head: true) is not re-tied
        model.tie_weights()
    _load_generation_config(model, path)
    model.eval().to(device)
    return model, checkpoint_tokenizer(path, trust_remote_code)


def _load_generation_config(model: nn.Module, path: Path) -> None:
    """The checkpoint's generation settings, as from_pretrained reads them: generate() on the
    loaded model then continues a prompt as the original model did."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def checkpoint_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a checkpoint, or None."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
