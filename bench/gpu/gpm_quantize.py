"""GPTQModel quantizes the same model, on the same calibration windows, with the same settings
as `gptqd quantize` does in the GPU check; prints one line GPM_JSON:{...} with its times.

The windows are cut by gptqd's own calibration code (same text, count, length and seed), so
the two tools see identical token ids. Settings: sym, no act-order (nor GPTQModel's act_group_aware), true-sequential, damp.
usage: gpm_quantize.py --model DIR --calibration FILE --out DIR --num-samples N --seq-length L
                       --bits B --group-size G --damp D [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--model", "--calibration", "--out"):
        ap.add_argument(name, required=True)
    for name in ("--num-samples", "--seq-length", "--bits", "--group-size"):
        ap.add_argument(name, type=int, required=True)
    ap.add_argument("--damp", type=float, required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from worker.gptq.calibration import build_calibration
    from worker.gptq.config import CalibrationSpec

    start = time.time()
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = build_calibration(tokenizer, CalibrationSpec(
        source=args.calibration, num_samples=args.num_samples, seq_length=args.seq_length))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)}
                   for row in windows]
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=False,
                            sym=True, damp_percent=args.damp, true_sequential=True,
                            # its default reorders columns inside groups: the reference GPTQ
                            # (and gptqd) does not
                            act_group_aware=False)
    cuda = args.device.startswith("cuda")
    t_load = time.time()
    model = GPTQModel.load(args.model, config, device=args.device, dtype=torch.float16)
    t_quant = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.quantize(calibration, batch_size=1, tokenizer=tokenizer)
    if cuda:
        torch.cuda.synchronize()
    t_save = time.time()
    model.save(args.out)
    end = time.time()
    print("GPM_JSON:" + json.dumps({
        "version": gptqmodel.__version__,
        "setup_s": round(t_load - start, 2),  # import + tokenizing: not counted in total_s
        "load_s": round(t_quant - t_load, 2),
        "quantize_s": round(t_save - t_quant, 2),
        "save_s": round(end - t_save, 2),
        "total_s": round(end - t_load, 2),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "windows": list(windows.shape),
    }), flush=True)


if __name__ == "__main__":
    main()
