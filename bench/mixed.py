"""What per-layer rules (`dynamic`) buy: loss against bits per weight.

    nice .venv/bin/python bench/mixed.py --threads 1 [--seeds 0 1] [--models NAME ...]

For each fixture of bench/quality.py (same calibration windows, same judge: mean KL of the
next-token distribution to the original model's on held-out text, and perplexity) the rows
quantize with gptqd's defaults at 3 and 4 bits, alone and with rules that give the MLP's output
projection (Llama `down_proj`, GPT-2 `mlp.c_proj`) more bits, or the first and last blocks.
"bits/weight" is what the quantized layers cost on disk (codes, zeros, scales, g_idx) per
weight they stand for: the price of a rule, next to what it saves.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bench.judge import dequantized_layers, log_probs, loss_of, with_weights  # noqa: E402
from bench.quality import DAMP, DEFAULT_FIXTURES, FIXTURES, Bench  # noqa: E402
from worker.gptq.config import QuantizeConfig  # noqa: E402
from worker.gptq.export import save_checkpoint  # noqa: E402
from worker.gptq.pipeline import quantize_model  # noqa: E402

# the MLP's output projection and the outer blocks, by family (module names as transformers has them)
DOWN = {"babyllama-tok105": r"+:.*\.mlp\.down_proj", "tiny-gpt2-wikitext2": r"+:.*\.mlp\.c_proj"}
OUTER = {"babyllama-tok105": r"+:model\.layers\.(0|{last})\.", "tiny-gpt2-wikitext2": r"+:transformer\.h\.(0|{last})\."}


def rows_for(fixture: str, blocks: int) -> list[tuple[str, int, dict]]:
    """(label, bits, rules)."""
    down, outer = DOWN[fixture], OUTER[fixture].format(last=blocks - 1)
    return [
        ("3-bit", 3, {}),
        ("3-bit, MLP output at 4", 3, {down: {"bits": 4}}),
        ("3-bit, MLP output at 8", 3, {down: {"bits": 8}}),
        ("3-bit, first and last block at 4", 3, {outer: {"bits": 4}}),
        ("4-bit", 4, {}),
        ("4-bit, MLP output at 8", 4, {down: {"bits": 8}}),
    ]


def bits_per_weight(checkpoint: Path) -> float:
    """Bits on disk of the quantized layers' tensors per weight they stand for."""
    stored, weights = 0, 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    tensor = f.get_tensor(key)
                    stored += tensor.numel() * tensor.element_size() * 8
                    if key.endswith(".qweight"):
                        weights += f.get_tensor(key[: -len("qweight")] + "g_idx").numel() * tensor.shape[1]
    return stored / weights


def measure(bench: Bench, calib: torch.Tensor, config: QuantizeConfig, tmp: Path) -> tuple[float, float, float]:
    """(KL, perplexity, bits per weight) of gptqd's checkpoint with these settings."""
    out = Path(tempfile.mkdtemp(dir=tmp))
    model = copy.deepcopy(bench.model)
    result = quantize_model(model, calib, config, device="cpu")
    save_checkpoint(model, bench.tokenizer, result, config, out)
    judged = with_weights(copy.deepcopy(bench.model), dequantized_layers(out))
    loss = loss_of(bench.reference, log_probs(judged, bench.windows), bench.windows)
    return loss.kl, loss.ppl, bits_per_weight(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--models", nargs="*", default=[f.name for f in FIXTURES])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for fixture in FIXTURES:
            if fixture.name not in args.models:
                continue
            bench = Bench(fixture, args.fixtures, Path(tmp))
            blocks = bench.model.config.num_hidden_layers
            group = fixture.groups[-1]
            lines = [f"**{fixture.name}** (fp perplexity {bench.fp.ppl:.3f}; group size {group}; "
                     f"seeds {args.seeds}): mean KL to fp (range over seeds), perplexity", "",
                     "| setting | bits/weight | KL | perplexity |", "|---|---:|---:|---:|"]
            for label, bits, rules in rows_for(fixture.name, blocks):
                config = QuantizeConfig(bits=bits, group_size=group, damp_percent=DAMP, dynamic=rules)
                runs = [measure(bench, bench.calibration(seed), config, Path(tmp)) for seed in args.seeds]
                kls = [r[0] for r in runs]
                lines.append(f"| {label} | {runs[0][2]:.2f} | {statistics.mean(kls):.5f} "
                             f"({min(kls):.5f}-{max(kls):.5f}) | {statistics.mean(r[1] for r in runs):.3f} |")
                print(f"  {fixture.name} {label}: KL {statistics.mean(kls):.5f}", file=sys.stderr, flush=True)
            tables.append("\n".join(lines))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
