"""quantize(): the one call the CLI and the worker make.

load config -> check family and every layer's shape on a weightless skeleton (refuse before
any download or work) -> load tokenizer and weights -> calibration windows -> (perplexity of
the original) -> GPTQ block by block -> (perplexity of the quantized model) -> checkpoint in
out_dir, with the report. Progress goes to one callback with a fraction over the whole run;
should_stop() is honoured between stages and between modules (progress.Cancelled).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from worker.gptq import __version__
from worker.gptq.arch import ArchSpec, validate_layers
from worker.gptq.blockstore import BlockStore
from worker.gptq.calibration import build_calibration, check_source
from worker.gptq.columnkernel import choice as column_kernel_choice
from worker.gptq.columnkernel import describe as describe_column_kernel
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.download import OnTransfer, Transfer, size_text
from worker.gptq.errors import CalibrationError, DiskFull, EngineError, OutOfMemory
from worker.gptq.memory import return_freed_memory
from worker.gptq.modelio import (
    LoadedModel,
    compute_dtype,
    config_dtype,
    hub_snapshot,
    load_config,
    load_model,
    load_tokenizer,
    skeleton,
)
from worker.gptq.pipeline import default_device, quantize_model
from worker.gptq.progress import Cancelled, ProgressCallback, ProgressEvent, StepCallback
from worker.gptq.residency import WHOLE_MODEL_SHARE, samples_skipped, wants_samples
from worker.gptq.residency import choose as choose_residency

# rough share of a run's time per stage, for the whole-run fraction in progress events
STAGE_WEIGHTS = {"loading": 5, "calibration": 3, "evaluating_before": 4, "quantizing": 74,
                 "evaluating_after": 6, "saving": 8}


# a run that only scores a model (`gptqd eval`, a verification): its share per stage, reading
# the model (a hub download) then the windows (and any sample text, at the end)
SCORING_STAGE_ENDS = {"loading": 0.1, "evaluating": 1.0}
# a model scored against a reference (scoring.score_against): each one's load and pass
COMPARING_STAGE_ENDS = {"loading": 0.05, "loading_reference": 0.1, "evaluating": 0.55,
                        "evaluating_reference": 1.0}


def stage_ends(with_evaluation: bool) -> dict[str, float]:
    """The fraction of the whole run reached at the end of each stage."""
    weights = {k: w for k, w in STAGE_WEIGHTS.items() if with_evaluation or "evaluating" not in k}
    total, done, ends = sum(weights.values()), 0, {}
    for stage, weight in weights.items():
        done += weight
        ends[stage] = done / total
    return ends


@dataclass
class QuantizeReport:
    model: str
    revision: str | None
    model_type: str
    out_dir: str
    config: dict
    calibration: dict
    device: str
    num_blocks: int = 0
    modules: list[dict] = field(default_factory=list)  # per module: name, loss, damp, seconds...
    stage_seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    # how far the quantized model's next-token distributions are from the original's on the
    # same windows (evaluate.Divergence): mean KL in nats, share of equal top-1 tokens
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    evaluation: dict | None = None  # eval source, windows, samples before/after
    peak_memory: dict[str, int] = field(default_factory=dict)
    duration_seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    lazy: bool = False  # weights were read block by block and finished blocks streamed to disk
    column_kernel: str = ""  # what ran the per-column steps: "torch" or "triton" (columnkernel.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quantize(
    model: str,
    out_dir: Path,
    config: QuantizeConfig,
    calibration: CalibrationSpec,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
    device: str | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Any = None,  # evaluate.EvalSpec
    work_dir: Path | None = None,
    lazy: bool | None = None,
    whole_model_share: float = WHOLE_MODEL_SHARE,
) -> QuantizeReport:
    """Quantize a hub model or local directory with GPTQ and write the checkpoint to out_dir.

    work_dir: where finished blocks are kept (see blockstore); a rerun with the same work_dir
    and the same model, settings and calibration resumes after the last finished block. It is
    emptied once the checkpoint is written.
    lazy: read the weights block by block and stream finished blocks to disk, so memory holds
    one block instead of the model (perplexity is measured on the way; greedy samples need
    the whole model and are skipped). None (default) = whenever the model has safetensors
    weights (a local directory, or a hub model's files in the hub cache), unless samples are
    asked for and the whole model takes at most whole_model_share of the memory free
    (residency.py).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EngineError(f"output directory {out_dir} is not empty; choose a new one")
    run = RunProgress(progress, should_stop, stage_ends(evaluate is not None))
    compute = compute_device(device)
    column_kernel_choice()  # a misspelt GPTQD_COLUMN_KERNEL fails here, not at the first solve
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)

    with run.stage("loading"):
        # text files first: a wrong path must not cost the minutes a large model takes to load
        check_source(calibration.source, "calibration")
        if evaluate is not None:
            check_source(evaluate.source, "eval text")
        hf_config, arch = load_config(
            model, revision=revision, token=token, trust_remote_code=trust_remote_code
        )
        shape = skeleton(hf_config, trust_remote_code=trust_remote_code)
        validate_layers(shape, arch, config)
        _check_context(hf_config, calibration.seq_length, "calibration")
        if evaluate is not None:
            _check_context(hf_config, evaluate.seq_length, "evaluation")
        residency = choose_residency(lazy, evaluate, shape, compute, whole_model_share)
        if residency.stream:
            # before the first large allocation: one made earlier under glibc's default
            # (dynamic) mmap threshold can land in the brk heap, which then held ~150 MiB more
            # at every block's peak in about half the runs (bench/README.md)
            return_freed_memory()
        common = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
        on_transfer = run.transfer_reporter(model)
        loaded = None
        if residency.stream:
            loaded, why = open_streamed(model, hf_config, arch, compute, common, on_transfer)
            if loaded is None and lazy:
                raise EngineError(f"lazy loading is not possible for {model}: {why}")
        if loaded is None:
            if not residency.stream and not Path(model).expanduser().is_dir():
                # a hub model's files (open_streamed fetched them when it was tried), with
                # progress; from_pretrained then reads the cache
                hub_snapshot(model, **common, on_transfer=on_transfer)
            loaded = load_model(
                model,
                # on the CPU fp32 is both faster and exact; on a GPU keep the checkpoint's dtype
                dtype=torch.float32 if compute.type == "cpu" else "auto",
                config=hf_config,
                **common,
            )
    streamed = loaded.lazy is not None
    store = None
    if work_dir is not None or streamed:
        store = BlockStore(
            Path(work_dir) if work_dir is not None else _temporary_work_dir(out_dir),
            _fingerprint(model, revision, config, calibration, compute,
                         evaluate if streamed else None),
            loaded.model, arch, config, loaded.lazy, compact=compute.type == "cpu",
        )
        if store.discarded:
            run.emit("loading", run.fraction, f"work dir not resumed from: {store.discarded}")
    try:
        return _quantize_loaded(
            model, revision, out_dir, config, calibration, loaded, hf_config, arch, compute,
            run, should_stop, evaluate, store, residency.why,
        )
    finally:
        if loaded.lazy is not None:
            loaded.lazy.close()
        if store is not None:
            store.close()  # whoever acts on the work dir next finds no write under way
            if work_dir is None:
                store.clear()


def _quantize_loaded(
    model: str,
    revision: str | None,
    out_dir: Path,
    config: QuantizeConfig,
    calibration: CalibrationSpec,
    loaded: LoadedModel,
    hf_config: Any,
    arch: Any,
    compute: torch.device,
    run: RunProgress,
    should_stop: Callable[[], bool] | None,
    evaluate: Any,
    store: BlockStore | None,
    why_streamed: str = "",
) -> QuantizeReport:
    """calibration -> (evaluation) -> quantizing -> (evaluation) -> saving, on a loaded model
    (a streamed one evaluates during quantizing, streameval.py)."""
    report = QuantizeReport(
        model=model,
        revision=revision,
        model_type=hf_config.model_type,
        out_dir=str(out_dir),
        config=config.to_dict(),
        calibration=dataclasses.asdict(calibration),
        device=str(compute),
        versions=_versions(),
    )
    with run.stage("calibration"):
        calib_ids = build_calibration(loaded.tokenizer, calibration)

    streamed = loaded.lazy is not None
    evaluation = None
    if evaluate is not None:
        evaluation = _Evaluation(evaluate, loaded.tokenizer, loaded.model, arch, streamed, why_streamed)
    if evaluation is not None and not streamed:
        with run.stage("evaluating", "evaluating_before", message="original model"):
            evaluation.measure(loaded.model, "before", compute,
                               run.steps("evaluating", "batch", "evaluating_before"))

    with run.stage("quantizing"):
        result = quantize_model(
            loaded.model,
            calib_ids,
            config,
            device=compute,
            progress=run.nested("quantizing"),
            should_stop=should_stop,
            arch=arch,
            hooks=store,
            passengers=evaluation.passengers if evaluation is not None else None,
        )
    report.num_blocks = result.num_blocks
    report.modules = [m.to_dict() for m in result.modules]
    report.column_kernel = describe_column_kernel(compute, config.block_size)

    if evaluation is not None:
        with run.stage("evaluating", "evaluating_after", message="quantized model"):
            if streamed:
                evaluation.score_streamed(loaded.lazy, compute)
            else:
                evaluation.measure(loaded.model, "after", compute,
                                   run.steps("evaluating", "batch", "evaluating_after"))
        # whether the score is on text the Hessians never saw (say so when it is not)
        report.evaluation = {**evaluation.summary,
                             "held_out": evaluate.source != calibration.source}
        for key in ("perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement"):
            setattr(report, key, evaluation.summary.get(key))

    with run.stage("saving"):
        from worker.gptq.export import save_checkpoint

        report.stage_seconds = run.seconds(result.stage_seconds)
        files = save_checkpoint(
            loaded.model, loaded.tokenizer, result, config, out_dir, arch=arch,
            report=report.to_dict(), stored=store.stored() if store is not None else None,
            on_written=run.steps("saving", _writing, min_step=0.01),
        )
        report.files = sorted({str(Path(p).relative_to(out_dir)) for p in files})
        report.sizes = _sizes(loaded.model, hf_config, result, out_dir)
    report.stage_seconds = run.seconds(result.stage_seconds)
    report.duration_seconds = run.elapsed()
    report.peak_memory = _peak_memory(compute)
    report.lazy = loaded.lazy is not None
    _rewrite_report_file(out_dir, report)
    if store is not None:
        store.clear()  # the checkpoint is complete: nothing left to resume
    run.emit("done", 1.0, "checkpoint written")
    return report


# where a streamed run reads the next block while solving this one: on a GPU the card would
# otherwise wait on the disk; on the CPU host memory is the limit streaming exists for
READ_AHEAD_DEVICES = ("cuda",)


def _writing(done: int, total: int) -> str:
    return f"writing the checkpoint: {size_text(done)} of {size_text(total)}"


def open_streamed(
    model: str, hf_config: Any, arch: Any, compute: torch.device, common: dict[str, Any],
    on_transfer: OnTransfer | None = None,
) -> tuple[LoadedModel | None, str]:
    """The model with only embeddings/norms/head read, or None and why that is not possible.
    on_transfer hears how a hub model's download goes."""
    from worker.gptq.lazyload import open_lazy

    dtype = compute_dtype(hf_config, compute)
    directory = Path(model).expanduser()
    if not directory.is_dir():  # a hub id (load_config found it): its files in the hub cache
        directory = hub_snapshot(model, **common, on_transfer=on_transfer)
        if directory is None:
            return None, "the hub model has no safetensors weights"
    lazy, why = open_lazy(directory, hf_config, arch, dtype,
                          trust_remote_code=common["trust_remote_code"],
                          read_ahead=compute.type in READ_AHEAD_DEVICES)
    if lazy is None:
        return None, why
    tokenizer = load_tokenizer(model, **common)
    return LoadedModel(model=lazy.model, tokenizer=tokenizer, arch=arch, source=model, lazy=lazy), ""


def _temporary_work_dir(out_dir: Path) -> Path:
    """Next to out_dir (same disk, which has room for the checkpoint); removed at the end."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.work-", dir=out_dir.parent))


def _fingerprint(
    model: str, revision: str | None, config: QuantizeConfig, calibration: CalibrationSpec,
    compute: torch.device, evaluate: Any = None,
) -> dict[str, Any]:
    """What must be equal for a work dir's blocks to be reused: the model (and its weight
    files, if local), the settings, the calibration, the kind of device and, for a streamed
    evaluation (whose hidden states are saved with each block), its windows."""
    local = Path(model).expanduser()
    files = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    return {
        "model": model,
        "revision": revision,
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "config": config.to_dict(),
        "calibration": dataclasses.asdict(calibration),
        "device": compute.type,
        "gptqd": __version__,
        **({"evaluation": [evaluate.source, evaluate.text_field, evaluate.seq_length,
                           evaluate.max_windows]} if evaluate is not None else {}),
    }


class RunProgress:
    """Stage timing, progress events with a whole-run fraction, cancellation, error mapping."""

    def __init__(
        self,
        progress: ProgressCallback | None,
        should_stop: Callable[[], bool] | None,
        ends: dict[str, float],
    ) -> None:
        self.progress, self.should_stop, self.ends = progress, should_stop, ends
        self.start = time.perf_counter()
        self.stage_seconds: dict[str, float] = {}
        self.fraction = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def seconds(self, pipeline: dict[str, float]) -> dict[str, float]:
        """Own stages plus the pipeline's breakdown of quantizing (capture/forward/...)."""
        return {**self.stage_seconds, **{f"quantizing.{k}": v for k, v in pipeline.items()}}

    def emit(self, stage: str, fraction: float, message: str = "") -> None:
        self.fraction = max(self.fraction, fraction)
        if self.progress is not None:
            self.progress(
                ProgressEvent(stage=stage, fraction=self.fraction, seconds=self.elapsed(),
                              message=message, stage_seconds=dict(self.stage_seconds))
            )

    def nested(self, stage: str) -> ProgressCallback:
        """The pipeline's events, its 0..1 fraction mapped onto this stage's share."""
        low, high = self.fraction, self.ends[stage]

        def forward(event: ProgressEvent) -> None:
            self.fraction = max(self.fraction, low + (high - low) * event.fraction)
            if self.progress is not None:
                self.progress(
                    dataclasses.replace(
                        event,
                        fraction=self.fraction,
                        seconds=self.elapsed(),
                        stage_seconds={**self.stage_seconds, **event.stage_seconds},
                    )
                )

        return forward

    def transfer_reporter(self, model: str, key: str = "loading") -> OnTransfer:
        """A hub download's progress as loading events (the bytes move the fraction through
        most of the stage, `key` in ends); raises Cancelled, which stops the download, once
        the run is no longer wanted."""
        low, high = self.fraction, self.ends[key]

        def report(transfer: Transfer) -> None:
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"quantization cancelled while downloading {model}")
            share = transfer.done / transfer.total if transfer.total else 1.0
            self.emit("loading", low + (high - low) * 0.9 * share, transfer.describe(model))

        return report

    def steps(self, stage: str, what: str | Callable[[int, int], str], key: str | None = None,
              with_eta: bool = False, min_step: float = 0.0) -> StepCallback:
        """A stage's steps (i of n) as events, the fraction moving through the stage's share:
        blocks as block i/n, other steps in the message ('batch i of n', or what(i, n));
        with_eta, the time left of the stage from its pace so far (where the stage ends the
        run); min_step, the least share of the stage between two events (the last one always)."""
        low, high, began = self.fraction, self.ends[key or stage], time.perf_counter()
        shown = -1.0

        def report(done: int, total: int) -> None:
            nonlocal shown
            self.fraction = max(self.fraction, low + (high - low) * done / total)
            if self.progress is None or (done < total and done / total - shown < min_step):
                return
            shown = done / total
            blocks = what == "block"
            if blocks:
                message = ""
            else:
                message = what(done, total) if callable(what) else f"{what} {done} of {total}"
            pace = (time.perf_counter() - began) / done
            self.progress(ProgressEvent(
                stage=stage, fraction=self.fraction, seconds=self.elapsed(),
                block=done if blocks else None, num_blocks=total if blocks else None,
                message=message, eta_seconds=pace * (total - done) if with_eta else None,
                stage_seconds=dict(self.stage_seconds)))

        return report

    @contextmanager
    def stage(self, stage: str, key: str | None = None, message: str = "") -> Iterator[None]:
        key = key or stage
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"quantization cancelled before {stage}")
        self.emit(stage, self.fraction, message)
        began = time.perf_counter()
        try:
            yield
        except (EngineError, Cancelled):
            raise
        except BaseException as exc:
            mapped = map_resource_error(exc, stage)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self.stage_seconds[key] = self.stage_seconds.get(key, 0.0) + time.perf_counter() - began
        self.fraction = max(self.fraction, self.ends[key])


def map_resource_error(exc: BaseException, stage: str) -> EngineError | None:
    """Out of memory and a full disk, as errors that say what to do; None for anything else."""
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in text
    ):
        # what holds the memory: the evaluation's windows while evaluating, else calibration's
        lower = ("max_windows or seq_length of the evaluation" if stage == "evaluating" else
                 "num_samples or seq_length of the calibration")
        return OutOfMemory(
            f"ran out of memory while {stage}: lower {lower}, or use a machine with more "
            f"memory ({type(exc).__name__}{_device_numbers(text)})"
        )
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in text:
        # loading writes only to the hub cache (a downloaded model); later stages to the output
        where = ("in the hub cache (HF_HOME or HF_HUB_CACHE: the model is downloaded there), or "
                 "point it at a larger disk" if stage == "loading" else
                 "or write to another output directory")
        return DiskFull(f"no space left on device while {stage}: free disk space {where} ({exc})")
    return None


def _device_numbers(text: str) -> str:
    """What a CUDA out-of-memory error says of the GPU: the allocation that failed, the card's
    capacity and what was free (torch's own sentences), for the job's error message."""
    keep = [s for s in text.split(". ") if s.startswith(("Tried to allocate", "GPU "))]
    return (": " + ". ".join(keep)) if keep else ""


class _Evaluation:
    """Perplexity and sample text of the original and the quantized model on one eval text,
    and how far the quantized model's distributions moved from the original's; for a streamed
    run, measured as the blocks go by (why_streamed: why it streamed, for the samples it
    cannot give)."""

    def __init__(self, spec: Any, tokenizer: Any, model: torch.nn.Module, arch: ArchSpec,
                 streamed: bool = False, why_streamed: str = "") -> None:
        from worker.gptq.evaluate import eval_windows, load_texts, logits_batch
        from worker.gptq.streameval import EvalPassengers

        self.spec, self.tokenizer, self.arch = spec, tokenizer, arch
        self.original_states: list[torch.Tensor] = []  # the original's last block outputs
        self.with_perplexity = bool(spec.extra.get("perplexity", True))
        self.windows = None
        if self.with_perplexity:
            try:
                texts = load_texts(spec.source, spec.text_field)
                self.windows = eval_windows(tokenizer, texts, spec.seq_length, spec.max_windows)
            except ValueError as exc:  # too little eval text
                raise CalibrationError(f"evaluation text: {exc}") from exc
        self.summary: dict[str, Any] = {
            "source": spec.source,
            "seq_length": spec.seq_length,
            "windows": None if self.windows is None else int(self.windows.shape[0]),
        }
        self.passengers = None
        if streamed:
            if self.windows is not None:
                self.passengers = EvalPassengers(self.windows, logits_batch(model, spec.seq_length))
            if wants_samples(spec):
                self.summary["samples_skipped"] = samples_skipped(why_streamed)

    def score_streamed(self, lazy: Any, device: torch.device) -> None:
        """Perplexity before and after, and the divergence, from the windows' last hidden
        states."""
        if self.passengers is None:
            return
        scores = self.passengers.scores(lazy, device)
        self.summary["perplexity_before"] = scores.pop("before")
        self.summary["perplexity_after"] = scores.pop("after")
        self.summary.update(scores)

    def measure(self, model: torch.nn.Module, when: str, device: torch.device,
                on_step: StepCallback | None = None) -> None:
        from worker.gptq.evaluate import generate_samples
        from worker.gptq.streameval import whole_model_scores

        home = next(model.parameters()).device
        model.to(device)
        try:
            if self.windows is not None:
                # before: keep the original's last states; after: compare with them
                scores = whole_model_scores(
                    model, self.arch, self.windows, keep_states=when == "before",
                    original=self.original_states if when == "after" else None, on_step=on_step)
                self.summary[f"perplexity_{when}"] = scores.perplexity
                self.summary.update(scores.divergence or {})
                self.original_states = scores.states
            if self.spec.prompts and self.spec.max_new_tokens > 0:
                self.summary[f"samples_{when}"] = generate_samples(
                    model, self.tokenizer, self.spec.prompts, self.spec.max_new_tokens
                )
        finally:
            model.to(home)


def compute_device(device: str | None) -> torch.device:
    """The torch device a run uses: device as given ('cpu', 'cuda[:N]'), or CUDA when there
    is one (None); an EngineError naming what is wrong otherwise."""
    if not device:
        return default_device()
    try:
        compute = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(f"device {device!r} is not a torch device (use 'cpu' or 'cuda[:N]')") from exc
    if compute.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} was asked for but this machine has no usable CUDA GPU")
    if compute.type not in ("cpu", "cuda"):
        raise EngineError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return compute


def _check_context(hf_config: Any, seq_length: int, what: str) -> None:
    from worker.gptq.evaluate import context_length

    limit = context_length(SimpleNamespace(config=hf_config))
    if limit is not None and seq_length > limit:
        raise CalibrationError(
            f"{what} seq_length {seq_length} exceeds the model's context length {limit}"
        )


def _sizes(model: torch.nn.Module, hf_config: Any, result: Any, out_dir: Path) -> dict[str, int]:
    params = sum(p.numel() for p in model.parameters())
    quantized = sum(int(layer.codes.numel()) for layer in result.layers.values())
    dtype = config_dtype(hf_config)
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    return {
        "parameters": params,
        "quantized_parameters": quantized,
        "original_bytes": params * dtype.itemsize,  # the weights in the model's own dtype
        "checkpoint_bytes": sum(p.stat().st_size for p in files),
        "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
    }


def _peak_memory(device: torch.device) -> dict[str, int]:
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if device.type == "cuda":
        peak["cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
        # what the caching allocator held at most: what the card must have free
        peak["cuda_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return peak


def _versions() -> dict[str, str]:
    import transformers

    return {"gptqd": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _rewrite_report_file(out_dir: Path, report: QuantizeReport) -> None:
    """The report file export wrote, completed with what is known only after saving."""
    from worker.gptq.export import REPORT_NAME, report_file_fields

    path = out_dir / REPORT_NAME
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(report_file_fields(report.to_dict()))
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        mapped = map_resource_error(exc, "saving")
        if mapped is None:
            raise
        raise mapped from exc
