"""The GPU check's steps, run one after another inside one deadline (started by bench/gpu.sh).

Each step is a child process with its own timeout (steprun.run); a step that fails or runs out
of time is recorded with the reason and the next one runs. After every step the table and the
JSON of all figures are rewritten (to $OUT when set), so a run cut short still reports.
Steps: env, rates, build, quantize, gptqmodel, ratio, kernel, memory8b, quality, service,
service_poisoned.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import steprun

ROOT = Path(__file__).resolve().parents[2]
SIMCARD = ROOT / "tests/simcard"  # --simulate: its sitecustomize holds the simulated card
RESERVE_S = 8  # kept back from every step for writing the table at the end
# in this order: issue 12's figures first (speed, the Triton kernel, the 8B model's memory),
# then the checks that have passed on the CPU (quality, the service runs, which may hang until
# their timeout) in what the budget leaves
STEPS = {
    "env": "environment",
    "rates": "matmul rates",
    "build": "build random Llama",
    "quantize": "gptqd quantize",
    "gptqmodel": "GPTQModel quantize",
    "ratio": "time ratio",
    "kernel": "Triton kernel vs torch loop",
    "memory8b": "8B-shaped Llama, peak memory",
    "quality": "fixture quality, device vs CPU",
    "service": "service job (gptqd up)",
    "service_poisoned": "service job, CUDA-touching preload",
}
# each step's own limit on a GPU (seconds); CPU mode multiplies them by CPU_SLOWER
LIMITS = {"env": 60, "rates": 60, "build": 120, "quantize": 200, "gptqmodel": 200, "kernel": 200,
          "memory8b": 150, "quality": 70, "service": 150, "service_poisoned": 150}
# the Triton kernel against the torch loop: their summed GPTQ losses may differ by this much
# (float sums in another order round a code the other way now and then, and the error
# feedback carries that on: equal codes are reported, not required)
KERNEL_LOSS_TOLERANCE = 0.01
CPU_SLOWER = 4
FULL = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4}
# intermediate 768, not 688: a 688-wide down_proj cannot be cut into groups of 128
SMALL = {"hidden": 256, "intermediate": 768, "layers": 2, "heads": 4, "kv_heads": 2}
# Llama-3-8B's shape (the issue: it must fit a 24 GB card); two of its 32 blocks, as a streamed
# run holds one block at a time whatever the depth (bench/memory.py: peak within 10% at 2x depth).
# The small run (CPU dry run) scales it down 8x.
LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "layers": 2, "heads": 32, "kv_heads": 8}
LLAMA_8B_SMALL = {"hidden": 512, "intermediate": 1792, "layers": 2, "heads": 4, "kv_heads": 1}
# what a 24 GiB card (RTX 3090/4090, L4, A10) leaves to the caching allocator: 2 GiB kept for the
# CUDA context, cuBLAS' workspaces and the display
CARD_24GB_USABLE = 22 * 2**30
STAGES = ("loading", "calibration", "quantizing", "saving")
SUBSTAGES = ("forward", "hessian", "solve", "packing", "storing")
QUALITY_TOLERANCE = 0.005  # perplexity after quantization, device vs CPU
# streamed vs whole-model evaluation on one device: the same operations (equal on the CPU)
STREAMED_TOLERANCE = 0.001


@dataclasses.dataclass
class Row:
    step: str
    title: str
    status: str = "SKIP"  # PASS, FAIL, SKIP, or INFO for a derived figure
    seconds: float | None = None
    summary: str = ""
    figures: dict = dataclasses.field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.status, self.summary = "FAIL", why

    def failed_run(self, outcome: steprun.Outcome | None, prefix: str = "") -> None:
        """A child that failed or ran out of time; None (never started: no time left) stays
        the SKIP that run() recorded."""
        if outcome is not None:
            self.fail(prefix + outcome.why())


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def flop(n: float, per_second: bool = False) -> str:
    """FLOPs (or FLOP/s) in T or G, whichever reads better."""
    unit = "TFLOP" if n >= 1e12 else "GFLOP"
    return f"{n / (1e12 if unit == 'TFLOP' else 1e9):.2f} {unit}" + ("/s" if per_second else "")


def marked_json(log: Path, mark: str) -> dict | None:
    """The JSON after the last line starting with mark (how the step scripts report)."""
    found = None
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(mark):
                found = line[len(mark):]
    return json.loads(found) if found else None


def read_report(out_dir: Path) -> dict | None:
    path = out_dir / "quant_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.cuda = args.device == "cuda"
        # a dry run of the cuda mode on a CPU machine: every child on tests/simcuda.py's card
        self.simulated = args.simulate
        self.scale = CPU_SLOWER if self.simulated or not self.cuda else 1
        self.shape = SMALL if args.small else FULL
        self.fixtures = Path(args.fixtures).resolve()
        self.work = Path(args.work).resolve()
        self.logs = self.work / "logs"
        self.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else self.work
        self.started = args.t0
        self.deadline = args.t0 + args.budget
        self.site = {name: Path(args.site) / name for name in ("svc", "gpm")}
        self.model_name = "llama-small" if args.small else "llama-tinyllama-shape"
        self.models_dir = self.work / "models"
        self.model = self.models_dir / self.model_name
        self.rows: list[Row] = []
        self.meta: dict = {}

    # --- running children ----------------------------------------------------------------

    def env(self, *extra: Path) -> dict[str, str]:
        """The children's environment: extra paths, carried wheels, then the checkout."""
        svc = [self.site["svc"]] if self.site["svc"].is_dir() else []
        paths = [*extra, *svc, ROOT]
        if self.simulated:
            paths.insert(len(extra), SIMCARD)  # after a step's own preload, which runs it too
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)),
               "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if not self.cuda:
            # no GPU visible at all: a CPU run must not touch one, even on a GPU machine
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["GPTQD_DEVICE"] = "cpu"
            env["GPTQMODEL_CPU_WORKERS"] = str(max(2, os.cpu_count() or 2))
        return env

    def left(self) -> float:
        return self.deadline - time.time()

    def timeout_for(self, step: str, limit: float | None = None) -> float:
        """The step's own limit (scaled on the CPU), or what the deadline leaves."""
        return min((limit or LIMITS[step]) * self.scale, self.left() - RESERVE_S)

    def run(self, row: Row, name: str, cmd: list[str], *, extra: tuple[Path, ...] = (),
            sample: bool = False, limit: float | None = None,
            variables: dict[str, str] | None = None) -> steprun.Outcome | None:
        """Runs one child for a step (log: logs/<name>.log); None when no time is left.
        variables: set in the child's environment."""
        timeout = self.timeout_for(row.step, limit)
        if timeout < 10:
            row.status, row.summary = "SKIP", "no time left before the overall deadline"
            return None
        sampler = steprun.GpuSampler(self.logs / f"{name}.smi.csv", sample and self.cuda
                                     and shutil.which("nvidia-smi") is not None)
        with sampler:
            if self.simulated and row.step == "quantize":
                # the Triton kernel in its interpreter, on the card's tensors (slow: this row
                # only); elsewhere its launch finds no driver and the torch loop runs
                variables = {"TRITON_INTERPRET": "1", **(variables or {})}
            outcome = steprun.run(cmd, env=self.env(*extra) | (variables or {}), timeout=timeout,
                                  log=self.logs / f"{name}.log", cwd=ROOT)
        row.seconds = round((row.seconds or 0) + outcome.seconds, 1)
        gpu = sampler.summary()
        if gpu:
            row.figures["gpu_util"] = gpu
        print(f"    {name}: rc={outcome.rc} in {outcome.seconds:.1f} s", flush=True)
        return outcome

    def quantize_cli(self, model: Path, out: Path, device: str, *options: str,
                     counted: bool = False) -> list[str]:
        """`gptqd quantize`; counted: with its FLOPs counted (bench/gpu/counted_cli.py)."""
        shutil.rmtree(out, ignore_errors=True)
        cli = [str(ROOT / "bench/gpu/counted_cli.py")] if counted else ["-m", "app.cli"]
        return [sys.executable, *cli, "quantize", "--model", str(model),
                # progress lines in the log say where a step that ran out of time was
                "--out", str(out), "--device", device, "--damp-percent", "0.01",
                *options]

    # --- steps ----------------------------------------------------------------------------

    def step_env(self, row: Row) -> None:
        code = (
            "import json, os, platform, torch, transformers\n"
            "svc = []\n"
            "for m in ('fastapi', 'celery', 'sqlalchemy', 'pydantic_settings', 'uvicorn'):\n"
            "    try: __import__(m)\n"
            "    except Exception as e: svc.append(f'{m}: {e}')\n"
            "cuda = torch.cuda.is_available()\n"
            "try: import triton; tv = triton.__version__\n"
            "except Exception as e: tv = f'not importable: {e}'\n"
            "print('ENV_JSON:' + json.dumps({'python': platform.python_version(),"
            " 'torch': torch.__version__, 'transformers': transformers.__version__,"
            " 'triton': tv, 'cuda': cuda, 'gpu': torch.cuda.get_device_name() if cuda else None,"
            " 'capability': torch.cuda.get_device_capability() if cuda else None,"
            " 'cpus': os.cpu_count(), 'service_deps_missing': svc}))\n"
        )
        outcome = self.run(row, "env", [sys.executable, "-c", code])
        info = outcome and marked_json(outcome.log, "ENV_JSON:")
        if not info:
            return row.failed_run(outcome)
        self.meta.update(info)
        row.figures = info
        sm = "sm_{}{}, ".format(*info["capability"]) if info["capability"] else ""
        row.summary = (f"{info['gpu'] or 'no GPU'}, {sm}torch {info['torch']}, triton "
                       f"{info['triton']}, transformers {info['transformers']}, python "
                       f"{info['python']}, {info['cpus']} CPUs")
        if info["service_deps_missing"]:
            return row.fail("service packages missing: " + "; ".join(info["service_deps_missing"]))
        if self.cuda and not info["cuda"]:
            return row.fail("torch sees no CUDA device (" + row.summary + ")")
        row.status = "PASS"

    def step_rates(self, row: Row) -> None:
        """The device's fp32 (TF32 off, as the solver runs) and fp16 matmul rates: what the
        quantize rows' FLOP rates are measured against."""
        cmd = [sys.executable, str(ROOT / "bench/flops.py"), "--device", self.device,
               *(["--size", "1024"] if self.simulated else [])]
        outcome = self.run(row, "rates", cmd)
        info = outcome and marked_json(outcome.log, "RATES_JSON:")
        if not info or outcome.rc != 0:
            return row.failed_run(outcome)
        row.figures = info
        row.status = "INFO"
        row.summary = (f"fp32 {flop(info['fp32'], True)} (TF32 off), fp32 on TF32 "
                       f"{flop(info['tf32'], True)}, fp16 {flop(info['fp16'], True)} "
                       f"({'1024' if self.simulated else '8192' if self.cuda else '2048/1024'}"
                       "-wide square matmuls, best of 10)")

    def build_model(self, row: Row, name: str, shape: dict, path: Path) -> dict | None:
        """A random fp16 Llama of this shape at path (bench/gpu/make_model.py); its figures,
        or None with the row failed."""
        shutil.rmtree(path, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "bench/gpu/make_model.py"), "--out", str(path),
               "--tokenizer", str(self.fixtures / "tokenizers/gpt2"), "--device", self.device,
               "--hidden", str(shape["hidden"]), "--intermediate", str(shape["intermediate"]),
               "--layers", str(shape["layers"]), "--heads", str(shape["heads"]),
               "--kv-heads", str(shape["kv_heads"])]
        outcome = self.run(row, name, cmd)
        info = outcome and marked_json(outcome.log, "MODEL_JSON:")
        if not info or outcome.rc != 0:
            row.failed_run(outcome, "building the model: ")
            return None
        return info

    def step_build(self, row: Row) -> None:
        info = self.build_model(row, "build", self.shape, self.model)
        if info is None:
            return
        row.figures = info
        row.status = "PASS"
        row.summary = (f"{info['params_m']:.0f}M params, {gib(info['bytes'])} on disk, "
                       f"built on {info['device']}")

    def need_model(self, row: Row) -> bool:
        if (self.model / "config.json").is_file():
            return True
        row.fail("no model: the build step failed")
        return False

    def gptqd_job(self, out: Path, model: Path | None = None) -> list[str]:
        """The issue's job: the built model (or another), 4-bit g128, the calibration windows
        asked for, its FLOPs counted."""
        return self.quantize_cli(
            model or self.model, out, self.device, "--bits", "4", "--group-size", "128",
            "--calibration", str(self.fixtures / "wikitext-2/valid.txt"),
            "--num-samples", str(self.args.num_samples), "--seq-length", str(self.args.seq_length),
            counted=True)

    def flop_rates(self, row: Row, log: Path, stages: dict) -> str:
        """The run's forward, Hessian and solve FLOP/s against the device's matmul rates (on a
        GPU the forward in the model's fp16, the Hessian sums on TF32; on the CPU all fp32; the
        solve in fp32)."""
        flops = marked_json(log, "FLOPS_JSON:")
        rates = self.row("rates").figures
        if not flops:
            return "FLOPs not counted"
        row.figures["flops"] = flops
        parts, shares = [], {}
        for stage, dtype in (("forward", "fp16" if self.cuda else "fp32"),
                             ("hessian", "tf32" if self.cuda else "fp32"), ("solve", "fp32")):
            seconds = stages.get(f"quantizing.{stage}") or 0.0
            if not seconds or not flops.get(stage):
                continue
            rate = flops[stage] / seconds
            text = f"{stage} {flop(flops[stage])} in {seconds:.2f} s = {flop(rate, True)}"
            if rates.get(dtype):
                shares[stage] = rate / rates[dtype]
                text += f" ({shares[stage]:.1%} of {dtype} matmul)"
            parts.append(text)
        row.figures["matmul_share"] = shares
        return "; ".join(parts)

    def step_quantize(self, row: Row) -> None:
        if not self.need_model(row):
            return
        out = self.work / "q-gptqd"
        outcome = self.run(row, "quantize", self.gptqd_job(out), sample=True)
        report = read_report(out) if outcome and outcome.rc == 0 else None
        if report is None:
            return row.failed_run(outcome)
        stages = report["stage_seconds"]
        peak = report.get("peak_memory") or {}
        row.figures.update({
            "wall_s": row.seconds, "duration_s": round(report["duration_seconds"], 2),
            "device": report["device"], "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
            "peak_cuda_bytes": peak.get("cuda_bytes"), "peak_rss_bytes": peak.get("rss_bytes"),
            "peak_cuda_reserved_bytes": peak.get("cuda_reserved_bytes"),
            "column_kernel": report.get("column_kernel"),
        })
        parts = [f"wall {row.seconds:.1f} s, engine {report['duration_seconds']:.1f} s ("
                 + ", ".join(f"{k} {stages[k]:.1f}" for k in STAGES if k in stages) + "; "
                 + ", ".join(f"{k} {stages['quantizing.' + k]:.1f}" for k in SUBSTAGES
                             if "quantizing." + k in stages) + ")",
                 f"peak CUDA {gib(peak.get('cuda_bytes'))} allocated, "
                 f"{gib(peak.get('cuda_reserved_bytes'))} reserved, RSS {gib(peak.get('rss_bytes'))}",
                 f"device {report['device']}, column kernel {report.get('column_kernel')}"]
        gpu = row.figures.get("gpu_util")
        if gpu:
            parts.append(f"GPU util mean {gpu['util_mean']:.0f}% max {gpu['util_max']}% "
                         f"({gpu['samples']} samples)")
        elif self.cuda:
            parts.append("GPU util not sampled (no nvidia-smi)")
        parts.append(self.flop_rates(row, outcome.log, stages))
        row.summary = "; ".join(parts)
        if not str(report["device"]).startswith(self.device):
            return row.fail(f"report says device {report['device']}, expected {self.device}; "
                            + row.summary)
        row.status = "PASS"

    def step_memory8b(self, row: Row) -> None:
        """Peak memory of the issue's job on an 8B-shaped Llama (two of its blocks, streamed):
        whether it fits a 24 GB card."""
        shape = LLAMA_8B_SMALL if self.args.small else LLAMA_8B
        model = self.models_dir / ("llama-8b-shape" + ("-small" if self.args.small else ""))
        built = self.build_model(row, "memory8b-build", shape, model)
        if built is None:
            return
        out = self.work / "q-8b"
        outcome = self.run(row, "memory8b", [*self.gptqd_job(out, model), "--load", "stream"],
                           sample=True)
        report = read_report(out) if outcome and outcome.rc == 0 else None
        shutil.rmtree(model, ignore_errors=True)  # a few GB of disk; the figures are kept
        shutil.rmtree(out, ignore_errors=True)
        if report is None:
            return row.failed_run(outcome)
        peak = report.get("peak_memory") or {}
        stages = report["stage_seconds"]
        quantizing = stages.get("quantizing", 0.0)
        allocated, reserved = peak.get("cuda_bytes"), peak.get("cuda_reserved_bytes")
        row.figures.update({"shape": shape, "params_m": built["params_m"],
                            "peak_cuda_bytes": allocated, "peak_cuda_reserved_bytes": reserved,
                            "peak_rss_bytes": peak.get("rss_bytes"), "quantizing_s": quantizing,
                            "duration_s": report["duration_seconds"]})
        per_block = quantizing / shape["layers"]
        row.summary = (f"h{shape['hidden']} i{shape['intermediate']} GQA {shape['heads']}/"
                       f"{shape['kv_heads']}, {shape['layers']} of 32 blocks streamed, "
                       f"{self.args.num_samples} x {self.args.seq_length} calibration: peak CUDA "
                       f"{gib(allocated)} allocated, {gib(reserved)} reserved, RSS "
                       f"{gib(peak.get('rss_bytes'))}; quantizing {per_block:.1f} s per block "
                       f"(32 blocks: ~{32 * per_block:.0f} s); "
                       + self.flop_rates(row, outcome.log, stages))
        if not self.cuda:
            row.status = "INFO"  # the CPU's figures say nothing about a card
            return
        if reserved is None or reserved > CARD_24GB_USABLE:
            return row.fail(f"does not fit a 24 GB card ({gib(CARD_24GB_USABLE)} usable); "
                            + row.summary)
        row.summary = f"fits a 24 GB card ({gib(CARD_24GB_USABLE)} usable); " + row.summary
        row.status = "PASS"

    def step_gptqmodel(self, row: Row) -> None:
        if self.simulated:
            row.status, row.summary = "SKIP", "simulated card: GPTQModel runs CUDA code of its own"
            return
        if not self.need_model(row):
            return
        gpm = (self.site["gpm"],) if self.site["gpm"].is_dir() else ()
        probe = self.run(row, "gptqmodel-import", [sys.executable, "-c", "import gptqmodel"],
                         extra=gpm, limit=60)
        if probe is None:
            return
        if probe.rc != 0:
            row.status = "SKIP"
            row.summary = f"GPTQModel not importable ({probe.why()})"
            return
        out = self.work / "q-gptqmodel"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "bench/gpu/gpm_quantize.py"), "--model", str(self.model),
               "--calibration", str(self.fixtures / "wikitext-2/valid.txt"), "--out", str(out),
               "--num-samples", str(self.args.num_samples),
               "--seq-length", str(self.args.seq_length), "--bits", "4", "--group-size", "128",
               "--damp", "0.01", "--device", self.device]
        outcome = self.run(row, "gptqmodel", cmd, extra=gpm, sample=True)
        info = outcome and marked_json(outcome.log, "GPM_JSON:")
        if not info or outcome.rc != 0:
            return row.failed_run(outcome)
        row.figures.update(info)
        row.status = "PASS"
        row.summary = (f"GPTQModel {info['version']}: load {info['load_s']:.1f} + quantize "
                       f"{info['quantize_s']:.1f} + save {info['save_s']:.1f} = "
                       f"{info['total_s']:.1f} s (import and tokenizing {info['setup_s']:.1f} s "
                       f"not counted), script wall {outcome.seconds:.1f} s; peak CUDA "
                       f"{gib(info['cuda_peak_bytes'])}")
        row.figures["wall_s"] = round(outcome.seconds, 1)
        gpu = row.figures.get("gpu_util")
        if gpu:
            row.summary += f"; GPU util mean {gpu['util_mean']:.0f}% max {gpu['util_max']}%"

    def step_ratio(self, row: Row) -> None:
        ours, theirs = self.row("quantize").figures, self.row("gptqmodel").figures
        if not ours.get("duration_s") or not theirs.get("total_s"):
            row.summary = "needs both quantize rows"
            return
        row.status = "INFO"
        run = ours["duration_s"] / theirs["total_s"]
        wall = ours["wall_s"] / theirs["wall_s"]
        row.figures = {"ratio": round(run, 3), "wall_ratio": round(wall, 3)}
        # the first is the issue's figure; the second counts both processes' start and imports
        row.summary = (f"gptqd duration {ours['duration_s']:.1f} s / GPTQModel load+quantize+save "
                       f"{theirs['total_s']:.1f} s = {run:.2f} (below 1: gptqd faster); whole "
                       f"processes: {ours['wall_s']:.1f} s / {theirs['wall_s']:.1f} s = {wall:.2f}")

    def step_quality(self, row: Row) -> None:
        fx = self.fixtures
        ppl = {}
        # the device's whole-model run (samples asked for: the model fits), its streamed run
        # (perplexity measured as the blocks go by: streameval.py) and the CPU's
        for label, device, load in (("device", self.device, "whole"),
                                    ("streamed", self.device, "stream"), ("cpu", "cpu", "whole")):
            out = self.work / f"q-fixture-{label}"
            cmd = self.quantize_cli(
                fx / "models/tiny-gpt2-wikitext2", out, device, "--bits", "3",
                "--group-size", "128", "--calibration", str(fx / "wikitext-2/valid.txt"),
                "--num-samples", "32", "--seq-length", "128",
                "--eval-text", str(fx / "wikitext-2/test.txt"),
                "--eval-max-windows", str(self.args.eval_windows), "--load", load)
            outcome = self.run(row, f"quality-{label}", cmd)
            report = read_report(out) if outcome and outcome.rc == 0 else None
            if report is None or report.get("perplexity_after") is None:
                return row.failed_run(outcome, f"{device} run: ")
            if not str(report["device"]).startswith(device):
                return row.fail(f"{device} run's report says device {report['device']}")
            ppl[label] = (report["perplexity_before"], report["perplexity_after"])
        gap = abs(ppl["device"][1] - ppl["cpu"][1]) / ppl["cpu"][1]
        streamed_gap = max(abs(s - w) / w for s, w in zip(ppl["streamed"], ppl["device"], strict=True))
        row.figures = ({"perplexity_" + k: v for k, v in ppl.items()}
                       | {"rel_gap": gap, "streamed_rel_gap": streamed_gap})
        row.status = "PASS" if gap <= QUALITY_TOLERANCE and streamed_gap <= STREAMED_TOLERANCE else "FAIL"
        row.summary = (f"tiny-gpt2-wikitext2 3-bit g128, 32 x 128 calibration, wikitext-2 test "
                       f"({self.args.eval_windows} x 128 tokens) ppl before -> after: "
                       f"{self.device} run {ppl['device'][0]:.3f} -> {ppl['device'][1]:.3f}, "
                       f"cpu run {ppl['cpu'][0]:.3f} -> {ppl['cpu'][1]:.3f}; after differs by "
                       f"{gap:.3%} (limit {QUALITY_TOLERANCE:.1%}); {self.device} streamed "
                       f"{ppl['streamed'][0]:.3f} -> {ppl['streamed'][1]:.3f}, differs from "
                       f"the whole model's by {streamed_gap:.4%} (limit {STREAMED_TOLERANCE:.2%})")

    def service(self, row: Row, poisoned: bool) -> None:
        if not self.need_model(row):
            return
        data = self.work / ("svc-poisoned" if poisoned else "svc")
        shutil.rmtree(data, ignore_errors=True)
        preload = []
        if poisoned:
            preload = [ROOT / "bench/gpu_preload", ROOT / "tests/forkpoison"]
            preload += [self.site["gpm"]] if self.site["gpm"].is_dir() else []  # its torchao
        cmd = [sys.executable, str(ROOT / "bench/gpu/service_job.py"),
               "--models-dir", str(self.models_dir), "--model", self.model_name,
               "--data-dir", str(data), "--expect-device", self.device,
               "--calibration", str(self.fixtures / "wikitext-2/valid.txt"),
               # its own deadline a little inside the step's, to stop the box cleanly
               "--timeout", str(self.timeout_for(row.step) - 5)]
        for path in preload:
            cmd += ["--preload", str(path)]
        outcome = self.run(row, row.step, cmd, sample=True)
        info = outcome and marked_json(outcome.log, "SVC_JSON:")
        if not info:
            return row.failed_run(outcome)
        row.figures = info | row.figures
        arts = info.get("artifacts") or []
        metrics = info.get("metrics") or {}
        parts = [f"up in {info.get('up_s')} s", f"job {info.get('status')} in {info.get('job_s')} s"]
        if arts:
            size = sum(a["size"] for a in arts)
            big = max(arts, key=lambda a: a["size"])
            parts.append(f"{len(arts)} artifacts, {size / 2**20:.1f} MiB, largest {big['name']} "
                         f"sha256 {big['sha256'][:12]}…")
        if metrics.get("device"):
            parts.append(f"metrics.device {metrics['device']}")
        if poisoned:
            parts.append(f"preload active in {info.get('preload_processes')} processes"
                         + (f" ({info['preload_first'].split(': ', 1)[-1]})"
                            if info.get("preload_first") else ""))
        row.summary = "; ".join(parts)
        if poisoned and not info.get("preload_processes"):
            return row.fail("the preload never ran (bench/gpu_preload not imported); " + row.summary)
        if not info.get("ok"):
            return row.fail(f"{info.get('reason')}; " + row.summary)
        row.status = "PASS"

    def step_service(self, row: Row) -> None:
        self.service(row, poisoned=False)

    def step_service_poisoned(self, row: Row) -> None:
        self.service(row, poisoned=True)

    def step_kernel(self, row: Row) -> None:
        """The quantize row ran the default (auto: the Triton kernel once it passed its check
        on the card); the same job again with the torch loop: solve time, loss, codes."""
        if not self.cuda:
            row.status = "INFO"
            row.summary = ("GPU only (the kernel is checked against the torch loop on the CPU by "
                           "Triton's interpreter in tests/unit)")
            return
        base = self.work / "q-gptqd"
        kernel_report = read_report(base)
        if not self.need_model(row):
            return
        if kernel_report is None:
            return row.fail("needs the gptqd quantize row's checkpoint")
        used = kernel_report.get("column_kernel", "?")
        if not used.startswith("triton"):  # the quantize row already timed the loop
            return row.fail(f"the default run did not use the Triton kernel: {used}")
        out = self.work / "q-loop"
        outcome = self.run(row, "loop", self.gptqd_job(out), sample=True,
                           variables={"GPTQD_COLUMN_KERNEL": "torch"})
        report = read_report(out) if outcome and outcome.rc == 0 else None
        if report is None:
            return row.failed_run(outcome)
        same, words = same_words(base, out)
        solve = kernel_report["stage_seconds"].get("quantizing.solve", 0.0)
        loop_solve = report["stage_seconds"].get("quantizing.solve", 0.0)
        loss, loop_loss = (sum(m["loss"] for m in r["modules"]) for r in (kernel_report, report))
        gap = abs(loss - loop_loss) / max(loop_loss, 1e-30)
        row.figures.update({"column_kernel": used, "duration_s": round(report["duration_seconds"], 2),
                            "solve_s": solve, "loop_solve_s": loop_solve,
                            "same_words": same / max(1, words), "loss": loss, "loop_loss": loop_loss})
        row.summary = (f"quantize row: {used}; engine {kernel_report['duration_seconds']:.1f} s "
                       f"(solve {solve:.1f} s) against the torch loop's "
                       f"{report['duration_seconds']:.1f} s (solve {loop_solve:.1f} s); summed GPTQ "
                       f"loss {loss:.4g} vs {loop_loss:.4g} ({gap:.2%}, limit "
                       f"{KERNEL_LOSS_TOLERANCE:.0%}); qweight words equal to the loop's: "
                       f"{same / max(1, words):.2%}; the loop's "
                       + self.flop_rates(row, outcome.log, report["stage_seconds"]))
        row.status = "PASS" if gap <= KERNEL_LOSS_TOLERANCE else "FAIL"

    # --- the whole run --------------------------------------------------------------------

    def row(self, step: str) -> Row:
        return next((r for r in self.rows if r.step == step), Row(step, step))

    def main(self, steps: list[str]) -> int:
        shutil.rmtree(self.logs, ignore_errors=True)  # logs are appended to: none from a last run
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        for step in steps:
            row = Row(step, STEPS[step])
            self.rows.append(row)
            print(f"=== {time.strftime('%H:%M:%S')} {row.title} "
                  f"({self.left():.0f} s left)", flush=True)
            method: Callable[[Row], None] = getattr(self, f"step_{step}")
            try:
                method(row)
            except Exception as exc:  # a bug in this script must not stop the steps after it
                traceback.print_exc()
                row.fail(f"check script error: {type(exc).__name__}: {exc}")
            print(f"    {row.status}: {row.summary}", flush=True)
            self.save()
        print(self.table(), flush=True)
        return 0 if all(r.status in ("PASS", "INFO") for r in self.rows) else 1

    def heading(self) -> str:
        s, m = self.shape, self.meta
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"gptqd GPU check, device {self.device}{self.dry_run_note()}: "
            f"random Llama h{s['hidden']} i{s['intermediate']} L{s['layers']} GQA "
            f"{s['heads']}/{s['kv_heads']} fp16, 4-bit g128 damp 0.01, "
            f"{self.args.num_samples} x {self.args.seq_length} calibration tokens (wikitext-2 valid); "
            f"{m.get('gpu') or 'no GPU'}, torch {m.get('torch')}, commit {commit()}, {when}; "
            f"{time.time() - self.started:.0f} s of a {self.args.budget:.0f} s budget"
        )

    def dry_run_note(self) -> str:
        if self.simulated:
            return " (simulated card on the CPU, tests/simcuda.py: not GPU figures)"
        return "" if self.cuda else " (CPU dry run)"

    def table(self) -> str:
        lines = [self.heading(), "", "| step | result | time | figures, or why it failed |",
                 "|---|---|---:|---|"]
        for r in self.rows:
            secs = "" if r.seconds is None else f"{r.seconds:.1f} s"
            text = r.summary.replace("|", "/").replace("\n", " ")
            lines.append(f"| {r.title} | {r.status} | {secs} | {text} |")
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        (self.out / "gpu_table.md").write_text(self.table())
        doc = {"heading": self.heading(), "device": self.device, "shape": self.shape,
               "calibration": [self.args.num_samples, self.args.seq_length], "env": self.meta,
               "rows": [dataclasses.asdict(r) for r in self.rows]}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
        # the logs' ends only: $OUT brings back 8 files, and GPTQModel prints megabytes
        with (self.out / "gpu_logs.txt").open("w") as f:
            for log in sorted(self.logs.glob("*.log"), key=lambda p: p.stat().st_mtime):
                text = log.read_text(errors="replace")
                f.write(f"===== {log.name} ({len(text)} chars, last 4000)\n{text[-4000:]}\n")


def same_words(a: Path, b: Path) -> tuple[int, int]:
    """(equal, all) int32 words of the qweight tensors in two checkpoint directories (either
    may be sharded)."""
    from safetensors import safe_open

    def qweights(directory: Path) -> dict[str, Path]:
        where = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
            where.update({k: path for k in names if k.endswith(".qweight")})
        return where

    def read(path: Path, key: str):
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)

    same = total = 0
    theirs = qweights(b)
    for key, path in qweights(a).items():
        x = read(path, key)
        y = read(theirs[key], key) if key in theirs else None
        if y is not None and x.shape == y.shape:
            same += int((x == y).sum())
        total += x.numel()
    return same, total


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--simulate", action="store_true",
                    default=os.environ.get("GPU_CHECK_SIMULATE", "") not in ("", "0"),
                    help="the cuda mode on a CPU machine, on a simulated card (implies --small; "
                         "env GPU_CHECK_SIMULATE=1)")
    ap.add_argument("--small", action="store_true",
                    default=os.environ.get("GPU_CHECK_SMALL", "") not in ("", "0"),
                    help="h256 i768 2 layers, 32 x 256 calibration (env GPU_CHECK_SMALL=1)")
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--seq-length", type=int)
    ap.add_argument("--eval-windows", type=int,
                    help="perplexity windows (of 128 tokens) in the quality step (256; small: 64)")
    ap.add_argument("--budget", type=float, help="overall seconds (default 470; CPU 1800)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, in order")
    ap.add_argument("--fixtures", default=os.environ.get("GPTQD_FIXTURES", ""))
    ap.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/gptqd-gpu-check"))
    ap.add_argument("--site", default=os.environ.get("GPU_CHECK_SITE", "/tmp/gptqd-gpu-site"))
    ap.add_argument("--t0", type=float, default=float(os.environ.get("GPU_CHECK_T0") or time.time()),
                    help="when the run started (bench/gpu.sh passes its own start)")
    args = ap.parse_args()
    if args.simulate:
        args.small, args.device = True, "cuda"
        args.budget = args.budget or 2400
    args.num_samples = args.num_samples or (32 if args.small else 128)
    args.seq_length = args.seq_length or (256 if args.small else 512)
    args.eval_windows = args.eval_windows or (64 if args.small else 256)
    args.budget = args.budget or (470 if args.device == "cuda" else 1800)
    if not args.fixtures:
        carried = ROOT / ".gpu/fixtures"
        args.fixtures = carried if carried.is_dir() else ROOT.parent / "shared/fixtures"
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    return Check(args).main(chosen)


if __name__ == "__main__":
    sys.exit(main())
