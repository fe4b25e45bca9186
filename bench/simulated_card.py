"""Peak CUDA memory of a job, measured on the CPU with a simulated card (tests/simcuda.py).

A random fp16 Llama of a real model's shape (a few of its blocks: every block but the last
works with the next one read ahead, so two blocks show the steady state) is quantized by
`worker.gptq.api.quantize` on device "cuda" inside `simulated_cuda()`: every tensor the run
puts on the card is counted while it lives, which is what torch.cuda.max_memory_allocated
reports on a card (less the cuBLAS workspace and what kernels allocate inside). The peak is
taken twice: over the capture of block 0's inputs (the embeddings on the card) and over the
blocks. With several calibration sizes the blocks' peak is fitted as a + b * tokens (the
stored inputs, outputs and replayed attention grow with the tokens; a forward call's
intermediates stop growing at 8192 tokens, so fit sizes of 8192 tokens or more) and read at
the issue's 128 x 512 (with one size: two fp16 hidden states a token, what the fit found on
TinyLlama's shape).

    .venv/bin/python bench/simulated_card.py --shape tinyllama --samples 16 32
    .venv/bin/python bench/simulated_card.py --shape llama-8b --samples 16

Not a card: no allocator reserve (cuda_reserved_bytes is the allocated peak here), no speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GPTQD_COLUMN_KERNEL", "torch")  # the kernel needs a card

import torch  # noqa: E402

from tests.simcuda import simulated_cuda  # noqa: E402
from worker.gptq.api import quantize  # noqa: E402
from worker.gptq.config import CalibrationSpec, QuantizeConfig  # noqa: E402

FIXTURES = Path(os.environ.get("GPTQD_FIXTURES", ROOT.parent / "shared" / "fixtures"))
SHAPES = {
    "tinyllama": {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "of": 22},
    "llama-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "of": 32},
}
GIB = 2**30


def build(shape: dict, blocks: int, out: Path) -> Path:
    """The shape's first blocks, random fp16 weights, the GPT-2 tokenizer (vocabulary 50257):
    bench/gpu.sh's builder, on the host."""
    dims = {"hidden": shape["hidden"], "intermediate": shape["intermediate"], "layers": blocks,
            "heads": shape["heads"], "kv-heads": shape["kv_heads"]}
    subprocess.run([sys.executable, str(ROOT / "bench/gpu/make_model.py"), "--out", str(out),
                    "--tokenizer", str(FIXTURES / "tokenizers" / "gpt2"), "--device", "cpu",
                    *(f"--{k}={v}" for k, v in dims.items())], check=True, stdout=subprocess.DEVNULL)
    return out


def measure(model: Path, samples: int, seq_length: int, work: Path) -> dict:
    """One streamed job on the simulated card: the peak over the capture and over the blocks."""
    peaks: dict[str, int] = {}

    def progress(event) -> None:  # a ProgressEvent
        if event.block == 1 and event.message == f"block 1/{event.num_blocks}":
            peaks["capture"] = card.peak  # block 0's inputs are captured: the blocks start
            card.peak = card.allocated

    started = time.time()
    out = work / f"out-{samples}"
    with simulated_cuda() as card:
        report = quantize(str(model), out, QuantizeConfig(bits=4, group_size=128),
                          CalibrationSpec(str(FIXTURES / "wikitext-2" / "valid.txt"),
                                          num_samples=samples, seq_length=seq_length),
                          device="cuda", lazy=True, progress=progress)
        peaks["blocks"] = card.peak
    shutil.rmtree(out, ignore_errors=True)
    return {"samples": samples, "seq_length": seq_length, "tokens": samples * seq_length,
            "capture_peak": peaks.get("capture", 0), "blocks_peak": peaks["blocks"],
            "reported_cuda_bytes": report.peak_memory.get("cuda_bytes"),
            "seconds": round(time.time() - started, 1), "blocks": report.num_blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="tinyllama")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--samples", type=int, nargs="+", default=[128])
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--target-samples", type=int, default=128, help="read the fit here")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model = build(shape, args.blocks, Path(tmp) / "model")
        runs = [measure(model, n, args.seq_length, Path(tmp)) for n in args.samples]
    print(f"simulated card, {args.shape} (h{shape['hidden']} i{shape['intermediate']} GQA "
          f"{shape['heads']}/{shape['kv_heads']}), {args.blocks} of {shape['of']} blocks streamed, "
          f"fp16, GPT-2 vocabulary; 4-bit g128, torch {torch.__version__}\n")
    print("| calibration | tokens | peak over the capture | peak over the blocks | run |")
    print("|---|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['samples']} x {r['seq_length']} | {r['tokens']} | {r['capture_peak'] / GIB:.2f} GiB "
              f"| {r['blocks_peak'] / GIB:.2f} GiB | {r['seconds']:.0f} s |")
    result: dict = {"shape": args.shape, **shape, "runs": runs}
    t0, p0 = runs[0]["tokens"], runs[0]["blocks_peak"]
    if len(runs) >= 2:
        slope, how = (runs[-1]["blocks_peak"] - p0) / (runs[-1]["tokens"] - t0), "measured"
    else:  # a block's fp16 inputs and outputs, kept for every window (TinyLlama: measured so)
        slope, how = 2 * 2 * shape["hidden"], "two fp16 hidden states, not measured"
    target = args.target_samples * args.seq_length
    result["fit"] = {"bytes_per_token": slope, "how": how, "at_tokens": target,
                     "blocks_peak": p0 + slope * (target - t0)}
    print(f"\nblocks' peak = {p0 / GIB:.2f} GiB + {slope / 1024:.1f} KiB per token ({how}) past "
          f"{t0}: {result['fit']['blocks_peak'] / GIB:.2f} GiB at {target} tokens "
          f"({args.target_samples} x {args.seq_length})")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
