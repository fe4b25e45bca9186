"""No host synchronisation per column or per group anywhere in a run, not only in the solve
(tests/unit/test_solver_syncs.py): the forward passes, the Hessian hooks, the replayed
attention, packing on the compute device and handing blocks to the writer. On CUDA each such
read waits for the queue to drain. Counted on the CPU with the solver test's modes, over a
whole streamed `api.quantize` of two Llamas that differ only in width (twice the columns and
groups in every layer): the counts must be equal."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.integration.checkpoints import tiny_llama
from tests.unit.test_solver_syncs import _HOST_READS, _CountReads, _CountSyncingOps
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig

CONFIGS = [
    QuantizeConfig(bits=4, group_size=16, desc_act=True, static_groups=True),
    QuantizeConfig(bits=3, group_size=16, sym=False, mse=True),  # groups found as the loop goes
]
CALIBRATION = CalibrationSpec("builtin", num_samples=8, seq_length=64)


def host_reads_of_a_run(tmp_path: Path, hidden: int, config: QuantizeConfig) -> Counter:
    source = tiny_llama(tmp_path / f"llama{hidden}", layers=2, hidden=hidden)
    counts: Counter = Counter()
    with _CountReads(counts), _CountSyncingOps(counts):
        report = quantize(str(source), tmp_path / f"out{hidden}", config, CALIBRATION,
                          device="cpu", lazy=True)
    assert report.lazy and report.num_blocks == 2
    return counts


@pytest.mark.parametrize("config", CONFIGS, ids=["act-order-static", "asym-mse"])
def test_a_runs_host_reads_do_not_grow_with_columns_or_groups(tmp_path: Path, config: QuantizeConfig) -> None:
    narrow = host_reads_of_a_run(tmp_path, 64, config)  # K = 64 / 128: 4 / 8 groups of 16
    wide = host_reads_of_a_run(tmp_path, 128, config)  # K = 128 / 256: 8 / 16 groups
    assert narrow == wide, (narrow, wide)
    assert sum(wide[name] for name in _HOST_READS) > 0  # the modes did see the run
    assert wide["boolean mask indexing"] == 0, wide
