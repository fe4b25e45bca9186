"""Mixture-of-experts blocks: every expert's projections as linear layers of their own.

transformers 5 keeps a block's routed experts as two fused 3-D parameters (gate_up_proj
[E, 2I, H], gate rows first; down_proj [E, H, I]), while GPTQ quantizes linear layers and
checkpoints store one linear per expert (model.layers.N.mlp.experts.E.gate_proj...).
unfuse_experts replaces each fused experts module with an ExpertLinears: a ModuleList of
ExpertMLP(gate_proj, up_proj, down_proj) computing exactly what the fused module computes.
The linears' weights are views of the fused tensors: no copy is made.

Calibration: the router sends each expert a few tokens, some experts none, so a Hessian of
the routed tokens alone is poor or missing. While `calibrate_all` is on, every expert runs on
every token (its linears' Hessians see the whole calibration set) and the output still sums
only the routed experts, with their routing weights: the block computes what the model
computes. In an expert's Hessians a token the router sent it weighs 1 and any other token
UNROUTED_WEIGHT (its input rows scaled by the square root, the outputs scaled back): an expert
fed well is fitted to the tokens it really sees, a starved one still has the whole set's
statistics. On the trained Mixtral (3 calibration sets x 2/3/4 bits) weight 0.03 lost 4-8%
less KL than weighing every token alike, 0.1 nearly as little (docs/engine.md).
`routed` counts the tokens the router sent to each expert since the last reset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from worker.gptq.errors import UnsupportedArchitecture


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """row_scale ([T, 1], > 0): each linear is called with its input rows times it and its
        output divided by it again (the linears have no bias): the result is the same, and the
        Hessians the linears' hooks gather weigh each token by row_scale²."""
        if row_scale is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        scaled = x * row_scale
        inner = self.act_fn(self.gate_proj(scaled) / row_scale) * (self.up_proj(scaled) / row_scale)
        return self.down_proj(inner * row_scale) / row_scale


class ExpertLinears(nn.ModuleList):
    """A fused experts module as one ExpertMLP per expert; called like the fused one
    (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    # the weight in an expert's Hessians of a token the router did not send it (one it sent
    # counts 1): see the module docstring
    UNROUTED_WEIGHT = 0.03

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.calibrate_all = False
        self.register_buffer("routed", torch.zeros(len(experts), dtype=torch.int64), persistent=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        # an index of E (num_experts) marks a dropped slot in some routers: never counted
        hits = torch.nn.functional.one_hot(top_k_index, len(self) + 1).sum((0, 1))[: len(self)]
        self.routed += hits.to(self.routed.device)
        for index, expert in enumerate(self):
            if not self.calibrate_all and not hits[index]:
                continue
            tokens, slot = torch.where(top_k_index == index)
            if self.calibrate_all:  # every token feeds the Hessians
                scale = torch.full((hidden_states.shape[0], 1), self.UNROUTED_WEIGHT ** 0.5,
                                   dtype=hidden_states.dtype, device=hidden_states.device)
                scale[tokens] = 1.0  # exactly: the routed rows compute what they always do
                states = expert(hidden_states, scale)[tokens]
            else:
                states = expert(hidden_states[tokens])
            weights = top_k_weights[tokens, slot, None]
            output.index_add_(0, tokens, (states * weights).to(output.dtype))
        return output


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose weight is the given [out, in] tensor (a view: shares its storage)."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    return isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3


def split_experts(fused: nn.Module, name: str = "experts") -> ExpertLinears:
    """The per-expert linears of a fused experts module (views of its parameters)."""
    gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
    count, double, hidden = gate_up.shape
    inner = double // 2
    if (getattr(fused, "has_bias", False) or getattr(fused, "is_transposed", False)
            or getattr(fused, "gate_up_proj_bias", None) is not None
            or tuple(down.shape) != (count, hidden, inner) or double != 2 * inner):
        raise UnsupportedArchitecture(
            f"{name}: fused experts of shapes {tuple(gate_up.shape)}/{tuple(down.shape)} are not "
            "the [E, 2I, H] gate|up and [E, H, I] down layout without biases gptqd splits"
        )
    act_fn = fused.act_fn
    return ExpertLinears([
        ExpertMLP(_linear(gate_up[e, :inner]), _linear(gate_up[e, inner:]), _linear(down[e]), act_fn)
        for e in range(count)
    ])


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of the model by its ExpertLinears (idempotent);
    returns how many were replaced."""
    fused = [(name, module) for name, module in model.named_modules() if _is_fused_experts(module)]
    for name, module in fused:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, split_experts(module, name))
    return len(fused)


def expert_modules(block: nn.Module) -> dict[str, ExpertLinears]:
    """The block's ExpertLinears by their name inside the block (e.g. "mlp.experts")."""
    return {name: module for name, module in block.named_modules() if isinstance(module, ExpertLinears)}


@contextlib.contextmanager
def calibrating(block: nn.Module) -> Iterator[dict[str, ExpertLinears]]:
    """Every expert of the block runs on every token (for the Hessians) until the exit."""
    experts = expert_modules(block)
    for module in experts.values():
        module.calibrate_all = True
    try:
        yield experts
    finally:
        for module in experts.values():
            module.calibrate_all = False


def routed_tokens(experts: dict[str, ExpertLinears], names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """For each expert linear among names ("mlp.experts.3.down_proj"), the tokens routed to
    its expert since the counts were last reset."""
    counts = {}
    for name in names:
        path, _, rest = name.rpartition(".")  # "mlp.experts.3", "down_proj"
        owner, _, index = path.rpartition(".")
        if owner in experts and index.isdigit() and rest:
            counts[name] = int(experts[owner].routed[int(index)])
    return counts


def reset_counts(experts: dict[str, ExpertLinears]) -> None:
    for module in experts.values():
        module.routed.zero_()
