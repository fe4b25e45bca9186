"""Quality of a quantized mixture of experts against round-to-nearest and GPTQModel 7.6.0, and
the tensor names each writes, on the small Mixtral trained on TinyStories (bench/moe_train.py).

Every method quantizes the same model with the same calibration windows (32 x 128 tokens of
the training text) and is measured on the held-out TinyStories text (29 x 128 tokens), each
checkpoint read back by our loader. Printed: a markdown table of held-out perplexity per
setting, and whether gptqd's checkpoint holds exactly the tensor names GPTQModel's does.

    PYTHONPATH=. GPTQMODEL_CPU_WORKERS=2 nice -n 10 .venv/bin/python bench/moe_quality.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.peer_patches import transformers_restored
from tests.trained_moe import HELD_OUT_TEXT, TRAIN_TEXT, MoeSpec, tokenizer, trained_moe, windows
from worker.gptq.arch import get_arch
from worker.gptq.config import QuantizeConfig
from worker.gptq.evaluate import rtn_quantize_model, window_perplexity
from worker.gptq.export import save_checkpoint
from worker.gptq.loader import load_quantized, weight_files
from worker.gptq.pipeline import quantize_model

SETTINGS = [(4, 32), (3, 32), (2, 32)]
CALIBRATION_WINDOWS = 32


def tensor_names(checkpoint: Path) -> set[str]:
    names: set[str] = set()
    for file in weight_files(checkpoint):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def ours(model: torch.nn.Module, calib: torch.Tensor, config: QuantizeConfig, out: Path) -> Path:
    quantized = copy.deepcopy(model)
    result = quantize_model(quantized, calib, config, device="cpu")
    save_checkpoint(quantized, tokenizer(), result, config, out, arch=get_arch(quantized))
    return out


def gptqmodel(source: Path, calib: torch.Tensor, config: QuantizeConfig, out: Path) -> Path:
    import gptqmodel as gm

    samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    qconfig = gm.QuantizeConfig(bits=config.bits, group_size=config.group_size, sym=config.sym,
                                desc_act=config.desc_act, pack_impl="original")
    with transformers_restored():  # its MoE class patches stay out of our later runs
        quantizer = gm.GPTQModel.load(str(source), qconfig, device="cpu")
        quantizer.quantize(samples, batch_size=4, backend=gm.BACKEND.TORCH)
        quantizer.save(str(out))
    return out


def held_out_ppl(checkpoint: Path, held: torch.Tensor) -> float:
    model, _ = load_quantized(checkpoint, dtype=torch.float32)
    return window_perplexity(model, held)


def main() -> None:
    from transformers import AutoModelForCausalLM

    source = trained_moe(MoeSpec())
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    calib = windows(TRAIN_TEXT, MoeSpec().seq)[:CALIBRATION_WINDOWS]
    held = windows(HELD_OUT_TEXT, MoeSpec().seq)
    rows = [f"| full precision (fp32) | {window_perplexity(model, held):.3f} | | |"]
    same_names = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in SETTINGS:
            config = QuantizeConfig(bits=bits, group_size=group)
            rtn = copy.deepcopy(model)
            rtn_quantize_model(rtn, config)
            ours_dir = ours(model, calib, config, Path(tmp) / f"gptqd-{bits}")
            peer_dir = gptqmodel(source, calib, config, Path(tmp) / f"gptqmodel-{bits}")
            rows.append(f"| {bits}-bit g{group} | {held_out_ppl(ours_dir, held):.3f} | "
                        f"{held_out_ppl(peer_dir, held):.3f} | {window_perplexity(rtn, held):.3f} |")
            mine, theirs = tensor_names(ours_dir), tensor_names(peer_dir)
            same_names.append(mine == theirs)
            if mine != theirs:
                print(f"{bits}-bit: only gptqd: {sorted(mine - theirs)[:6]}; "
                      f"only GPTQModel: {sorted(theirs - mine)[:6]}")
    print("| setting | gptqd GPTQ | GPTQModel 7.6.0 | RTN |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"same tensor names as GPTQModel's checkpoint: {all(same_names)} "
          f"({len(mine)} tensors, e.g. {sorted(n for n in mine if '.experts.0.' in n)[:4]})")


if __name__ == "__main__":
    main()
