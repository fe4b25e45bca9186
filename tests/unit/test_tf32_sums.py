"""XᵀX on TF32 tensor cores (CUDA, fp16/bf16 inputs): lossless because such inputs are exact in
TF32. The premise is checked here bit by bit; the switch is checked for where it applies and
that it leaves torch's setting as it was."""

from __future__ import annotations

import pytest
import torch

from worker.gptq import gptq
from worker.gptq.gptq import sums_in_tf32

TF32_DROPPED_BITS = 0x1FFF  # TF32 keeps 10 of fp32's 23 mantissa bits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_are_exact_in_tf32(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-7, 4, (200_000,), generator=generator)  # subnormals too
    x = (torch.randn(200_000, generator=generator) * scale).to(dtype).float()
    assert torch.all(x.view(torch.int32) & TF32_DROPPED_BITS == 0)


def test_fp32_values_are_not_so_they_keep_ieee_sums() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert (x.view(torch.int32) & TF32_DROPPED_BITS != 0).float().mean() > 0.99
    assert not sums_in_tf32(torch.float32, torch.device("cuda"))


def test_tf32_sums_only_for_half_inputs_on_cuda() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert sums_in_tf32(torch.float16, cuda) and sums_in_tf32(torch.bfloat16, cuda)
    assert not sums_in_tf32(torch.float16, cpu) and not sums_in_tf32(torch.bfloat16, cpu)


def test_the_tf32_setting_is_put_back() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with gptq.tf32_matmul(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(ValueError), gptq.tf32_matmul(True):
        raise ValueError("a failure inside")
    assert matmul.fp32_precision == before
    with gptq.tf32_matmul(False):
        assert matmul.fp32_precision == before


def test_half_inputs_sum_as_before_on_the_cpu() -> None:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).half()
    solver = gptq.GPTQ(torch.zeros(8, 32))
    solver.add_batch(x)
    assert torch.equal(solver.xtx, torch.zeros(32, 32).addmm_(x.float().t(), x.float()))


def test_a_process_on_the_legacy_tf32_flag_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch raises when its two TF32 APIs are mixed: if something in the process set the old
    flag, the sums run as that flag says rather than fail the job."""

    class Mixed:
        @property
        def fp32_precision(self) -> str:
            raise RuntimeError("you have used mix of the legacy and new APIs")

        @fp32_precision.setter
        def fp32_precision(self, value: str) -> None:
            raise AssertionError("set although it could not be read back")

    monkeypatch.setattr(torch.backends.cuda, "matmul", Mixed())
    with gptq.tf32_matmul(True):
        pass
