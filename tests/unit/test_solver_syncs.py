"""No host synchronisation per column or per group inside a layer's solve.

On CUDA every read of a device value on the host (.item(), int(t), float(t), bool(t),
.tolist(), and the ops whose output size depends on the data: nonzero, boolean-mask indexing)
waits for the queue to drain; one per column makes the solve launch-bound. On the CPU those
reads are counted here: at the Python level (a TorchFunctionMode) and at the aten level (a
TorchDispatchMode, which sees what indexing calls internally). The count must not grow with
the number of columns or groups.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.simcuda import SYNCING_OPS as _SYNCING_OPS
from worker.gptq.config import QuantizeConfig
from worker.gptq.gptq import GPTQ, solve_together

_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__"}


class _CountReads(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _CountSyncingOps(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _SYNCING_OPS:
            self.counts[name] += 1
        elif name.startswith("index") and _bool_index(args):
            self.counts["boolean mask indexing"] += 1  # the op calls nonzero inside
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _solver(rows: int, columns: int, seed: int = 0) -> GPTQ:
    gen = torch.Generator().manual_seed(seed)
    solver = GPTQ(torch.randn(rows, columns, generator=gen))
    x = torch.randn(4 * columns, columns, generator=gen)
    x[:, 1] = 0  # a dead input: its handling must not sync either
    solver.add_batch(x)
    return solver


def host_reads(columns: int, config: QuantizeConfig, layers: int = 1) -> Counter:
    """Host reads during the solve of `layers` stacked layers with `columns` inputs."""
    first = _solver(16, columns)
    solvers = [first]
    for i in range(1, layers):
        other = GPTQ(torch.randn(8 * i, columns))
        other.xtx, other.nsamples = first.xtx, first.nsamples
        solvers.append(other)
    counts: Counter = Counter()
    with _CountReads(counts), _CountSyncingOps(counts):
        list(solve_together(solvers, config, consume=True))
    return counts


CONFIGS = [
    QuantizeConfig(bits=4, group_size=32),
    QuantizeConfig(bits=3, group_size=-1, sym=False),
    QuantizeConfig(bits=4, group_size=32, desc_act=True),
    QuantizeConfig(bits=2, group_size=32, desc_act=True, static_groups=True),  # was int(perm[col])
    QuantizeConfig(bits=8, group_size=32, static_groups=True, sym=False),
    QuantizeConfig(bits=4, group_size=32, mse=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"b{c.bits}g{c.group_size}"
                         f"{'-act' if c.desc_act else ''}{'-static' if c.static_groups else ''}"
                         f"{'-asym' if not c.sym else ''}{'-mse' if c.mse else ''}")
def test_host_reads_do_not_grow_with_columns(config: QuantizeConfig) -> None:
    small = host_reads(128, config)  # 1 block, 4 groups
    large = host_reads(512, config)  # 4 blocks, 16 groups
    assert small == large, (small, large)
    # what is left is per layer: the damping's mean diagonal (float), the Cholesky status and
    # the factor's finiteness (bool), the losses (tolist); each also counted at the aten level
    assert sum(large[name] for name in _HOST_READS) <= 4, large
    assert large["boolean mask indexing"] == 0, large


def test_a_stack_reads_back_no_more_than_one_layer() -> None:
    config = QuantizeConfig(bits=4, group_size=32, desc_act=True, static_groups=True)
    assert host_reads(256, config, layers=3) == host_reads(256, config, layers=1)


def test_the_counter_sees_a_per_column_read() -> None:
    """The modes do see what the old solver did per column (int(perm[col]))."""
    perm = torch.randperm(64)
    counts: Counter = Counter()
    with _CountReads(counts), _CountSyncingOps(counts):
        for col in range(64):
            int(perm[col])
        torch.zeros(4)[torch.tensor([True, False, True, False])] = 1
    assert counts["__int__"] == 64 and counts["_local_scalar_dense"] == 64
    assert counts["boolean mask indexing"] == 1
