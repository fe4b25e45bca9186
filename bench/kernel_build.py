"""The column kernel built ahead of time for each CUDA card generation, on any machine (no GPU).

Triton's own compiler takes the kernel to PTX and ptxas (shipped inside the triton wheel) to
the cubin a card loads, exactly as a CUDA worker's first solve builds it; cuobjdump (also in
the wheel) reads what the build uses. What a build here shows without a card: the kernel
compiles for that generation; a thread's share of the block fits its registers (no stack or
local memory: a spill would turn every column's update into memory traffic); no fused
multiply-add (each product and difference rounded on its own, as in Triton's interpreter, where
the tests run the kernel on the CPU). What it cannot show: the kernel's speed and its answers on
a card (bench/gpu.sh's kernel step, and the check columnkernel.py runs on each device).

    python bench/kernel_build.py            # the table, in markdown
    python bench/kernel_build.py --json     # one JSON object per build

Must run without TRITON_INTERPRET (the interpreter replaces the kernel with a Python function).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# compute capability -> the cards a team would run it on
CARDS = {
    75: "T4",
    80: "A100",
    86: "A10, RTX 3090",
    89: "L4, L40S, RTX 4090",
    90: "H100, H200",
    100: "B200",
    120: "RTX 5090",
}
BLOCKS = (128, 256)  # the default block and columnkernel.MAX_BLOCK


@dataclass
class Build:
    capability: int
    block: int
    warps: int
    registers: int  # a thread's
    stack_bytes: int  # a thread's stack frame: spilled registers live here
    local_bytes: int
    shared_bytes: int
    fma: int  # fused multiply-adds in the PTX
    cubin_bytes: int
    seconds: float


def build(capability: int, block: int) -> Build:
    """Compile the kernel for blocks of `block` columns on sm_<capability>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from worker.gptq import columns_triton

    options = columns_triton.launch_options(block)
    constexprs = {"ROWS": options.pop("ROWS"), "TILE_N": options.pop("TILE_N")}
    start = time.perf_counter()
    source = ASTSource(fn=columns_triton._columns_kernel, signature=columns_triton.SIGNATURE,
                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    return Build(
        capability=capability, block=block, warps=options["num_warps"],
        registers=usage["REG"], stack_bytes=usage["STACK"], local_bytes=usage["LOCAL"],
        shared_bytes=usage["SHARED"], fma=len(re.findall(r"\bfma\.", compiled.asm["ptx"])),
        cubin_bytes=len(compiled.asm["cubin"]), seconds=round(seconds, 2),
    )


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump's resource line for the kernel: REG, STACK, SHARED, LOCAL, ..."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}


def table(builds: list[Build]) -> str:
    rows = ["| card (sm) | block | warps | registers / thread | stack + local bytes | shared bytes "
            "| FMA | build s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in builds:
        rows.append(f"| {CARDS.get(b.capability, '?')} ({b.capability}) | {b.block} | {b.warps} "
                    f"| {b.registers} | {b.stack_bytes + b.local_bytes} | {b.shared_bytes} "
                    f"| {b.fma} | {b.seconds} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per build")
    parser.add_argument("--capability", type=int, action="append",
                        help="build only for these (default: every generation in CARDS)")
    args = parser.parse_args()
    builds = [build(cap, block) for cap in args.capability or CARDS for block in BLOCKS]
    if args.json:
        for b in builds:
            print(json.dumps(asdict(b)))
    else:
        import triton

        print(f"triton {triton.__version__}\n\n{table(builds)}")


if __name__ == "__main__":
    main()
