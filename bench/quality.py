"""Perplexity of the original, RTN and GPTQ on the real fixture models: the quality table.

    .venv/bin/python bench/quality.py [--fixtures DIR] [--models NAME ...] [--json-out FILE]

For each model: calibration windows and eval windows are built once; RTN (round-to-nearest
on the same layers and groups) and GPTQ run on fresh copies of the fp32 model; every GPTQ
result is also saved as a checkpoint and reloaded with our loader ("GPTQ reloaded": fp16
non-quantized tensors, as any GPTQ loader sees it). The last column is the share of RTN's
perplexity increase over the original that GPTQ removes. Perplexity follows worker.gptq.evaluate's
protocol. Settings: 4-bit and 3-bit with groups, 4-bit per channel, act-order off and on.
tiny-gpt2-wikitext2: calibration wikitext-2 valid.txt, eval test.txt, group 128.
babyllama-tok105: TinyStories; calibration = the CS336 sample + the first 9 stories of the
valid excerpt, eval = its last 10 stories (no story in both), group 32 (352 = 11 x 32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.gptq.calibration import build_calibration  # noqa: E402
from worker.gptq.config import CalibrationSpec, QuantizeConfig  # noqa: E402
from worker.gptq.evaluate import (  # noqa: E402
    eval_windows,
    load_texts,
    perplexity_of_copy,
    rtn_quantize_model,
    window_perplexity,
)
from worker.gptq.export import save_checkpoint  # noqa: E402
from worker.gptq.loader import load_quantized  # noqa: E402
from worker.gptq.modelio import load_model  # noqa: E402
from worker.gptq.pipeline import quantize_model  # noqa: E402

DEFAULT_FIXTURES = Path(os.environ.get("GPTQD_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@dataclass(frozen=True)
class Fixture:
    name: str
    group: int
    calib_samples: int
    calib_seq: int
    eval_seq: int


FIXTURES = (
    Fixture("tiny-gpt2-wikitext2", group=128, calib_samples=128, calib_seq=256, eval_seq=256),
    Fixture("babyllama-tok105", group=32, calib_samples=96, calib_seq=128, eval_seq=256),
)


def text_files(fixture: Fixture, root: Path, tmp: Path) -> tuple[Path, Path]:
    """(calibration file, eval file) for a fixture model; never the same text in both."""
    if fixture.name == "tiny-gpt2-wikitext2":
        return root / "wikitext-2" / "valid.txt", root / "wikitext-2" / "test.txt"
    stories = (root / "tinystories" / "tinystories_valid_excerpt.txt").read_text().splitlines()
    sample = (root / "tinystories" / "tinystories_sample_cs336.txt").read_text()
    calib, held_out = tmp / "tinystories_calib.txt", tmp / "tinystories_eval.txt"
    calib.write_text(sample.replace("<|endoftext|>", "\n") + "\n" + "\n".join(stories[:9]) + "\n")
    held_out.write_text("\n".join(stories[9:]) + "\n")
    return calib, held_out


def settings(group: int) -> list[tuple[str, QuantizeConfig]]:
    rows = []
    for label, bits, g in ((f"4-bit g{group}", 4, group), (f"3-bit g{group}", 3, group),
                           ("4-bit per-channel", 4, -1)):
        for desc_act in (False, True):
            rows.append((label, QuantizeConfig(bits=bits, group_size=g, desc_act=desc_act)))
    return rows


def run_fixture(fixture: Fixture, root: Path, tmp: Path) -> dict:
    calib_file, eval_file = text_files(fixture, root, tmp)
    loaded = load_model(str(root / "models" / fixture.name))
    model, tokenizer = loaded.model, loaded.tokenizer
    calib_ids = build_calibration(tokenizer, CalibrationSpec(
        source=str(calib_file), num_samples=fixture.calib_samples, seq_length=fixture.calib_seq,
    ))
    windows = eval_windows(tokenizer, load_texts(str(eval_file)), fixture.eval_seq)
    original = window_perplexity(model, windows)
    rows, rtn_cache = [], {}
    for label, config in settings(fixture.group):
        began = time.perf_counter()
        if label not in rtn_cache:  # RTN ignores act-order: one number per bits/group
            rtn_cache[label] = perplexity_of_copy(model, windows, lambda m, c=config: rtn_quantize_model(m, c))
        out = tmp / f"{fixture.name}-{config.bits}-{config.group_size}-{config.desc_act}"
        holder = {}

        def gptq(m, config=config, holder=holder):
            holder["result"] = quantize_model(m, calib_ids, config, device="cpu")
            holder["model"] = m

        gptq_ppl = perplexity_of_copy(model, windows, gptq)
        save_checkpoint(holder["model"], tokenizer, holder["result"], config, out)
        reloaded, _ = load_quantized(out)
        rows.append({
            "setting": label,
            "desc_act": config.desc_act,
            "rtn": rtn_cache[label],
            "gptq": gptq_ppl,
            "gptq_reloaded": window_perplexity(reloaded, windows),
            "seconds": time.perf_counter() - began,
        })
        print(f"  {fixture.name} {label} desc_act={config.desc_act}: RTN {rows[-1]['rtn']:.3f} "
              f"GPTQ {gptq_ppl:.3f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return {
        "model": fixture.name,
        "calibration": f"{calib_file.name}: {fixture.calib_samples} x {fixture.calib_seq} tokens",
        "eval": f"{eval_file.name}: {windows.shape[0]} windows of {fixture.eval_seq} tokens",
        "original": original,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"**{result['model']}** (calibration {result['calibration']}; eval {result['eval']})",
        "",
        "| setting | desc_act | original | RTN | GPTQ | GPTQ reloaded | RTN's increase GPTQ removes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    original = result["original"]
    for row in result["rows"]:
        removed = (row["rtn"] - row["gptq"]) / (row["rtn"] - original) if row["rtn"] != original else 0.0
        lines.append(
            f"| {row['setting']} | {'on' if row['desc_act'] else 'off'} | {original:.3f} | "
            f"{row['rtn']:.3f} | {row['gptq']:.3f} | {row['gptq_reloaded']:.3f} | {removed:.0%} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--models", nargs="*", default=[f.name for f in FIXTURES])
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--render", type=Path, nargs="*", help="only print tables from --json-out files")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    if args.render:
        results = [r for path in args.render for r in json.loads(path.read_text())]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for fixture in FIXTURES:
                if fixture.name in args.models:
                    results.append(run_fixture(fixture, args.fixtures, Path(tmp)))
    print("\n\n".join(markdown(r) for r in results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    worse = [(r["model"], row["setting"], row["desc_act"]) for r in results for row in r["rows"]
             if row["gptq"] >= row["rtn"]]
    if worse:
        print(f"\nGPTQ did not beat RTN at: {worse}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
