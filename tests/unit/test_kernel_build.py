"""The column kernel built for real CUDA cards on this CPU machine (bench/kernel_build.py: Triton's
compiler and the wheel's ptxas, no GPU): it must compile for every generation a team runs,
keep a thread's share of the block in registers (a spill turns each column's update into memory
traffic) and use no fused multiply-add (the interpreter, where test_columns_triton.py checks
its answers, rounds each product and difference on its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from kernel_build import BLOCKS, CARDS  # noqa: E402

from worker.gptq import columnkernel  # noqa: E402


def test_the_kernel_builds_for_every_card_generation_without_spills_or_fma() -> None:
    # the interpreter would hand the compiler a Python function: build in a process without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_build.py"), "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    builds = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(b["capability"], b["block"]) for b in builds} == {(c, b) for c in CARDS for b in BLOCKS}
    for b in builds:
        where = f"sm_{b['capability']}, blocks of {b['block']}"
        assert b["cubin_bytes"] > 0, where
        assert b["stack_bytes"] == 0 and b["local_bytes"] == 0, f"registers spill on {where}: {b}"
        assert 0 < b["registers"] <= 255, where
        assert b["fma"] == 0, f"fused multiply-adds on {where}"
        assert b["warps"] * 32 == max(128, b["block"]), where  # a warp per 32 rows, at least 4


def test_blocks_wider_than_the_kernel_takes_run_the_torch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("GPTQD_COLUMN_KERNEL", "triton")
    cuda = torch.device("cuda", 0)
    assert columnkernel.use_kernel(cuda, columnkernel.MAX_BLOCK)
    assert not columnkernel.use_kernel(cuda, columnkernel.MAX_BLOCK + 1)
    described = columnkernel.describe(cuda, 512)
    assert described.startswith("torch (blocks of 512 columns") and str(columnkernel.MAX_BLOCK) in described
    assert max(BLOCKS) == columnkernel.MAX_BLOCK  # the widest block allowed is the widest built
