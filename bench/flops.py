"""The FLOPs a quantization run does, counted while it runs, and the machine's matmul rates.

counted() counts, in this process, until it exits:
  * forward: 2 * tokens * in * out per nn.Linear call (the blocks' linears; attention's own
    products are left out: about 5% of a Llama block's at 512 tokens, less at fewer);
  * hessian: 2 * T * K^2 per XᵀX accumulation (layers sharing an input share one);
  * solve: per problem solved (solve_together: a stack of layers sharing a Hessian, or one
    layer), N * K^2 for the column loop and its lazy updates, plus 4/3 * K^3 for the
    factorisation (Cholesky, inverse, Cholesky again).
matmul_rate() is the best of a few n^3 matmuls on a device in a dtype.

    python bench/flops.py [--device cuda]    # prints RATES_JSON: {"fp32", "tf32", "fp16"} FLOP/s
                                             # (fp32: TF32 off, as the solver runs; tf32: as the
                                             # Hessian sums of fp16/bf16 models on CUDA)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def counted() -> Iterator[dict[str, float]]:
    """Yields {"forward", "hessian", "solve"} FLOPs, growing as the run in the block goes."""
    from worker.gptq import pipeline
    from worker.gptq.arch import is_linear, linear_shape
    from worker.gptq.gptq import GPTQ

    flops = {"forward": 0.0, "hessian": 0.0, "solve": 0.0}
    add_batch, solve_together = GPTQ.add_batch, pipeline.solve_together

    def hessian(self: GPTQ, inp: torch.Tensor) -> None:
        flops["hessian"] += 2.0 * (inp.numel() // self.columns) * self.columns**2
        add_batch(self, inp)

    def solve(solvers: Any, config: Any, **kwargs: Any) -> Any:
        rows, columns = sum(s.rows for s in solvers), solvers[0].columns
        flops["solve"] += float(rows) * columns**2 + 4.0 / 3.0 * columns**3
        return solve_together(solvers, config, **kwargs)

    def forward(module: nn.Module, args: tuple, output: Any) -> None:
        # nn.Linear and GPT-2's Conv1D (the layers the engine quantizes)
        if is_linear(module) and args and isinstance(args[0], torch.Tensor):
            out_features, in_features = linear_shape(module)
            tokens = args[0].numel() // in_features
            flops["forward"] += 2.0 * tokens * in_features * out_features

    GPTQ.add_batch = hessian  # type: ignore[method-assign]
    pipeline.solve_together = solve
    handle = nn.modules.module.register_module_forward_hook(forward)
    try:
        yield flops
    finally:
        handle.remove()
        GPTQ.add_batch = add_batch  # type: ignore[method-assign]
        pipeline.solve_together = solve_together


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                repeat: int = 10) -> float:
    """FLOP/s of the best of `repeat` n x n matmuls (n: 8192 on a GPU, 2048 on the CPU)."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm up: thread pool or cuBLAS heuristics, caches, clocks
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - began)
    return 2.0 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, help="matrix size (default 8192 on a GPU, 2048 on the CPU)")
    args = ap.parse_args()
    from worker.gptq.gptq import tf32_matmul

    cpu = args.device == "cpu"
    rates = {"device": args.device, "fp32": matmul_rate(args.device, torch.float32, n=args.size),
             # fp16 on the CPU is emulated: a small matrix tells enough
             "fp16": matmul_rate(args.device, torch.float16, n=1024 if cpu else args.size,
                                 repeat=3 if cpu else 10)}
    # fp32 on TF32 tensor cores, as the Hessian sums of fp16/bf16 models run on CUDA
    with tf32_matmul(not cpu):
        rates["tf32"] = rates["fp32"] if cpu else matmul_rate(args.device, torch.float32, n=args.size)
    print("RATES_JSON:" + json.dumps(rates), flush=True)


if __name__ == "__main__":
    main()
