"""Where the decoder blocks and their linear layers are, for each supported model family.

An ArchSpec names the ModuleList of decoder blocks and, inside one block, the linear layers in
true-sequential order: groups of modules that see the same input are solved together (attention
in-projections, then the out-projection, then the MLP in-projections, then the MLP
out-projection), so each later group is calibrated on the outputs of the already-quantized
earlier ones. GPT-2 stores its linears as transformers' Conv1D with the weight as [in, out];
the helpers here hide that and always speak [out, in] like nn.Linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from worker.gptq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantizeConfig
from worker.gptq.errors import LayerShapeError, UnmatchedRule, UnsupportedArchitecture
from worker.gptq.experts import ExpertLinears, unfuse_experts
from worker.gptq.module_rules import unmatched_rules
from worker.gptq.packing import word_multiple

# What one chunk of experts may hold while it is calibrated and solved: their Hessians (and
# the gate/up solvers' own XᵀX until the first batch shows they share one) and about three
# copies of the weights the stacked solve works on. 1 GiB: 15 experts' gate/up and 48 experts'
# down_proj per pass for Qwen3-30B-A3B (hidden 2048, experts 768 wide).
EXPERT_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class MoeLayout:
    """Where a mixture-of-experts block keeps its routed experts (split per expert by
    experts.unfuse_experts) and how its config counts them."""

    experts: str  # the experts module inside a block, e.g. "mlp.experts"
    count_keys: tuple[str, ...]  # config attributes giving the number of routed experts
    intermediate_keys: tuple[str, ...]  # ... and each expert's intermediate width
    # (in memory, in the files) name parts, where a family's checkpoints name the split
    # experts otherwise than transformers 5 does in memory (lazyload reads the files by them)
    file_names: tuple[tuple[str, str], ...] = ()
    # the family's model types whose own checkpoints use file_names (the others' use the
    # in-memory names): tensornames.py writes a GPTQ checkpoint's copy by them
    named_in_files: tuple[str, ...] = ()

    def as_in_files(self, name: str) -> str:
        for in_memory, in_files in self.file_names:
            name = name.replace(in_memory, in_files)
        return name

    def as_in_memory(self, name: str) -> str:
        for in_memory, in_files in reversed(self.file_names):
            name = name.replace(in_files, in_memory)
        return name

    def sizes(self, config: Any) -> tuple[int, int, int]:
        """(experts, hidden, intermediate) from a model config."""
        count = _first_attr(config, self.count_keys)
        inner = _first_attr(config, self.intermediate_keys)
        return int(count), int(_first_attr(config, ("hidden_size",))), int(inner)

    def groups(self, config: Any, chunk_bytes: int) -> tuple[tuple[str, ...], ...]:
        """The experts' solve groups: gate/up of a chunk of experts (one shared input), then
        down_proj of a chunk, chunks sized to fit chunk_bytes."""
        count, hidden, inner = self.sizes(config)
        gate_up = 2 * hidden * hidden * 4 + 3 * 2 * inner * hidden * 4
        down = inner * inner * 4 + 3 * hidden * inner * 4
        groups = []
        for per_chunk, projections in ((gate_up, ("gate_proj", "up_proj")), (down, ("down_proj",))):
            size = max(1, chunk_bytes // per_chunk)
            for first in range(0, count, size):
                groups.append(tuple(f"{self.experts}.{e}.{p}"
                                    for e in range(first, min(count, first + size)) for p in projections))
        return tuple(groups)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks_path: str  # attribute path of the ModuleList of decoder blocks, e.g. "model.layers"
    sequential: tuple[tuple[str, ...], ...]  # module names relative to a block, in solve order
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    # mixture of experts: the routed experts' groups follow `sequential` once for_config has
    # counted them (a spec from a bare model type lists only the dense part)
    moe: MoeLayout | None = None

    def for_config(self, config: Any, chunk_bytes: int = EXPERT_CHUNK_BYTES) -> ArchSpec:
        """The spec of one model: a mixture of experts gets its experts' solve groups."""
        if self.moe is None:
            return self
        sparse_step = getattr(config, "decoder_sparse_step", 1)
        dense_layers = list(getattr(config, "mlp_only_layers", None) or [])
        if sparse_step != 1 or dense_layers:
            raise UnsupportedArchitecture(
                f"{self.family}: blocks without experts (decoder_sparse_step={sparse_step}, "
                f"mlp_only_layers={dense_layers}) are not supported; every block must be sparse"
            )
        dense = tuple(g for g in self.sequential if not self.is_expert(g[0]))  # (re)chunked anew
        return replace(self, sequential=dense + self.moe.groups(config, chunk_bytes))

    def is_expert(self, name: str) -> bool:
        return self.moe is not None and name.startswith(self.moe.experts + ".")

    @property
    def module_names(self) -> tuple[str, ...]:
        """Every quantized module of a block, relative to the block, in solve order."""
        return tuple(name for group in self.sequential for name in group)

    def groups(self, true_sequential: bool) -> tuple[tuple[str, ...], ...]:
        """The solve groups: the sequential ones, or all modules at once (true_sequential off;
        routed experts still come in their chunks, which bound the memory)."""
        if true_sequential:
            return self.sequential
        dense = tuple(n for n in self.module_names if not self.is_expert(n))
        return (dense, *(g for g in self.sequential if self.is_expert(g[0])))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = _get_attr(model, self.blocks_path)
        if not isinstance(blocks, nn.ModuleList):
            raise UnsupportedArchitecture(
                f"{self.family}: expected the decoder blocks at {self.blocks_path}, "
                f"found {type(blocks).__name__}"
            )
        if self.moe is not None:
            unfuse_experts(model)  # fused 3-D experts -> one linear per expert (once)
            self._check_experts(blocks)
        return blocks

    def _check_experts(self, blocks: nn.ModuleList) -> None:
        """Every block's experts are ours: else their Hessians would silently be of routed
        tokens only (e.g. another library replaced transformers' MoE classes in this process)."""
        assert self.moe is not None
        for index, block in enumerate(blocks):
            experts = _get_attr(block, self.moe.experts)
            if not isinstance(experts, ExpertLinears):
                raise UnsupportedArchitecture(
                    f"{self.family}: {self.block_prefix(index)}.{self.moe.experts} is a "
                    f"{type(experts).__name__}, not transformers' fused experts gptqd splits "
                    "(was transformers patched by another library in this process?)"
                )

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def block_linears(self, block: nn.Module, index: int = 0) -> dict[str, nn.Module]:
        """The block's quantizable modules by relative name; a missing one is an error."""
        found: dict[str, nn.Module] = {}
        for name in self.module_names:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                module = None
            if module is None or not is_linear(module):
                raise UnsupportedArchitecture(
                    f"{self.family}: block {self.block_prefix(index)} has no linear layer "
                    f"'{name}'; this model does not have the {self.family} layout"
                )
            found[name] = module
        return found


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHS: tuple[ArchSpec, ...] = (
    # the Llama layout under other norms, rotary variants, soft-capping, parallel blocks...
    ArchSpec(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "stablelm", "granite",
         "olmo2", "cohere"),
        "model.layers",
        _LLAMA_SEQUENTIAL,
    ),
    # fused [q|k|v] and [gate|up] linears: one layer each, as the checkpoint stores them
    ArchSpec(
        "phi3",
        ("phi3",),
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    ArchSpec(
        "phi",
        ("phi",),
        "model.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.dense",),
            ("mlp.fc1",),
            ("mlp.fc2",),
        ),
    ),
    ArchSpec(
        "mixtral",
        ("mixtral", "qwen3_moe"),
        "model.layers",
        _LLAMA_SEQUENTIAL[:2],
        moe=MoeLayout("mlp.experts", ("num_local_experts", "num_experts"),
                      ("moe_intermediate_size", "intermediate_size"),
                      # Mixtral's files: block_sparse_moe.gate, block_sparse_moe.experts.E.w1/w3/w2
                      file_names=(("mlp.experts.", "block_sparse_moe.experts."),
                                  ("mlp.gate.", "block_sparse_moe.gate."), (".gate_proj.", ".w1."),
                                  (".up_proj.", ".w3."), (".down_proj.", ".w2.")),
                      named_in_files=("mixtral",)),
    ),
    # a shared expert (a plain MLP, gated by a 1-wide linear left unquantized) beside the routed
    ArchSpec(
        "qwen2_moe",
        ("qwen2_moe",),
        "model.layers",
        (*_LLAMA_SEQUENTIAL[:2],
         ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",)),
        moe=MoeLayout("mlp.experts", ("num_experts",), ("moe_intermediate_size",)),
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        conv1d=True,
    ),
    ArchSpec(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    ArchSpec(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        (
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for arch in ARCHS for t in arch.model_types)


def model_type_of(config_or_model: Any) -> str | None:
    """model_type from a model, a PretrainedConfig, a config dict or a plain string."""
    if isinstance(config_or_model, str):
        return config_or_model
    if isinstance(config_or_model, Mapping):
        return config_or_model.get("model_type")
    config = getattr(config_or_model, "config", config_or_model)
    return getattr(config, "model_type", None)


def get_arch(config_or_model: Any) -> ArchSpec:
    """The family's spec; for a model or a config, the spec of that model (its experts)."""
    model_type = model_type_of(config_or_model)
    for arch in ARCHS:
        if model_type in arch.model_types:
            if isinstance(config_or_model, str | Mapping):  # a type check: no expert count
                return arch
            return arch.for_config(getattr(config_or_model, "config", config_or_model))
    raise UnsupportedArchitecture(
        f"model type {model_type!r} is not supported; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _first_attr(config: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    raise UnsupportedArchitecture(f"the model config has none of {', '.join(keys)}")


# --- linear layers in [out, in] orientation ---------------------------------------------------


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features N, in_features K) of an nn.Linear or a Conv1D."""
    rows, cols = module.weight.shape
    return (cols, rows) if is_conv1d(module) else (rows, cols)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a float32 [out, in] tensor (a copy; Conv1D's [in, out] is transposed)."""
    weight = module.weight.detach()
    if is_conv1d(module):
        weight = weight.t()
    return weight.to(torch.float32, copy=True).contiguous()


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], in its own dtype, without a copy (the solver makes its own)."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] weight back in the module's own orientation, dtype and device."""
    if is_conv1d(module):
        weight = weight.t()
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not fit a module of shape "
            f"{tuple(module.weight.shape)}"
        )
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))


# --- shape checks before any work -------------------------------------------------------------


def shape_problems(out_features: int, in_features: int, config: QuantizeConfig) -> list[str]:
    """Why a layer of this shape cannot be quantized and packed; empty when it can."""
    problems = []
    group = config.group_size
    if group != -1 and in_features % group:
        problems.append(f"in_features {in_features} is not divisible by group_size {group}")
    multiple = word_multiple(config.bits)  # the packer's own rule (3-bit: 32 values in 3 words)
    if in_features % multiple:
        problems.append(
            f"in_features {in_features} is not a multiple of {multiple} "
            f"(qweight packs {config.bits}-bit codes into int32 words along the input)"
        )
    if out_features % multiple:
        problems.append(
            f"out_features {out_features} is not a multiple of {multiple} "
            f"(qzeros packs {config.bits}-bit zeros into int32 words along the output)"
        )
    return problems


def validate_layers(model: nn.Module, arch: ArchSpec, config: QuantizeConfig) -> list[str]:
    """Check every quantizable layer before any work; returns their full names in order.

    Works on a weightless (meta device) model too. Raises LayerShapeError naming each layer
    whose sizes do not fit the group size or the int32 packing, and UnsupportedArchitecture
    if a block lacks a layer the family has.
    """
    names: list[str] = []
    refused: list[str] = []
    shapes: set[tuple[int, int]] = set()
    for index, block in enumerate(arch.blocks(model)):
        for rel, module in arch.block_linears(block, index).items():
            full = f"{arch.block_prefix(index)}.{rel}"
            names.append(full)
            own = config.for_module(full)
            if own is None:  # left unquantized by a rule
                continue
            out_features, in_features = linear_shape(module)
            if own is config:
                shapes.add((out_features, in_features))
            problems = shape_problems(out_features, in_features, own)
            if problems:
                where = "" if own is config else f" (bits={own.bits}, group_size={own.group_size} by its rule)"
                refused.append(f"{full} [out {out_features}, in {in_features}]{where}: " + "; ".join(problems))
    unmatched = unmatched_rules(config.dynamic, names)
    if unmatched:
        raise UnmatchedRule(
            f"dynamic rule(s) {', '.join(map(repr, unmatched))} decide none of the model's "
            f"{len(names)} quantizable layers (refused before any work); their names look like "
            f"{names[0]!r}, {names[-1]!r}"
        )
    if refused:
        shown = refused[:8]
        more = f"\n  ... and {len(refused) - len(shown)} more" if len(refused) > len(shown) else ""
        raise LayerShapeError(
            f"{len(refused)} of {len(names)} layers cannot be quantized with bits={config.bits}, "
            f"group_size={config.group_size} (refused before any work):\n  "
            + "\n  ".join(shown)
            + more
            + "\n" + _what_fits(shapes, config)
        )
    return names


def _what_fits(shapes: set[tuple[int, int]], config: QuantizeConfig) -> str:
    """The group sizes (and, failing those, bit widths) with which every layer of the model
    could be quantized: the fix a person can make."""
    groups = [g for g in sorted(SUPPORTED_GROUP_SIZES, key=lambda g: g == -1)  # -1 last
              if not any(shape_problems(o, i, replace(config, group_size=g)) for o, i in shapes)]
    if groups:
        return (f"group sizes that fit every layer at {config.bits} bits: "
                + ", ".join("-1 (one group per row)" if g == -1 else str(g) for g in groups))
    bits = [b for b in SUPPORTED_BITS if b != config.bits and not any(
        shape_problems(o, i, replace(config, bits=b, group_size=-1)) for o, i in shapes)]
    return (f"no group size fits every layer at {config.bits} bits (the int32 packing); "
            + (f"bits that do, with group_size -1: {', '.join(map(str, bits))}" if bits
               else "this model's layer widths cannot be packed at any supported width"))


def _get_attr(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedArchitecture(
                f"{type(root).__name__} has no '{path}' (missing '{part}'); "
                "the model does not have the layout its model_type promises"
            )
        obj = getattr(obj, part)
    return obj
