"""Wall time, peak memory and time per stage of one `quantize()` run, as a markdown table.

    .venv/bin/python bench/quantize.py [--model DIR] [--calibration SRC] [--bits 4] ...

Defaults: the tiny-gpt2-wikitext2 fixture, calibrated on wikitext-2 valid.txt, 128 windows of
256 tokens, 4-bit g128, on the CPU. Runs the same entry point as `gptqd quantize` and the worker
(worker.gptq.api.quantize), into a temporary directory unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from worker.gptq.api import quantize  # noqa: E402
from worker.gptq.config import CalibrationSpec, QuantizeConfig  # noqa: E402

FIXTURES = Path(os.environ.get("GPTQD_FIXTURES", ROOT.parent / "shared" / "fixtures"))
DEFAULT_MODEL = FIXTURES / "models" / "tiny-gpt2-wikitext2"
DEFAULT_CALIBRATION = FIXTURES / "wikitext-2" / "valid.txt"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| measure | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act)
    calibration = CalibrationSpec(
        source=args.calibration, num_samples=args.num_samples, seq_length=args.seq_length
    )
    rss_before = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "ckpt"
        began = time.perf_counter()
        report = quantize(args.model, out, config, calibration, device=args.device)
        wall = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    rows = [
        ("model", Path(args.model).name),
        ("settings", f"{args.bits}-bit g{args.group_size}, desc_act={args.desc_act}, "
                     f"{args.num_samples} x {args.seq_length} calibration tokens"),
        ("device / threads", f"{args.device} / {torch.get_num_threads()}"),
        ("quantized modules", f"{len(report.modules)} in {report.num_blocks} blocks"),
        ("wall time", f"{wall:.1f} s"),
        ("peak RSS (process)", mib(peak)),
        ("RSS before the run (imports)", mib(rss_before)),
        ("checkpoint size", f"{report.sizes.get('checkpoint_bytes', 0) / 2**20:.2f} MiB"),
    ]
    rows += [(f"stage: {stage}", f"{seconds:.2f} s") for stage, seconds in report.stage_seconds.items()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
