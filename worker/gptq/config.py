"""What a quantization run is asked to do: the quantization settings and the calibration set."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .module_rules import check_rules, matching_rule

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
TENSOR_NAMES = ("module", "original")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_limit(model_config: Any) -> int | None:
    """The longest input a model's position embeddings admit, when its config says: from a
    transformers config or from the dict of a config.json (the API reads it without torch)."""
    for key in CONTEXT_KEYS:
        value = (model_config.get(key) if isinstance(model_config, dict)
                 else getattr(model_config, key, None))
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class QuantizeConfig:
    """GPTQ settings. Defaults follow the reference GPTQ code and the ecosystem (4-bit, g128, sym)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    # on Cholesky failure the damping is raised by this much and the solve retried
    damp_auto_increment: float = 0.0025
    max_damp_percent: float = 1.0
    true_sequential: bool = True
    # search a clipping ratio per group that minimises the quantization error: on by default,
    # it loses 10-17% less (KL to fp) on the fixtures (docs/engine.md, bench/quality.py)
    mse: bool = True
    # group-aware reordering (gptq.solve_order): solve whole groups by importance, g_idx stays
    # trivial. Only with groups and without desc_act (whose full reordering replaces it): set
    # False otherwise, so the config, the report and the checkpoint's meta say what was used
    act_group_aware: bool = True
    block_size: int = 128  # columns per lazy batch update
    # the checkpoint's tensor names: "module", as transformers 5 names the modules in memory
    # (what GPTQModel writes and reads), or "original", as the model's own checkpoints name
    # them (Mixtral's experts: what vLLM reads); the same for most families (tensornames.py)
    tensor_names: str = "module"
    # per-module settings, GPTQModel's `dynamic` (module_rules.py): regex -> overrides, first
    # match wins; "-:regex" leaves the module unquantized
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}"
            )
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.tensor_names not in TENSOR_NAMES:
            raise ValueError(f"tensor_names must be one of {', '.join(TENSOR_NAMES)}, got {self.tensor_names!r}")
        if self.desc_act or self.group_size == -1:
            object.__setattr__(self, "act_group_aware", False)  # frozen: set once, here
        if self.dynamic:
            if self.tensor_names != "module":
                # loaders match the rules against the checkpoint's names: they must be the modules'
                raise ValueError("dynamic rules need tensor_names 'module' (they match module names)")
            check_rules(self.dynamic, self)

    def for_module(self, name: str) -> QuantizeConfig | None:
        """The settings module `name` is quantized with (its first matching `dynamic` rule
        applied), or None when a rule leaves it unquantized."""
        if not self.dynamic:
            return self
        rule = matching_rule(self.dynamic, name)
        if rule is None:
            return self
        skip, overrides = rule
        return None if skip else replace(self, dynamic={}, **overrides)

    def quantized_with(self, name: str) -> QuantizeConfig:
        """The settings of module `name`, which was quantized (a rule leaving it unquantized
        means the caller mixed up its modules)."""
        own = self.for_module(name)
        if own is None:
            raise ValueError(f"{name} is quantized although a dynamic rule leaves it unquantized")
        return own

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def checkpoint_format(self) -> str:
        """v1 ('gptq', zeros stored minus one) for sym; v2 for asym, where v1 would underflow."""
        return "gptq" if self.sym else "gptq_v2"

    def to_dict(self) -> dict:
        return asdict(self)


# the text shipped with the package (calibration.builtin_rows): its calibration part, and the
# part held out for evaluation
BUILTIN = "builtin"
BUILTIN_HELDOUT = "builtin-heldout"


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from and how it is cut into windows.

    source: "builtin", a local file (.txt, .jsonl, .parquet), or a hub dataset "NAME[:CONFIG[:SPLIT]]".
    """

    source: str = BUILTIN
    text_field: str = "text"
    num_samples: int = 128
    seq_length: int = 512
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.seq_length < 8:
            raise ValueError(f"seq_length must be >= 8, got {self.seq_length}")
