"""Which implementation runs the per-column steps (columnkernel.py): the choice, the check the
Triton kernel must pass on a device before `auto` uses it, and the fallback when it fails.
The check itself runs in Triton's interpreter in test_columns_triton.py; here it is replaced,
so these run without a GPU and without triton."""

from __future__ import annotations

import logging

import pytest
import torch

from worker.gptq import columnkernel
from worker.gptq.errors import EngineError

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replaces the device check; the list holds the devices checked and, set by a test, what
    the check says (None: passed) or raises."""
    calls: list = []
    outcome: dict = {"result": None}

    def disagreement(device: torch.device) -> str | None:
        calls.append(str(device))
        if isinstance(outcome["result"], Exception):
            raise outcome["result"]
        return outcome["result"]

    monkeypatch.setattr(columnkernel, "disagreement", disagreement)
    monkeypatch.setattr(columnkernel, "_checked", {})
    monkeypatch.delenv("GPTQD_COLUMN_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls.append(outcome)  # calls[0]: the outcome to set
    return calls


def test_auto_runs_the_loop_on_the_cpu_without_a_check(check: list) -> None:
    assert not columnkernel.use_kernel(CPU)
    assert columnkernel.describe(CPU) == "torch"
    assert check[1:] == []


def test_auto_uses_the_kernel_on_cuda_once_it_passed_its_check(check: list) -> None:
    assert columnkernel.use_kernel(CUDA) and columnkernel.use_kernel(CUDA)
    assert columnkernel.describe(CUDA) == "triton (checked against the torch loop)"
    assert check[1:] == ["cuda"]  # once per device and process


@pytest.mark.parametrize("failure, reason", [
    ("on a test problem (4-bit g128) it gave 12.0% of the loop's codes", "12.0% of the loop's codes"),
    (RuntimeError("PassManager::run failed\n<traceback>"), "RuntimeError: PassManager::run failed"),
    (ImportError("No module named 'triton'"), "ImportError: No module named 'triton'"),
])
def test_a_kernel_that_fails_its_check_leaves_the_loop_in_place(
    check: list, failure: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    check[0]["result"] = failure
    with caplog.at_level(logging.WARNING, logger=columnkernel.__name__):
        assert not columnkernel.use_kernel(CUDA) and not columnkernel.use_kernel(CUDA)
    assert check[1:] == ["cuda"]
    described = columnkernel.describe(CUDA)
    assert described.startswith("torch (the Triton kernel is not used: ") and reason in described
    [record] = caplog.records  # said once, with what to expect
    assert reason in record.getMessage() and "slower" in record.getMessage()


def test_torch_and_triton_skip_the_check(check: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQD_COLUMN_KERNEL", "torch")
    assert not columnkernel.use_kernel(CUDA) and columnkernel.describe(CUDA) == "torch"
    monkeypatch.setenv("GPTQD_COLUMN_KERNEL", "Triton")
    assert columnkernel.use_kernel(CUDA) and columnkernel.describe(CUDA) == "triton"
    assert not columnkernel.use_kernel(CPU)  # on CPU tensors only in Triton's interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert columnkernel.use_kernel(CPU)
    assert check[1:] == []


def test_a_misspelt_choice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQD_COLUMN_KERNEL", "trition")
    with pytest.raises(EngineError, match=r"GPTQD_COLUMN_KERNEL='trition'.*auto, triton, torch"):
        columnkernel.use_kernel(CUDA)
