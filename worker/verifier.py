"""Runs one verification: perplexity and sample generations from a job's stored checkpoint,
read back with the engine's own loader (the same files a user downloads)."""

from __future__ import annotations

import time
from typing import Any

from app.settings import Settings
from app.store import Store
from worker import jobspec
from worker.gptq.modelcard import public_source
from worker.gptq.progress import ProgressCallback


def measure(
    spec: dict[str, Any], request: dict[str, Any], store: Store, settings: Settings,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    from worker.gptq.api import SCORING_STAGE_ENDS, RunProgress, compute_device
    from worker.gptq.evaluate import check_fits, eval_windows, generate_samples, load_texts
    from worker.gptq.residency import open_checkpoint, samples_skipped
    from worker.gptq.streameval import perplexity_of

    started = time.monotonic()
    run = RunProgress(progress, None, SCORING_STAGE_ENDS)
    source, text_field = jobspec.eval_source(spec, request.get("dataset_id"), store, settings)
    seq_length = jobspec.eval_seq_length(spec, request.get("seq_length"))
    texts = load_texts(source, text_field)
    prompts = request.get("prompts") or []
    wants_samples = bool(prompts) and request["max_new_tokens"] > 0
    # on the worker's device (a GPU's in its checkpoint dtype, as the job evaluated it); block
    # by block unless samples are wanted and it fits
    compute = compute_device(settings.device)
    with run.stage("loading", message="reading the checkpoint"):
        held = open_checkpoint(settings.artifacts_dir / request["job_id"], compute,
                               settings.whole_model_share, samples=wants_samples)
    check_fits(held.model, seq_length)
    windows = eval_windows(held.tokenizer, texts, seq_length, request.get("max_windows"))
    samples: list[str] = []
    with run.stage("evaluating"):
        ppl = perplexity_of(held.model, held.lazy, windows, compute,
                            run.steps("evaluating", "block" if held.lazy else "batch",
                                      with_eta=True))
        if wants_samples and held.lazy is None:
            run.emit("evaluating", run.fraction, "generating sample text")
            samples = generate_samples(held.model, held.tokenizer, prompts,
                                       request["max_new_tokens"])
    skipped = {"samples_skipped": samples_skipped(held.why)} if (
        wants_samples and held.lazy is not None) else {}
    return {
        "perplexity": ppl,
        "eval_source": request.get("dataset_id") or public_source(source),
        "held_out": jobspec.held_out(source, spec, store, settings),
        "seq_length": seq_length,
        "max_windows": request.get("max_windows"),
        "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, samples, strict=True)] if samples else [],
        **skipped,
        "seconds": round(time.monotonic() - started, 3),
    }
