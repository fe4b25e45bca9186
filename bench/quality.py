"""What gptqd's checkpoints lose next to GPTQModel's, measured fairly: the quality table.

    .venv/bin/python bench/quality.py [--seeds 0 1 2 3] [--models NAME ...] [--json-out FILE]
    .venv/bin/python bench/quality.py --calibration-study [--json-out FILE]
    .venv/bin/python bench/quality.py --render FILE ...

Fair means: for each fixture and seed the calibration windows are built once (token ids,
32 x 128, by gptqd's default preparation of the calibration file) and the very same tensor is
given to every tool; every checkpoint is read back by one judge (bench/judge.py: its own
unpacker, written from the format notes) and scored by the mean KL of its next-token
distribution to the original model's on held-out text, and by perplexity. Damping 0.01 for
all (gptqd's default; GPTQModel's own default is 0.05). Rows: 4- and 3-bit, act-order off
and on, groups 128 and 32 on tiny-gpt2-wikitext2 and 32 only on babyllama-tok105 (its MLP
width 352 is not a multiple of 128). Columns: gptqd with its defaults (group-aware reordering
where act-order is off), gptqd without it, GPTQModel 7.x with its defaults (act_group_aware
on where desc_act is off) and without it, RTN (no calibration). The ratio column is gptqd's
defaults over GPTQModel's defaults, mean KL; the target is <= 0.95 on every row.

--calibration-study: which preparation of a calibration file loses least (layouts x
placements of worker.gptq.calibration.Preparation, for the .txt file and for the same text
as .jsonl records), gptqd defaults at 3-bit, act-order off, every seed.

Fixtures (never the same text in calibration and evaluation): tiny-gpt2-wikitext2 calibrates
on wikitext-2 valid.txt, is judged on test.txt; babyllama-tok105 calibrates on the first 10
stories of tinystories_valid_excerpt.txt, is judged on the other 9 and the CS336 sample.
Judged on up to EVAL_WINDOWS windows of 128 tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default pool is too small on 2 cores

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.judge import Loss, dequantized_layers, log_probs, loss_of, with_weights  # noqa: E402
from worker.gptq.calibration import (  # noqa: E402
    LAYOUTS,
    PLACEMENTS,
    Preparation,
    build_calibration,
    read_file_rows,
)
from worker.gptq.config import CalibrationSpec, QuantizeConfig  # noqa: E402
from worker.gptq.evaluate import eval_windows, load_texts, rtn_quantize_model  # noqa: E402
from worker.gptq.export import save_checkpoint  # noqa: E402
from worker.gptq.pipeline import quantize_model  # noqa: E402

DEFAULT_FIXTURES = Path(os.environ.get("GPTQD_FIXTURES", ROOT.parent / "shared" / "fixtures"))
SAMPLES, SEQ, EVAL_SEQ, EVAL_WINDOWS = 32, 128, 128, 128
DAMP = 0.01


@dataclass(frozen=True)
class Fixture:
    name: str
    groups: tuple[int, ...]


FIXTURES = (Fixture("tiny-gpt2-wikitext2", (128, 32)), Fixture("babyllama-tok105", (32,)))


@dataclass(frozen=True)
class Setting:
    bits: int
    group: int
    desc_act: bool

    @property
    def label(self) -> str:
        return f"{self.bits}-bit g{self.group} desc_act {'on' if self.desc_act else 'off'}"


def text_files(fixture: Fixture, root: Path, tmp: Path) -> tuple[Path, Path]:
    """(calibration file, eval file)."""
    if fixture.name == "tiny-gpt2-wikitext2":
        return root / "wikitext-2" / "valid.txt", root / "wikitext-2" / "test.txt"
    stories = (root / "tinystories" / "tinystories_valid_excerpt.txt").read_text().splitlines(keepends=True)
    calib, held_out = tmp / "tinystories_calib.txt", tmp / "tinystories_eval.txt"
    calib.write_text("".join(stories[:10]))
    held_out.write_text("".join(stories[10:]) + "\n"
                        + (root / "tinystories" / "tinystories_sample_cs336.txt").read_text())
    return calib, held_out


def as_records(text_file: Path, tmp: Path) -> Path:
    """The file's paragraphs (blank-line separated; for one-story-per-line text, its lines)
    as .jsonl records, unstripped: what an uploaded or hub dataset of that text looks like."""
    rows = read_file_rows(text_file, "text")
    if len(rows) < 4:
        rows = text_file.read_text().splitlines()
    path = tmp / f"{text_file.stem}.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows if row.strip()))
    return path


class Bench:
    """One fixture: its model, tokenizer, eval windows and the original's log-probabilities."""

    def __init__(self, fixture: Fixture, root: Path, tmp: Path) -> None:
        self.fixture, self.tmp = fixture, tmp
        self.model_dir = root / "models" / fixture.name
        self.calib_file, eval_file = text_files(fixture, root, tmp)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.windows = eval_windows(self.tokenizer, load_texts(str(eval_file)), EVAL_SEQ, EVAL_WINDOWS)
        self.reference = log_probs(self.model, self.windows)
        self.fp = loss_of(self.reference, self.reference, self.windows)

    def calibration(self, seed: int, preparation: Preparation = Preparation(), source: Path | None = None) -> torch.Tensor:
        spec = CalibrationSpec(source=str(source or self.calib_file), num_samples=SAMPLES, seq_length=SEQ, seed=seed)
        return build_calibration(self.tokenizer, spec, preparation)

    def judge_checkpoint(self, checkpoint: Path) -> Loss:
        model = with_weights(copy.deepcopy(self.model), dequantized_layers(checkpoint))
        return loss_of(self.reference, log_probs(model, self.windows), self.windows)

    def judge_in_memory(self, change: Callable[[torch.nn.Module], object]) -> Loss:
        model = copy.deepcopy(self.model)
        change(model)
        return loss_of(self.reference, log_probs(model, self.windows), self.windows)

    def gptqd(self, calib: torch.Tensor, config: QuantizeConfig) -> Loss:
        """Our engine's path (what `gptqd quantize` runs after building the windows)."""
        out = Path(tempfile.mkdtemp(dir=self.tmp))
        model = copy.deepcopy(self.model)
        result = quantize_model(model, calib, config, device="cpu")
        save_checkpoint(model, self.tokenizer, result, config, out)
        return self.judge_checkpoint(out)

    def gptqmodel(self, calib: torch.Tensor, setting: Setting, group_aware: bool | None) -> Loss:
        """GPTQModel on the same windows; group_aware None = its default."""
        import gptqmodel

        out = Path(tempfile.mkdtemp(dir=self.tmp))
        extra = {} if group_aware is None else {"act_group_aware": group_aware}
        qconfig = gptqmodel.QuantizeConfig(
            bits=setting.bits, group_size=setting.group, desc_act=setting.desc_act, sym=True,
            damp_percent=DAMP, format="gptq", pack_impl="original", **extra,
        )
        samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
        quantizer = gptqmodel.GPTQModel.load(str(self.model_dir), qconfig, device="cpu")
        quantizer.quantize(samples, batch_size=8, backend=gptqmodel.BACKEND.TORCH)
        quantizer.save(str(out))
        return self.judge_checkpoint(out)


METHODS = ("gptqd", "gptqd_no_gar", "gptqmodel", "gptqmodel_no_gar", "rtn")


def run_setting(bench: Bench, setting: Setting, seeds: list[int], methods: tuple[str, ...]) -> dict:
    config = QuantizeConfig(bits=setting.bits, group_size=setting.group, desc_act=setting.desc_act,
                            damp_percent=DAMP)
    losses: dict[str, list[Loss]] = {m: [] for m in methods}
    for seed in seeds:
        calib = bench.calibration(seed)
        began = time.perf_counter()
        if "gptqd" in methods:
            losses["gptqd"].append(bench.gptqd(calib, config))
        if "gptqd_no_gar" in methods and not setting.desc_act:
            losses["gptqd_no_gar"].append(bench.gptqd(calib, QuantizeConfig(
                **{**config.to_dict(), "act_group_aware": False})))
        if "gptqmodel" in methods:
            losses["gptqmodel"].append(bench.gptqmodel(calib, setting, None))
        if "gptqmodel_no_gar" in methods and not setting.desc_act:
            losses["gptqmodel_no_gar"].append(bench.gptqmodel(calib, setting, False))
        if "rtn" in methods and seed == seeds[0]:  # no calibration: one number
            losses["rtn"].append(bench.judge_in_memory(lambda m: rtn_quantize_model(m, config)))
        print(f"  {bench.fixture.name} {setting.label} seed {seed}: "
              + ", ".join(f"{m} {v[-1].kl:.5f}" for m, v in losses.items() if v)
              + f" ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    return {"setting": setting.label, "bits": setting.bits, "group": setting.group,
            "desc_act": setting.desc_act,
            "kl": {m: [x.kl for x in v] for m, v in losses.items() if v},
            "ppl": {m: [x.ppl for x in v] for m, v in losses.items() if v}}


def run_table(root: Path, tmp: Path, models: list[str], seeds: list[int], methods: tuple[str, ...]) -> list[dict]:
    results = []
    for fixture in FIXTURES:
        if fixture.name not in models:
            continue
        bench = Bench(fixture, root, tmp)
        rows = [run_setting(bench, Setting(bits, group, desc), seeds, methods)
                for group in fixture.groups for bits in (4, 3) for desc in (False, True)]
        results.append({"kind": "table", "model": fixture.name, "fp_ppl": bench.fp.ppl,
                        "eval": f"{bench.windows.shape[0]} x {EVAL_SEQ} tokens", "seeds": seeds,
                        "rows": rows})
    return results


def run_calibration_study(root: Path, tmp: Path, models: list[str], seeds: list[int]) -> list[dict]:
    """KL of gptqd's defaults per preparation of the same text, as a file and as records."""
    results = []
    for fixture in FIXTURES:
        if fixture.name not in models:
            continue
        bench = Bench(fixture, root, tmp)
        records = as_records(bench.calib_file, tmp)
        bits, group = 3, fixture.groups[0]
        config = QuantizeConfig(bits=bits, group_size=group, damp_percent=DAMP)
        # records: a layout only changes how rows are stripped, so one placement
        preparations = [(bench.calib_file, Preparation(layout, placement))
                        for layout in LAYOUTS for placement in PLACEMENTS]
        preparations += [(records, Preparation(layout, "random")) for layout in LAYOUTS]
        rows = []
        for source, prep in preparations:
            kls = [bench.gptqd(bench.calibration(s, prep, source), config).kl for s in seeds]
            rows.append({"bits": bits, "group": group, "source": source.suffix,
                         "layout": prep.layout, "placement": prep.placement, "kl": kls})
            print(f"  {fixture.name} {bits}-bit {source.suffix} {prep.layout} {prep.placement}: "
                  f"{statistics.mean(kls):.5f}", file=sys.stderr, flush=True)
        results.append({"kind": "calibration", "model": fixture.name, "seeds": seeds, "rows": rows})
    return results


def merged(results: list[dict]) -> list[dict]:
    """Tables of the same model from several runs (e.g. some columns on fewer seeds) as one."""
    out: list[dict] = []
    for result in results:
        same = next((r for r in out if r["kind"] == result["kind"] == "table"
                     and r["model"] == result["model"]), None)
        if same is None:
            out.append(json.loads(json.dumps(result)))
            continue
        rows = {row["setting"]: row for row in same["rows"]}
        for row in result["rows"]:
            for measure in ("kl", "ppl"):
                rows[row["setting"]][measure].update(row[measure])
        same["seeds"] = sorted(set(same["seeds"]) | set(result["seeds"]))
    return out


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.5f}"
    return f"{statistics.mean(values):.5f} ({min(values):.5f}-{max(values):.5f})"


def markdown(result: dict) -> str:
    if result["kind"] == "calibration":
        lines = [f"**{result['model']}**, calibration preparations, gptqd defaults, act-order off, "
                 f"mean KL to fp (range) over seeds {result['seeds']}", "",
                 "| bits g | source | layout | placement | KL |", "|---|---|---|---|---:|"]
        lines += [f"| {r['bits']} g{r['group']} | {r['source']} | {r['layout']} | {r['placement']} | "
                  f"{_spread(r['kl'])} |" for r in result["rows"]]
        return "\n".join(lines)
    lines = [f"**{result['model']}** (fp perplexity {result['fp_ppl']:.3f}; judged on {result['eval']}; "
             f"seeds {result['seeds']}): mean KL to fp (range), perplexity", "",
             "| setting | gptqd | gptqd, GAR off | GPTQModel | GPTQModel, GAR off | RTN | gptqd / GPTQModel |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        kl, ppl = row["kl"], row["ppl"]
        cells = [f"{_spread(kl[m])}, {statistics.mean(ppl[m]):.2f}" if kl.get(m) else "-" for m in METHODS]
        ratio = (f"{statistics.mean(kl['gptqd']) / statistics.mean(kl['gptqmodel']):.3f}"
                 if kl.get("gptqd") and kl.get("gptqmodel") else "-")
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--models", nargs="*", default=[f.name for f in FIXTURES])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration-study", action="store_true")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--render", type=Path, nargs="*", help="only print tables from --json-out files")
    parser.add_argument("--threads", type=int, help="torch threads (1 runs two benches side by side best)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        results = merged([r for path in args.render for r in json.loads(path.read_text())])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if args.calibration_study:
                results = run_calibration_study(args.fixtures, Path(tmp), args.models, args.seeds)
            else:
                results = run_table(args.fixtures, Path(tmp), args.models, args.seeds, tuple(args.methods))
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n\n".join(markdown(r) for r in results))
    worse = [(r["model"], row["setting"]) for r in results if r["kind"] == "table" for row in r["rows"]
             if row["kl"].get("rtn") and row["kl"].get("gptqd")
             and statistics.mean(row["kl"]["gptqd"]) >= row["kl"]["rtn"][0]]
    if worse:
        print(f"\nGPTQ did not beat RTN at: {worse}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
