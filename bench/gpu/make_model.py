"""Builds a random-weight Llama (fp16 safetensors) with the GPT-2 tokenizer beside it.

The weights are random: the GPU check times the engine on a model of a real model's shape,
it does not judge quality on it (the fixture step does that).
usage: make_model.py --out DIR --tokenizer DIR [--hidden 2048 --intermediate 5632 --layers 22
                     --heads 32 --kv-heads 4] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    start = time.time()
    torch.manual_seed(args.seed)
    vocab = json.loads((args.tokenizer / "vocab.json").read_text(encoding="utf-8"))
    eos = vocab.get("<|endoftext|>", len(vocab) - 1)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=len(vocab),
        max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos,
        tie_word_embeddings=False, dtype="float16",
    )
    # fp16 from the start and on the target device: a 1.1B model built in fp32 on the CPU
    # would take 4.4 GB and most of this check's time budget
    torch.set_default_dtype(torch.float16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).is_file():
            shutil.copy(args.tokenizer / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print("MODEL_JSON:" + json.dumps({
        "params_m": round(params / 1e6, 1), "hidden": args.hidden,
        "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
        "kv_heads": args.kv_heads, "vocab": len(vocab), "dtype": "float16",
        "device": args.device, "seconds": round(time.time() - start, 1),
        "bytes": sum(f.stat().st_size for f in args.out.iterdir()),
    }), flush=True)


if __name__ == "__main__":
    main()
