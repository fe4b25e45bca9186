"""Which implementation runs GPTQ's per-column steps: the torch loop or the Triton kernel.

GPTQD_COLUMN_KERNEL:
  * auto (default): the Triton kernel on CUDA once it has passed its check on that device in
    this process, else the torch loop (the CPU's path, and CUDA's when triton is missing or
    the check fails: slower there, never wrong);
  * triton: the kernel on CUDA, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1,
    the tests), unchecked;
  * torch: the loop everywhere.
Blocks wider than MAX_BLOCK columns (QuantizeConfig.block_size; 128 by default) always run the
loop: the kernel holds a program's block in registers, and past 256 rows they spill (measured
by bench/kernel_build.py, which builds the kernel for each card generation on any machine).
The check solves a small problem (two blocks, a partly masked tile, a group per block and
groups inside a block) both ways on the device and compares codes and losses. It costs the
kernel's compilation and a few milliseconds, once per device and process; its outcome is
logged and written into the run's report (describe()).
"""

from __future__ import annotations

import logging
import os

import torch

from .config import QuantizeConfig
from .errors import EngineError

log = logging.getLogger(__name__)

CHOICES = ("auto", "triton", "torch")
# a kernel that agrees with the loop leaves all but a rare code alone: the loop's CUDA kernels
# (addr_, compiled by nvcc, which may fuse a multiply-add) can round a last bit otherwise, which
# moves a value across a rounding tie now and then, and the error feedback carries it on
CHECK_SAME_CODES = 0.99
CHECK_LOSS_GAP = 0.01
MAX_BLOCK = 256

_checked: dict[str, str | None] = {}  # device -> None (the kernel passed) or why it is not used


def choice() -> str:
    value = os.environ.get("GPTQD_COLUMN_KERNEL", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise EngineError(f"GPTQD_COLUMN_KERNEL={value!r} is not a column kernel: use one of "
                          f"{', '.join(CHOICES)}")
    return value


def use_kernel(device: torch.device, block_size: int = 128) -> bool:
    """Whether a solve on this device, in blocks of block_size columns, runs the Triton kernel."""
    mode = choice()
    if mode == "torch" or block_size > MAX_BLOCK:
        return False
    if mode == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return device.type == "cuda" and checked(device) is None


def describe(device: torch.device, block_size: int = 128) -> str:
    """For the report: which implementation solves on this device, and why."""
    mode = choice()
    if use_kernel(device, block_size):
        return "triton" + (" (checked against the torch loop)" if mode == "auto" else "")
    if mode == "torch" or device.type != "cuda":
        return "torch"
    if block_size > MAX_BLOCK:
        return f"torch (blocks of {block_size} columns: the Triton kernel takes at most {MAX_BLOCK})"
    return f"torch (the Triton kernel is not used: {checked(device)})"


def checked(device: torch.device) -> str | None:
    """None when the kernel agrees with the torch loop on this device (checked once per
    process), else why it is not used."""
    key = str(device)
    if key not in _checked:
        try:
            _checked[key] = disagreement(device)
        except Exception as exc:  # a kernel that does not compile must not fail the job
            first_line = next(iter(str(exc).strip().splitlines()), "")  # compilers print pages
            _checked[key] = f"{type(exc).__name__}: {first_line}"
        if _checked[key] is None:
            log.info("Triton column kernel checked on %s: it solves GPTQ's column loop", key)
        else:
            log.warning("Triton column kernel not used on %s (%s); the torch loop runs instead, "
                        "slower", key, _checked[key])
    return _checked[key]


def disagreement(device: torch.device) -> str | None:
    """Solve small problems with the kernel and with the loop on the device: None if they
    agree, else how they differ. Raises what the kernel raises (missing triton, compilation)."""
    import triton  # noqa: F401  (an ImportError says why)

    from .gptq import GPTQ

    generator = torch.Generator().manual_seed(0)
    # 2 blocks of 128 columns; 72 channels: two tiles of 32 and one partly masked (8 of 32)
    weight = torch.randn(72, 256, generator=generator)
    inputs = torch.randn(1024, 256, generator=generator)
    for config in (QuantizeConfig(bits=4, group_size=128),
                   QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True, static_groups=True)):
        solved = []
        for kernel in (True, False):
            solver = GPTQ(weight.to(device))
            solver.add_batch(inputs.to(device))
            solved.append(solver.solve(config, kernel=kernel))
        ours, loop = solved
        same = (ours.codes == loop.codes).float().mean().item()
        gap = abs(ours.loss - loop.loss) / max(loop.loss, 1e-30)
        if same < CHECK_SAME_CODES or not gap <= CHECK_LOSS_GAP:
            return (f"on a test problem ({config.bits}-bit g{config.group_size}) it gave "
                    f"{same:.1%} of the loop's codes and a loss {gap:.2%} away from the loop's")
    return None
