"""Time per stage, ETA accuracy and matmul efficiency of gptqd, and GPTQModel on the same work.

For each model (the tiny-gpt2-wikitext2 fixture and a synthetic fp16 Llama built by
bench/memory.py), on the CPU with the same calibration windows and settings (4-bit, g128, sym,
no act-order, true-sequential):

  * gptqd: worker.gptq.api.quantize (the CLI's call), its stage_seconds, and the ETA of every
    progress event after the first quarter of the blocks against the time the run really
    took from then on (target: within 25%);
  * the FLOPs of the Hessian accumulation and of the solver, counted as they happen
    (bench/flops.py), as a fraction of the machine's measured fp32 matmul throughput (a 2048³
    matmul, same threads);
  * GPTQModel (if importable), load + quantize + save of the same model on the same windows,
    in a child process so each gets the machine to itself.

    .venv/bin/python bench/speed.py [--hidden 1024 --layers 4 --num-samples 32 --seq-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def run_ours(model: str, num_samples: int, seq_length: int, out: Path) -> dict:
    from flops import counted

    from worker.gptq.api import quantize
    from worker.gptq.config import CalibrationSpec, QuantizeConfig

    events = []
    began = time.perf_counter()
    with counted() as flops:
        report = quantize(model, out, QuantizeConfig(bits=4, group_size=128),
                          CalibrationSpec("builtin", num_samples=num_samples, seq_length=seq_length),
                          device="cpu", progress=events.append)
    total = time.perf_counter() - began
    data = report.to_dict()
    data["flops"] = flops
    data["wall_seconds"] = total
    data["eta_errors"] = eta_errors(events, report.num_blocks, report.duration_seconds)
    return data


def eta_errors(events: list, num_blocks: int, end: float) -> list[float]:
    """(ETA - actual remaining) / actual remaining at each "block k done" event from the first
    quarter of the blocks on (the last block's excluded: nothing is left to estimate)."""
    errors = []
    for e in events:
        if e.eta_seconds is None or not e.message.endswith("done") or e.stage != "quantizing":
            continue
        if e.block < num_blocks / 4 or e.block >= num_blocks:
            continue
        actual = end - e.seconds
        if actual > 0:
            errors.append((e.eta_seconds - actual) / actual)
    return errors


GPTQMODEL_CHILD = """
import json, sys, time, os
import torch
from transformers import AutoTokenizer
from worker.gptq.calibration import build_calibration
from worker.gptq.config import CalibrationSpec
model, out, n, L = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
calib = build_calibration(AutoTokenizer.from_pretrained(model), CalibrationSpec("builtin", num_samples=n, seq_length=L))
samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
import gptqmodel
began = time.perf_counter()
qconfig = gptqmodel.QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, pack_impl="original")
quantizer = gptqmodel.GPTQModel.load(model, qconfig, device="cpu")
loaded = time.perf_counter()
quantizer.quantize(samples, batch_size=8, backend=gptqmodel.BACKEND.TORCH)
quantized = time.perf_counter()
quantizer.save(out)
done = time.perf_counter()
print("RESULT " + json.dumps({"version": gptqmodel.__version__, "loading": loaded - began,
      "quantize": quantized - loaded, "save": done - quantized, "total": done - began}))
"""


def run_gptqmodel(model: str, num_samples: int, seq_length: int, out: Path) -> dict | None:
    try:
        import importlib.util

        if importlib.util.find_spec("gptqmodel") is None:
            return None
    except ValueError:
        return None
    done = subprocess.run(
        [sys.executable, "-c", GPTQMODEL_CHILD, model, str(out), str(num_samples), str(seq_length)],
        cwd=ROOT, capture_output=True, text=True, timeout=7200,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"GPTQModel failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--no-gptqmodel", action="store_true")
    args = parser.parse_args()

    import torch
    from flops import matmul_rate
    from memory import Shape, _mlp, build_model

    from tests.conftest import fixture_path

    peak = matmul_rate() / 1e9
    work = Path(tempfile.mkdtemp(prefix="gptqd-speed-"))
    shape = Shape(args.hidden, _mlp(args.hidden), args.layers)
    synthetic = work / "synthetic"
    build_model(shape, synthetic)
    models = {"tiny-gpt2-wikitext2": str(fixture_path("models", "tiny-gpt2-wikitext2")),
              shape.name: str(synthetic)}
    rows = []
    for name, path in models.items():
        load = os.getloadavg()[0]
        ours = run_ours(path, args.num_samples, args.seq_length, work / f"ours-{len(rows)}")
        ours["load_before"] = load
        load = os.getloadavg()[0]
        theirs = None if args.no_gptqmodel else run_gptqmodel(
            path, args.num_samples, args.seq_length, work / f"theirs-{len(rows)}")
        if theirs is not None:
            theirs["load_before"] = load
        rows.append((name, ours, theirs))
        print(f"{name}: ours {ours['wall_seconds']:.1f}s, GPTQModel {theirs}", file=sys.stderr, flush=True)

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"fp32 matmul 2048³: {peak:.1f} GFLOP/s; calibration {args.num_samples} x {args.seq_length} "
          "tokens; 4-bit g128 sym, no act-order\n")
    stages = ["loading", "calibration", "quantizing.capture", "quantizing.loading", "quantizing.forward",
              "quantizing.hessian", "quantizing.solve", "quantizing.packing", "quantizing.storing", "saving"]
    print("| model | " + " | ".join(stages) + " | total |")
    print("|---|" + "---:|" * (len(stages) + 1))
    for name, ours, _ in rows:
        cells = [f"{ours['stage_seconds'].get(s, 0.0):.2f}" for s in stages]
        print(f"| {name} | " + " | ".join(cells) + f" | {ours['wall_seconds']:.1f} |")
    print("\n| model | forward GFLOP/s (% of matmul) | Hessian GFLOP/s (% of matmul) | "
          "solver GFLOP/s (% of matmul) | ETA error at each block done after 1/4 of blocks |")
    print("|---|---:|---:|---:|---:|")
    for name, ours, _ in rows:
        flops = ours["flops"]
        cells = []
        for stage in ("forward", "hessian", "solve"):
            seconds = ours["stage_seconds"].get(f"quantizing.{stage}", 0.0)
            rate = flops[stage] / seconds / 1e9 if seconds else 0.0
            cells.append(f"{rate:.1f} ({100 * rate / peak:.0f}%)")
        errors = ours["eta_errors"]
        eta = ", ".join(f"{100 * e:+.0f}%" for e in errors) if errors else "n/a"
        print(f"| {name} | {' | '.join(cells)} | {eta} |")
    if any(theirs is not None for _, _, theirs in rows):
        print("\n| model | gptqd total | GPTQModel total | GPTQModel load / quantize / save | "
              "load average before (gptqd / GPTQModel) |")
        print("|---|---:|---:|---|---|")
        for name, ours, theirs in rows:
            if theirs is None or "error" in theirs:
                print(f"| {name} | {ours['wall_seconds']:.1f} s | failed | {theirs and theirs.get('error')} |")
                continue
            print(f"| {name} | {ours['wall_seconds']:.1f} s | {theirs['total']:.1f} s (v{theirs['version']}) | "
                  f"{theirs['loading']:.1f} / {theirs['quantize']:.1f} / {theirs['save']:.1f} s | "
                  f"{ours['load_before']:.1f} / {theirs['load_before']:.1f} |")


if __name__ == "__main__":
    main()
