"""Block-by-block GPTQ over a whole causal LM (the reference GPTQ procedure).

1. Capture: one forward pass of the calibration batches up to the decoder blocks, with every
   block's forward swapped for a recorder, gives the hidden states entering block 0 and the
   exact extra arguments each block is called with (attention mask, position ids, rotary
   position embeddings...; these can differ per block, e.g. sliding-window layers).
2. For each block, on the compute device: for each true-sequential group, hooks on the group's
   linears feed their inputs to a GPTQ solver while the block runs over all calibration
   batches; each linear is solved and its dequantized weight written back, so the next group
   sees the quantized outputs. Then the block runs once more: its outputs, computed with the
   quantized weights, are the next block's inputs.
Only the current block (and, during capture, what lies before the blocks) is on the device.
Embeddings, final norm and lm_head are never quantized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import transformers
from torch import nn

from worker.gptq.arch import ArchSpec, get_arch, linear_shape, set_weight, weight_view
from worker.gptq.config import QuantizeConfig
from worker.gptq.experts import ExpertLinears, calibrating, reset_counts, routed_tokens
from worker.gptq.gptq import GPTQ, LayerQuantResult, solve_together
from worker.gptq.memory import trim
from worker.gptq.progress import Cancelled, ProgressCallback, ProgressEvent
from worker.gptq.replay import FinishedChildren

# transformers 5 decoder layers return the hidden states; 4.x returns a tuple
_LAYERS_RETURN_TUPLES = int(transformers.__version__.split(".")[0]) < 5
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class ModuleReport:
    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    block: int  # 1-based block number
    module: str  # name inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    loss: float
    damp_percent: float
    nsamples: int  # calibration tokens in its Hessian (every token, for a routed expert too)
    seconds: float
    # a routed expert's linear: the calibration tokens the router sent to its expert (in the
    # pass that calibrated it); None for every other layer
    routed_tokens: int | None = None
    # what it was quantized with: the run's settings, or its per-layer rule's
    bits: int | None = None
    group_size: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PipelineResult:
    layers: dict[str, LayerQuantResult]
    modules: list[ModuleReport]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    num_blocks: int = 0


@dataclass
class Resumed:
    """Where a run restarts: the first block to quantize, its input hidden states (one per
    calibration batch), and the results of the blocks before it."""

    block: int
    hidden: list[torch.Tensor]
    layers: dict[str, LayerQuantResult]
    modules: list[ModuleReport]


class Passengers(Protocol):
    """Other inputs carried through the blocks beside the calibration batches (evaluation
    windows, streameval.py): through the original block before it is quantized, through the
    quantized one after."""

    def capture(self, model: nn.Module, arch: ArchSpec, device: torch.device) -> None:
        """Their inputs of block 0 (while embeddings are still loaded)."""

    def through(self, index: int, block: nn.Module, quantized: bool) -> None:
        """Run them through the block as it is now."""

    def states(self) -> list[torch.Tensor]:
        """What they need to go on from the next block (saved with a finished block)."""

    def restore(self, states: list[torch.Tensor]) -> None:
        """Go on from states() saved by a run that was resumed."""


class BlockHooks(Protocol):
    def captured(self) -> None:
        """Called once the inputs of block 0 are captured: nothing outside the blocks
        (embeddings, final norm, head) is needed again until the checkpoint is written."""

    def resume(self, num_blocks: int, device: torch.device) -> Resumed | None:
        """The point to restart from, or None to start at block 0."""

    def load(self, index: int, block: nn.Module) -> None:
        """Called before a block is quantized (e.g. to read its weights)."""

    def pass_done(self) -> None:
        """Called after each pass of the calibration batches (or the passengers) through a
        block, before anything is solved: what was made for the pass can go."""

    def solved(self, name: str, module: nn.Module, layer: LayerQuantResult) -> LayerQuantResult:
        """Called with each solved layer (its dequantized weight already in the module);
        returns what the result keeps for it (e.g. a tensor-less stand-in once packed)."""

    def finished(
        self,
        index: int,
        block: nn.Module,
        layers: dict[str, LayerQuantResult],
        modules: list[ModuleReport],
        next_hidden: list[torch.Tensor] | None,
    ) -> dict[str, LayerQuantResult]:
        """Called once a block is quantized and its outputs computed (None for the last);
        layers are what solved() returned; returns what the result keeps for them."""


@dataclass
class BlockCall:
    """How one block is called for one calibration batch: positional args after the hidden
    states, and keyword args, both as the model itself passed them."""

    args: tuple
    kwargs: dict


class _SharedInputs:
    """Layers fed the very same input tensor (q/k/v, gate/up) share one XᵀX: it is
    accumulated once instead of once per layer, with bit-identical sums.

    The first batch runs until every layer of the group has seen its input, which shows who
    shares with whom; from the second batch on a leader's input counts for its followers as
    well, so the forward stops before the leader (and its followers) compute anything."""

    def __init__(self) -> None:
        # the last input seen, weakly: held, it would keep a batch's intermediate (46 MiB for
        # a 5632-wide down_proj) alive through the whole next batch
        self.last: tuple[weakref.ref[torch.Tensor], GPTQ] | None = None
        self.leader: dict[int, GPTQ] = {}  # id(follower) -> the solver whose XᵀX it uses
        self.followers: dict[int, list[tuple[str, GPTQ]]] = {}  # id(leader) -> its followers
        self.learned = False  # set once the first batch has shown every sharing

    def add(self, name: str, solver: GPTQ, inputs: torch.Tensor) -> list[str]:
        """Account one input; returns the layers it counts for (name, and followers if known)."""
        last = self.last
        if last is not None and last[0]() is inputs and last[1].columns == solver.columns:
            if self.learned:
                return []  # counted when its leader saw this tensor
            leader = self.leader.setdefault(id(solver), last[1])
            if leader is not last[1]:
                raise RuntimeError("layers that shared an input tensor stopped sharing it")
            self.followers.setdefault(id(leader), []).append((name, solver))
            solver.xtx = leader.xtx  # its own zeros are dropped on the first batch
            solver.nsamples += inputs.numel() // solver.columns
            return [name]
        if id(solver) in self.leader:
            raise RuntimeError("layers that shared an input tensor stopped sharing it")
        solver.add_batch(inputs)
        self.last = (weakref.ref(inputs), solver)
        counted = [name]
        if self.learned:
            for follower_name, follower in self.followers.get(id(solver), []):
                follower.nsamples += inputs.numel() // follower.columns
                counted.append(follower_name)
        return counted


def sharing_sets(solvers: dict[str, GPTQ]) -> list[list[str]]:
    """The layers grouped by the XᵀX they use (_SharedInputs makes sharers use one tensor),
    in order of first appearance: [[q, k, v]], [[gate, up]], [[o]]..."""
    sets: dict[int, list[str]] = {}
    for name, solver in solvers.items():
        sets.setdefault(id(solver.xtx), []).append(name)
    return list(sets.values())


def same_settings(names: list[str], settings: dict[str, QuantizeConfig]) -> list[list[str]]:
    """Layers sharing an XᵀX split by their settings (a dynamic rule may give k_proj other bits
    than q_proj), in order of first appearance: each part is one stacked solve."""
    parts: list[tuple[QuantizeConfig, list[str]]] = []
    for name in names:
        for config, part in parts:
            if config == settings[name]:
                part.append(name)
                break
        else:
            parts.append((settings[name], [name]))
    return [part for _, part in parts]


# Tokens per calibration forward call. A block's intermediates grow with it (an MLP 5632 wide
# makes 44 MiB per intermediate at 2048 tokens; 8 windows of 2048 tokens through a 7B model's
# 11008-wide MLP would make 720 MiB each). Fewer tokens per call cost time: each call makes
# the compact block's weights anew (compactblock.py); at 1024 the forward stage took 30% longer.
BATCH_TOKENS = 2048
# A GPU is bound by kernel launches at 2048 tokens (a TinyLlama block's forward is a few ms of
# arithmetic); 8192 fills it better while its intermediates (under 0.1 GiB each for a 5632-wide
# MLP, 0.25 GiB for an 8B model's 14336) stay small beside the card.
CUDA_BATCH_TOKENS = 8192


def batch_tokens(device: torch.device) -> int:
    """Calibration tokens per forward call on this device."""
    return CUDA_BATCH_TOKENS if device.type == "cuda" else BATCH_TOKENS


class _CaptureDone(Exception):
    """Stops the capture forward pass once the last block has been reached."""


class _GroupSeen(Exception):
    """Stops a block's forward once every linear of the current group has seen its input:
    the rest of the block would compute nothing the Hessians need."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    config: QuantizeConfig,
    *,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    batch_size: int | None = None,
    arch: ArchSpec | None = None,
    hooks: BlockHooks | None = None,
    passengers: Passengers | None = None,
) -> PipelineResult:
    """Quantize every linear of every decoder block in place; returns their GPTQ results.

    batch_size: calibration windows per forward call; by default as many as make
    batch_tokens(device) tokens (at least one).
    hooks (optional) load each block before it is quantized, persist it when it is done, and
    may resume the run from a later block (see BlockHooks).
    passengers (optional) are carried through every block beside the calibration."""
    arch = arch or get_arch(model)
    device = torch.device(device) if device is not None else default_device()
    if batch_size is None:
        batch_size = max(1, batch_tokens(device) // max(1, calib_ids.shape[-1]))
    run = _Run(model, arch, config, device, progress, should_stop, hooks, passengers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run.execute(calib_ids, batch_size)
    finally:
        model.train(was_training)
    return run.result


class _Run:
    """The state of one pipeline run: timings, progress and results."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        config: QuantizeConfig,
        device: torch.device,
        progress: ProgressCallback | None,
        should_stop: Callable[[], bool] | None,
        hooks: BlockHooks | None = None,
        passengers: Passengers | None = None,
    ) -> None:
        self.model, self.arch, self.config, self.device = model, arch, config, device
        self.hooks, self.passengers = hooks, passengers
        self.progress, self.should_stop = progress, should_stop
        self.blocks = arch.blocks(model)
        self.num_blocks = len(self.blocks)
        self.groups = arch.groups(config.true_sequential)
        self.per_block = len(arch.module_names)
        self.stage_seconds = {"capture": 0.0, "forward": 0.0, "hessian": 0.0, "solve": 0.0}
        self.result = PipelineResult({}, [], self.stage_seconds, self.num_blocks)
        self.start = time.perf_counter()
        self.block_seconds: list[float] = []
        self.output_seconds: list[float] = []  # each block's pass computing the next inputs
        self.finished_children: FinishedChildren | None = None  # of the block being quantized
        self.routed: dict[str, int] = {}  # tokens routed to each expert of the current group

    # --- the run ---------------------------------------------------------------------------

    def execute(self, calib_ids: torch.Tensor, batch_size: int) -> None:
        if calib_ids.dim() != 2 or calib_ids.numel() == 0:
            raise ValueError(f"calib_ids must be a non-empty [samples, tokens] tensor, got {tuple(calib_ids.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._check_stop("before capturing the calibration inputs")
        began = time.perf_counter()
        hidden, calls = capture_inputs(self.model, self.arch, calib_ids.split(batch_size), self.device)
        if self.passengers is not None:
            self.passengers.capture(self.model, self.arch, self.device)
        settle(self.device)
        self.stage_seconds["capture"] += time.perf_counter() - began
        if self.hooks is not None:
            self.hooks.captured()
        first = 0
        resumed = self.hooks.resume(self.num_blocks, self.device) if self.hooks else None
        if resumed is not None:
            # the saved states: the calibration batches' (none after the last block), then
            # the passengers'
            first = resumed.block
            count = len(hidden) if first < self.num_blocks else 0
            hidden = resumed.hidden[:count]
            if self.passengers is not None:
                self.passengers.restore(resumed.hidden[count:])
            self.result.layers.update(resumed.layers)
            self.result.modules.extend(resumed.modules)
            at_end = first >= self.num_blocks
            where = "after the last block" if at_end else f"at block {first + 1}/{self.num_blocks}"
            self._emit(first - 1 if at_end else first, self.per_block if at_end else 0,
                       message=f"resumed {where}: blocks 1-{first} restored from the work dir")
        for index in range(first, self.num_blocks):
            block = self.blocks[index]
            self._emit(index, 0, message=f"block {index + 1}/{self.num_blocks}")
            began = time.perf_counter()
            if self.hooks is not None:
                with self._timed("loading"):
                    self.hooks.load(index, block)
            home = _device_of(block)
            if home != self.device:  # (a streamed block may hold meta stand-ins: never moved)
                with self._timed("loading"):
                    block.to(self.device)
            children = self.finished_children = FinishedChildren(block, self.groups)
            try:
                self._carry(index, block, quantized=False)
                self._quantize_block(index, block, hidden, calls[index])
                if index + 1 < self.num_blocks:  # the last block's outputs feed nothing
                    self._check_stop(f"after block {index + 1}/{self.num_blocks}")
                    began_output = time.perf_counter()
                    children.install(len(self.groups))
                    hidden = self._forward(block, hidden, calls[index])
                    self.output_seconds.append(time.perf_counter() - began_output)
                children.clear()  # the passengers' batches are not the recorded ones
                self._carry(index, block, quantized=True)
            finally:
                children.clear()
                if home != self.device:
                    block.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # the next block should not meet a fragmented pool
            if self.hooks is not None:
                self._finish(index, block, hidden if index + 1 < self.num_blocks else None)
            self.block_seconds.append(time.perf_counter() - began)
            self._emit(index, self.per_block, message=f"block {index + 1}/{self.num_blocks} done")

    def _carry(self, index: int, block: nn.Module, quantized: bool) -> None:
        if self.passengers is not None:
            try:
                with self._timed("evaluating"):
                    self.passengers.through(index, block, quantized)
            finally:
                self._pass_done()

    def _pass_done(self) -> None:
        if self.hooks is not None:
            self.hooks.pass_done()

    def _finish(self, index: int, block: nn.Module, next_hidden: list[torch.Tensor] | None) -> None:
        """Hand the finished block to the hooks; keep what they give back for its layers."""
        assert self.hooks is not None
        if self.passengers is not None:  # saved after the last block too: they go on to the head
            next_hidden = [*(next_hidden or []), *self.passengers.states()]
        prefix = self.arch.block_prefix(index) + "."
        layers = {k: v for k, v in self.result.layers.items() if k.startswith(prefix)}
        modules = [m for m in self.result.modules if m.block == index + 1]
        with self._timed("storing"):
            self.result.layers.update(self.hooks.finished(index, block, layers, modules, next_hidden))

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Any:
        began = time.perf_counter()
        try:
            yield
        finally:
            settle(self.device)
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - began

    def _quantize_block(
        self, index: int, block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall]
    ) -> None:
        with calibrating(block) as experts:  # routed experts see every token (experts.py)
            self._quantize_groups(index, block, hidden, calls, experts)

    def _quantize_groups(
        self, index: int, block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall],
        experts: dict[str, ExpertLinears],
    ) -> None:
        linears = self.arch.block_linears(block, index)
        done = 0
        for groups_done, group in enumerate(self.groups):
            self._check_stop(f"at block {index + 1}/{self.num_blocks}")
            if self.finished_children is not None:
                self.finished_children.install(groups_done)
            settings = self._settings(index, group)
            done += len(group) - len(settings)  # left unquantized by a rule: nothing to do
            group = tuple(settings)
            if not group:
                continue
            solvers = {name: GPTQ(weight_view(linears[name])) for name in group}
            pending: set[str] = set()
            shared = _SharedInputs()
            handles = [
                # first among the pre-hooks: it may stop the batch before anything else runs
                linears[name].register_forward_pre_hook(
                    self._hessian_hook(name, solver, group, pending, shared), prepend=True)
                for name, solver in solvers.items()
            ]
            reset_counts(experts)
            try:
                self._forward(block, hidden, calls, stop=_GroupSeen)
            finally:
                for handle in handles:
                    handle.remove()
            self.routed = routed_tokens(experts, group)
            for names in sharing_sets(solvers):
                self._check_stop(f"at block {index + 1}/{self.num_blocks}, module {names[0]}")
                alike = same_settings(names, settings)
                for i, subset in enumerate(alike):
                    # the shared XᵀX is consumed by the last solve that uses it
                    done = self._solve(index, subset, solvers, linears, done, settings[subset[0]],
                                       consume=i == len(alike) - 1)

    def _settings(self, index: int, group: tuple[str, ...]) -> dict[str, QuantizeConfig]:
        """The settings of each of the group's layers that is quantized (dynamic rules)."""
        prefix = self.arch.block_prefix(index)
        own = {name: self.config.for_module(f"{prefix}.{name}") for name in group}
        return {name: config for name, config in own.items() if config is not None}

    def _solve(
        self, index: int, names: list[str], solvers: dict[str, GPTQ], linears: dict[str, nn.Module], done: int,
        config: QuantizeConfig, consume: bool,
    ) -> int:
        """Solve layers that share one XᵀX and one setting as one stacked problem (a lone layer
        alone), write their dequantized weights back and record them; returns the modules done
        in the block. consume: their XᵀX is used by no one else."""
        began = time.perf_counter()
        layers = solve_together([solvers[name] for name in names], config, consume=consume)
        for name in names:
            layer = next(layers)  # made one at a time: one layer's copies in memory at once
            solvers[name].free()
            set_weight(linears[name], layer.weight)
            settle(self.device)
            self.stage_seconds["solve"] += time.perf_counter() - began
            self._record(index, name, linears[name], layer, config)
            del layer  # before the next one is made
            done += 1
            report = self.result.modules[-1]
            self._emit(index, done, module=name, loss=report.loss, damp=report.damp_percent)
            began = time.perf_counter()
        return done

    def _record(
        self, index: int, name: str, module: nn.Module, layer: LayerQuantResult, config: QuantizeConfig
    ) -> None:
        """Hand a solved layer to the hooks (or keep it on the CPU) and report it."""
        full = f"{self.arch.block_prefix(index)}.{name}"
        if self.hooks is not None:
            with self._timed("packing"):
                self.result.layers[full] = self.hooks.solved(full, module, layer)
        else:
            self.result.layers[full] = _to_cpu(layer)
        out_features, in_features = linear_shape(module)
        self.result.modules.append(
            ModuleReport(
                name=full,
                block=index + 1,
                module=name,
                out_features=out_features,
                in_features=in_features,
                loss=layer.loss,
                damp_percent=layer.damp_percent,
                nsamples=layer.nsamples,
                seconds=layer.seconds,
                routed_tokens=self.routed.get(name),
                bits=config.bits,
                group_size=config.group_size,
            )
        )

    def _hessian_hook(
        self, name: str, solver: GPTQ, group: tuple[str, ...], seen: set[str], shared: _SharedInputs
    ) -> Callable[..., None]:
        # a pre-hook: the batch stops before the group's last layer computes its output
        def hook(module: nn.Module, args: tuple) -> None:
            settle(self.device)  # the forward's kernels so far are the forward's time
            began = time.perf_counter()
            seen.update(shared.add(name, solver, args[0]))
            seen.add(name)
            settle(self.device)
            self.stage_seconds["hessian"] += time.perf_counter() - began
            if len(seen) == len(group):
                seen.clear()
                shared.learned = True
                raise _GroupSeen

        return hook

    def _forward(
        self,
        block: nn.Module,
        hidden: list[torch.Tensor],
        calls: list[BlockCall],
        stop: type[Exception] | None = None,
    ) -> list[torch.Tensor]:
        """Run the block over every calibration batch (time inside hooks counts as hessian);
        a batch whose forward raises `stop` is cut short and gives no output."""
        began = time.perf_counter()
        hessian_before = self.stage_seconds["hessian"]
        outputs = []
        try:
            for batch, (states, call) in enumerate(zip(hidden, calls, strict=True)):
                if self.finished_children is not None:
                    self.finished_children.batch = batch
                if stop is None:
                    outputs.extend(run_block(block, [states], [call]))
                else:
                    with contextlib.suppress(stop):
                        run_block(block, [states], [call])
                # a batch's intermediates are freed: give back any pages glibc kept of them
                # (up to ~100 MiB measured, on top of the next batch's)
                trim()
        finally:
            self._pass_done()
        settle(self.device)
        hook_time = self.stage_seconds["hessian"] - hessian_before
        self.stage_seconds["forward"] += time.perf_counter() - began - hook_time
        return outputs

    # --- progress --------------------------------------------------------------------------

    def _check_stop(self, where: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"quantization cancelled {where}")

    def _emit(
        self,
        index: int,
        done: int,
        *,
        module: str | None = None,
        loss: float | None = None,
        damp: float | None = None,
        message: str = "",
    ) -> None:
        if self.progress is None:
            return
        fraction = min(1.0, (index + done / self.per_block) / self.num_blocks)
        elapsed = time.perf_counter() - self.start
        self.progress(
            ProgressEvent(
                stage="quantizing",
                fraction=fraction,
                block=index + 1,
                num_blocks=self.num_blocks,
                module=module,
                loss=loss,
                damp=damp,
                seconds=elapsed,
                eta_seconds=self._eta(fraction, elapsed),
                message=message,
                stage_seconds=dict(self.stage_seconds),
            )
        )

    def _eta(self, fraction: float, elapsed: float) -> float | None:
        """Mean time per finished block times the blocks left, less the output pass the last
        block skips (else the ETA runs ~15% long); extrapolated within block 1."""
        if self.block_seconds:
            mean = sum(self.block_seconds) / len(self.block_seconds)
            in_flight = elapsed - self.stage_seconds["capture"] - sum(self.block_seconds)
            remaining_blocks = self.num_blocks - len(self.block_seconds)
            skipped = sum(self.output_seconds) / len(self.output_seconds) if self.output_seconds else 0.0
            return max(0.0, mean * remaining_blocks - skipped - max(0.0, in_flight))
        if fraction <= 0:
            return None
        return elapsed / fraction * (1 - fraction)


def settle(device: torch.device) -> None:
    """Wait for the work queued on the device before a stage's clock stops. CUDA calls return
    before their kernels run, so without it a stage's time lands on whichever later stage first
    waits for a result (the Hessian sums' showed up as solve time). A few waits per group and
    layer: the device idles only while the next launch is issued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall]) -> list[torch.Tensor]:
    """The block's output hidden states for each batch, called as the model calls it."""
    outputs = []
    for states, call in zip(hidden, calls, strict=True):
        out = block(states, *call.args, **call.kwargs)
        outputs.append(out[0] if isinstance(out, tuple | list) else out)
    return outputs


def capture_inputs(
    model: nn.Module, arch: ArchSpec, batches: tuple[torch.Tensor, ...], device: torch.device
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Hidden states entering block 0 per batch, and how each block is called per batch.

    Each block's forward is swapped for a recorder that passes the hidden states through
    unchanged, so no block computes anything and none needs to be on the device.
    """
    blocks = arch.blocks(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            by_name = "hidden_states" in kwargs
            states = kwargs.pop("hidden_states") if by_name else args[0]
            for key in _CACHE_KWARGS:
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            calls[index].append(BlockCall(tuple(args if by_name else args[1:]), kwargs))
            if index == 0:
                hidden.append(states)
            if index == last:
                raise _CaptureDone
            return (states,) if _LAYERS_RETURN_TUPLES else states

        return forward

    with _blocks_replaced(model, arch, device, recorder):
        for batch in batches:
            with contextlib.suppress(_CaptureDone):
                model(input_ids=batch.to(device), use_cache=False)
    if any(len(block_calls) != len(batches) for block_calls in calls):
        raise RuntimeError(f"{arch.family}: not every decoder block was reached during capture")
    return hidden, calls


def logits_after_blocks(
    model: nn.Module, arch: ArchSpec, ids: torch.Tensor, last_hidden: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The model's logits on ids (fp32) given what its last block outputs for them: the model's
    own forward (final norm, head, any logit scaling or soft-capping its family has), with
    block 0 answering last_hidden and every other block passing its input on."""

    def stand_in(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            states = last_hidden if index == 0 else kwargs.get("hidden_states", args[0] if args else None)
            return (states,) if _LAYERS_RETURN_TUPLES else states

        return forward

    with _blocks_replaced(model, arch, device, stand_in):
        return model(input_ids=ids.to(device), use_cache=False).logits.float()


@contextlib.contextmanager
def _blocks_replaced(
    model: nn.Module, arch: ArchSpec, device: torch.device, forward_of: Callable[[int], Callable[..., Any]]
) -> Iterator[None]:
    """Every block's forward is forward_of(its index), and what lies outside the blocks is on
    the device, until the block exits."""
    blocks = arch.blocks(model)
    moved = _move_outside_blocks(model, arch, device)
    try:
        for index, block in enumerate(blocks):
            block.forward = forward_of(index)
        yield
    finally:
        for block in blocks:
            del block.forward
        _restore(moved)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _to_cpu(layer: LayerQuantResult) -> LayerQuantResult:
    moved = {
        f.name: getattr(layer, f.name).cpu()
        for f in dataclasses.fields(layer)
        if isinstance(getattr(layer, f.name), torch.Tensor)
    }
    return dataclasses.replace(layer, **moved)


def _move_outside_blocks(
    model: nn.Module, arch: ArchSpec, device: torch.device
) -> list[tuple[dict, str, torch.device]]:
    """Put every parameter and buffer outside the decoder blocks on the device (for the
    capture pass: embeddings, rotary tables...; a lazily loaded model's head stays on meta, the
    capture never reaches it); returns what to move back."""
    prefix = arch.blocks_path + "."
    moved = []
    for name, module in model.named_modules():
        if name == arch.blocks_path or name.startswith(prefix):
            continue
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.device != device and tensor.device.type != "meta":
                    moved.append((store, key, tensor.device))
                    _assign(store, key, tensor.to(device))
    return moved


def _restore(moved: list[tuple[dict, str, torch.device]]) -> None:
    for store, key, home in moved:
        _assign(store, key, store[key].to(home))


def _assign(store: dict, key: str, tensor: torch.Tensor) -> None:
    current = store[key]
    if isinstance(current, nn.Parameter):
        current.data = tensor  # keep the Parameter object: tied weights share it
    else:
        store[key] = tensor
