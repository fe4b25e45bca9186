"""Per-block peak memory of quantizing a mixture-of-experts block shaped like Qwen3-30B-A3B's
(hidden 2048, 128 experts 768 wide, 8 routed per token, GQA 32/4, head_dim 128).

One such block is built on the CPU (fp32, random weights: memory does not depend on the values)
inside a one-layer Qwen3-MoE with a small vocabulary, and quantized by the pipeline with a
BlockStore in a temporary work dir, as the worker runs it (each layer packed when solved, the
block written when done); a thread samples the process's RSS every 10 ms. Printed: the block's weights, the RSS before, the peak
during quantization, the peak minus the before (what quantizing the block costs on top of the
model), and the expert chunks the 1 GiB budget (arch.EXPERT_CHUNK_BYTES) makes.

    nice -n 10 .venv/bin/python bench/moe_memory.py [--tokens 128] [--chunk-bytes N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.gptq.arch import EXPERT_CHUNK_BYTES, get_arch
from worker.gptq.blockstore import BlockStore
from worker.gptq.config import QuantizeConfig
from worker.gptq.pipeline import quantize_model

MIB = 1024**2


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.01)


def qwen3_30b_block_model(experts: int = 128) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=1024, hidden_size=2048, num_hidden_layers=1, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=experts, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=6144, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="calibration tokens (windows of 128)")
    parser.add_argument("--chunk-bytes", type=int, default=EXPERT_CHUNK_BYTES)
    parser.add_argument("--experts", type=int, default=128, help="fewer for a quick dry run")
    args = parser.parse_args()

    model = qwen3_30b_block_model(args.experts)
    arch = get_arch(model.config).for_config(model.config, chunk_bytes=args.chunk_bytes)
    block = arch.blocks(model)[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    expert_groups = [g for g in arch.sequential if arch.is_expert(g[0])]
    sizes = sorted({len(g) for g in expert_groups})
    ids = torch.randint(0, 1024, (max(1, args.tokens // 128), 128), generator=torch.Generator().manual_seed(0))

    before = rss()
    sampler = PeakSampler()
    sampler.start()
    began = time.perf_counter()
    config = QuantizeConfig(bits=4, group_size=128)
    with tempfile.TemporaryDirectory() as work:
        store = BlockStore(Path(work), {"bench": "moe_memory"}, model, arch, config)
        result = quantize_model(model, ids, config, device="cpu", arch=arch, hooks=store)
        store.close()  # the last block's files, before the directory goes
    seconds = time.perf_counter() - began
    sampler.running = False
    sampler.join()

    experts = [m for m in result.modules if m.routed_tokens is not None]
    routed = sum(m.routed_tokens for m in experts if m.module.endswith("gate_proj"))
    print(f"block weights (fp32): {block_bytes / MIB:.0f} MiB; layers quantized: {len(result.layers)} "
          f"({len(experts)} expert linears); calibration tokens {ids.numel()}, routed {routed} "
          f"(= tokens x 8: {routed == ids.numel() * 8})")
    print(f"expert solve groups: {len(expert_groups)} (layers per group: {sizes}); "
          f"chunk budget {args.chunk_bytes / MIB:.0f} MiB")
    print(f"RSS before {before / MIB:.0f} MiB, peak {sampler.peak / MIB:.0f} MiB, "
          f"peak - before {(sampler.peak - before) / MIB:.0f} MiB; {seconds:.0f} s")


if __name__ == "__main__":
    main()
