"""Peak memory of `gptqd quantize` against model size and depth (issue 6).

Builds random fp16 Llama models from a config straight into safetensors, one shard per decoder
block (never the whole model in memory), then runs `gptqd quantize` on each in a subprocess and
reads its peak RSS from the kernel (os.wait4's ru_maxrss: the high-water mark of the process,
not a sample). Rows:

  * two models of the same width, one with twice the layers of the other (target: peak RSS
    within 10% of each other);
  * one model of >= 1 GB of fp16 weights (target: peak RSS < half the model size plus the
    calibration activations);
  * with --eager, the small pair again with the whole model loaded (--load whole), the
    behaviour before lazy loading, for comparison;
  * with --eval, every run also measures perplexity before and after quantization (streamed
    runs as the blocks go by, streameval.py);
  * "imports only": the RSS of the interpreter with torch, transformers and the engine
    imported, which every run pays before touching a weight.

    .venv/bin/python bench/memory.py [--big-layers 10] [--no-tinyllama] [--eager] [--eval] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_SAMPLES, SEQ_LENGTH = 16, 256
EVAL_WINDOWS = 16


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int = 128  # the babyllama character tokenizer: the blocks dominate the size
    heads: int = 16
    kv_heads: int | None = None  # grouped-query attention when fewer than heads
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"llama h{self.hidden} i{self.intermediate} x{self.layers}"


# TinyLlama-1.1B's shape (2.2 GB in fp16): a model people quantize on a box like this one
TINYLLAMA = Shape(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4,
                  label="TinyLlama-1.1B shape (h2048 x22, GQA 32/4, vocab 32000)")


def build_model(shape: Shape, directory: Path, seed: int = 0) -> int:
    """Write a random fp16 Llama of this shape; returns its weight bytes."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from tests.conftest import fixture_path
    from worker.gptq.modelio import skeleton

    config = tf.LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads, vocab_size=shape.vocab, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="float16",
    )
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(fixture_path("models", "babyllama-tok105")).save_pretrained(directory)
    shapes = {name: tuple(p.shape) for name, p in skeleton(config).named_parameters()}
    generator = torch.Generator().manual_seed(seed)

    def make(name: str, size: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(size, dtype=torch.float16)
        return (torch.randn(size, generator=generator) * 0.02).to(torch.float16)

    def shard_of(name: str) -> str:
        parts = name.split(".")
        return f"block-{int(parts[2]):03d}.safetensors" if parts[1] == "layers" else "rest.safetensors"

    weight_map: dict[str, str] = {}
    for name in shapes:
        weight_map[name] = shard_of(name)
    total = 0
    for shard in sorted(set(weight_map.values())):
        tensors = {n: make(n, shapes[n]) for n, s in weight_map.items() if s == shard}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def build_in_child(shape: Shape, directory: Path) -> int:
    """build_model in a child process: this one must stay small (see peak_rss)."""
    code = ("import sys, json; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from memory import Shape, build_model; "
            "from pathlib import Path; build_model(Shape(**json.loads(sys.argv[3])), Path(sys.argv[4]))")
    fields = json.dumps(dataclasses.asdict(shape))
    subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(ROOT), fields, str(directory)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return _size(directory)


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a child process, from the kernel's own high-water mark.

    That mark counts the parent's too: the child is forked (vfork: it runs in the parent's
    memory until exec), and exec records the high-water mark of the memory it leaves. A
    measuring process that built a 2.2 GB model itself had a 1063 MiB mark, which every
    child then reported (the child's own: 849 MiB). So models are built in a child
    (build_in_child) and main() checks that its own mark stays below every row."""
    began = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({child.returncode}):\n{stderr[-3000:]}")
    return usage.ru_maxrss * 1024, seconds


GPTQD = ROOT / ".venv/bin/gptqd"


def quantize_argv(model: Path, out: Path, eager: bool, gptqd: Path = GPTQD, evaluate: bool = False) -> list[str]:
    """evaluate: perplexity before and after on EVAL_WINDOWS held-out windows (and samples,
    which only the whole model gives)."""
    return [str(gptqd), "quantize", "--model", str(model), "--out", str(out),
            "--num-samples", str(NUM_SAMPLES), "--seq-length", str(SEQ_LENGTH),
            "--device", "cpu", "--no-progress", "--load", "whole" if eager else "stream",
            *(["--eval-text", "builtin-heldout", "--eval-max-windows", str(EVAL_WINDOWS)] if evaluate else [])]


def activation_bytes(shape: Shape) -> int:
    """The calibration hidden states held between blocks: inputs and outputs, fp32."""
    return 2 * NUM_SAMPLES * SEQ_LENGTH * shape.hidden * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-hidden", type=int, default=1024)
    parser.add_argument("--small-layers", type=int, default=4)
    parser.add_argument("--big-hidden", type=int, default=2048)
    parser.add_argument("--big-layers", type=int, default=10)
    parser.add_argument("--no-tinyllama", action="store_true", help="skip the 2.2 GB TinyLlama-shaped model")
    parser.add_argument("--eager", action="store_true", help="also run with the whole model loaded")
    parser.add_argument("--eval", action="store_true",
                        help=f"measure perplexity before/after too ({EVAL_WINDOWS} held-out windows)")
    parser.add_argument("--keep", type=Path, help="build the models here and keep them")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per model: each row shows every run and the target is judged "
                             "on the highest")
    parser.add_argument("--gptqd", type=Path, default=GPTQD,
                        help="the gptqd to measure, e.g. from a venv with only the service's own "
                             "dependencies (the dev venv's interop extra adds torchao, ~80 MiB)")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gptqd-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    h, b = args.small_hidden, args.big_hidden
    shapes = [
        Shape(h, _mlp(h), args.small_layers),
        Shape(h, _mlp(h), 2 * args.small_layers),
        *([Shape(b, _mlp(b), args.big_layers)] if args.big_layers else []),  # 0: none
    ] + ([] if args.no_tinyllama else [TINYLLAMA])
    python = args.gptqd.parent / "python"
    # what every run pays before touching a weight: the engine, transformers' model classes
    imports = [str(python), "-c", "import torch, transformers, worker.gptq.api, app.cli; "
               "from transformers import LlamaForCausalLM"]
    baseline, _ = peak_rss(imports)
    rows = []
    try:
        for shape in shapes:
            model = work / re.sub(r"[^A-Za-z0-9.-]+", "_", shape.name)
            size = build_in_child(shape, model) if not model.exists() else _size(model)
            # the whole-model comparison only on the small pair: the big ones would take long
            for eager in ([False, True] if args.eager and shape in shapes[:2] else [False]):
                runs = []
                for _ in range(max(1, args.repeat)):
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(peak_rss(quantize_argv(model, out, eager, args.gptqd, args.eval)))
                    print(f"{shape.name} {'eager' if eager else 'lazy'}: {runs[-1][0] / 2**20:.0f} MiB "
                          f"in {runs[-1][1]:.0f}s", file=sys.stderr, flush=True)
                mode = "whole model" if eager else "lazy (gptqd quantize)"
                rows.append((shape, size, mode + (" + evaluation" if args.eval else ""),
                             [rss for rss, _ in runs], max(seconds for _, seconds in runs)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    mib = 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # see peak_rss
    if any(own >= min(peaks) for _, _, _, peaks, _ in rows):
        print(f"warning: this process peaked at {own / mib:.0f} MiB, which the children's figures "
              "include: rows at or below it are not their own", file=sys.stderr)
    evaluation = f"; evaluation: {EVAL_WINDOWS} x {SEQ_LENGTH} tokens before and after" if args.eval else ""
    print(f"calibration: {NUM_SAMPLES} x {SEQ_LENGTH} tokens, 4-bit g128, CPU{evaluation}; gptqd: {args.gptqd}; "
          f"RSS of the imports alone: {baseline / mib:.0f} MiB; the measuring process's own peak: "
          f"{own / mib:.0f} MiB\n")
    print("| model | layers | fp16 weights | mode | peak RSS (each run) | highest - imports | target | time |")
    print("|---|---:|---:|---|---:|---:|---|---:|")
    for shape, size, mode, peaks, seconds in rows:
        rss = max(peaks)
        target = ""
        if size >= 10**9 and mode.startswith("lazy"):
            limit = size / 2 + activation_bytes(shape)
            target = f"< {limit / mib:.0f} MiB: {'met' if rss < limit else 'missed'}"
        each = " / ".join(f"{p / mib:.0f}" for p in peaks)
        print(f"| {shape.name} | {shape.layers} | {size / mib:.0f} MiB | {mode} | {each} MiB | "
              f"{(rss - baseline) / mib:.0f} MiB | {target} | {seconds:.0f} s |")
    lazy = [r for r in rows if r[2].startswith("lazy")]
    if len(lazy) >= 2:
        ratio = max(lazy[1][3]) / max(lazy[0][3]) - 1
        print(f"\n{lazy[1][0].layers} vs {lazy[0][0].layers} layers (lazy): peak RSS differs by "
              f"{100 * ratio:+.1f}% (target < 10%)")


def _mlp(hidden: int) -> int:
    """Llama's MLP width (~2.75 x hidden), a multiple of the group size 128."""
    return -(-hidden * 11 // 4 // 128) * 128


def _size(model: Path) -> int:
    return json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


if __name__ == "__main__":
    main()
