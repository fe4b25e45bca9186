"""Progress reports from the engine: one event per stage change and per solved module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

STAGES = ("loading", "calibration", "quantizing", "packing", "saving", "evaluating", "done")


@dataclass
class ProgressEvent:
    stage: str  # one of STAGES
    fraction: float  # 0..1 over the whole run
    block: int | None = None  # 1-based index of the block being quantized
    num_blocks: int | None = None
    module: str | None = None  # e.g. "self_attn.q_proj"
    loss: float | None = None  # the module's GPTQ loss
    damp: float | None = None  # damp_percent actually used for the module
    seconds: float = 0.0  # elapsed since the run started
    eta_seconds: float | None = None
    message: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)  # time spent per stage so far

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]
StepCallback = Callable[[int, int], None]  # (steps done, of how many): blocks, batches


class Cancelled(Exception):
    """Raised inside the engine when its should_stop() hook says the run is no longer wanted."""
