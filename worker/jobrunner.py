"""Runs one job: claim it in the store, run the engine, publish the checkpoint, record the end.

Idempotent: a job that is not queued (already terminal, or claimed by another worker) is left
alone, so a redelivered message never runs a job twice. The checkpoint is written to
`<artifacts>/<job>.<attempt>.partial/` and renamed into place only when complete and only
while the attempt still owns the job; the artifact list is stored only with the `succeeded`
status, so nothing half-written is ever listed or served. Finished blocks are kept in
`<data>/work/<job>/`, so an attempt after a crash resumes from the last finished block.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.settings import Settings
from app.store import Job, Store, progress_fraction
from worker import jobspec
from worker.gptq.modelcard import public_report
from worker.progress_writer import ProgressWriter, job_writer
from worker.reconciler import remove_leftovers

log = logging.getLogger("gptqd.worker")


def worker_name(pid: int | None = None) -> str:
    """How the store names the process running an attempt (this one by default)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_artifacts(directory: Path) -> list[dict[str, Any]]:
    """[{name, size, sha256}] of every file under directory, names relative with '/'."""
    out = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        out.append({
            "name": path.relative_to(directory).as_posix(),
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        })
    return out


def error_of(exc: BaseException) -> tuple[str, str]:
    """(code, message) a person can act on, for any exception a job ends with."""
    from worker.gptq.errors import EngineError

    if isinstance(exc, EngineError):
        return exc.code, exc.message
    if _out_of_memory(exc):
        return "out_of_memory", (
            "the worker ran out of memory; lower calibration.num_samples or seq_length "
            "(or give the worker more memory)"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full", (
            "the server's disk filled up while writing the checkpoint; free space on it "
            f"(or ask its operator to) and submit again ({exc.strerror})"
        )
    return "internal_error", f"{type(exc).__name__}: {exc}"


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError from Python, torch's OutOfMemoryError (CUDA), or torch's CPU allocator
    failing (a RuntimeError saying it can't allocate memory)."""
    import torch

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


@contextmanager
def heartbeat(beat: Callable[[], object], name: str, every: float) -> Iterator[None]:
    """Calls beat() in a thread every `every` seconds while the work runs (a job's or a
    verification's), so a reconciler can tell a live worker from a dead one."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                beat()
            except Exception:  # a store hiccup must not kill the work; the next beat retries
                log.warning("heartbeat for %s failed", name, exc_info=True)

    thread = threading.Thread(target=loop, name=f"heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextmanager
def scratch_dir(settings: Settings, name: str) -> Iterator[Path]:
    """A per-run working directory (also the cwd, so a bare model name never reads the
    worker's own directory), removed afterwards."""
    path = settings.data_dir / "tmp" / name
    path.mkdir(parents=True, exist_ok=True)
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)
        shutil.rmtree(path, ignore_errors=True)


def _engine_kwargs(spec: dict[str, Any], store: Store, settings: Settings) -> dict[str, Any]:
    from worker.gptq.evaluate import EvalSpec

    kwargs: dict[str, Any] = {
        "revision": spec.get("revision"),
        "trust_remote_code": bool(spec.get("trust_remote_code")),
        "token": settings.hf_token.get_secret_value() if settings.hf_token else None,
        "device": settings.device,
        "whole_model_share": settings.whole_model_share,
    }
    verify = spec["verify"]
    if verify["perplexity"] or (verify["prompts"] and verify["max_new_tokens"] > 0):
        source, text_field = jobspec.eval_source(spec, verify.get("dataset_id"), store, settings)
        kwargs["evaluate"] = EvalSpec(
            source=source,
            text_field=text_field,
            seq_length=jobspec.eval_seq_length(spec, verify.get("seq_length")),
            max_windows=verify.get("max_windows"),
            prompts=tuple(verify["prompts"]),
            max_new_tokens=verify["max_new_tokens"],
            extra={"perplexity": verify["perplexity"]},
        )
    return kwargs


def run_job(job_id: str, store: Store, settings: Settings) -> str | None:
    """Runs the job if it is queued; returns its final status, or None when skipped."""
    job = store.claim_job(job_id, worker_name())
    if job is None:
        log.info("job %s is not queued; skipping", job_id)
        return None
    attempt = job.attempts
    writer = job_writer(store, job_id, attempt, settings.progress_interval,
                        floor=progress_fraction(job.progress))
    with heartbeat(lambda: store.heartbeat(job_id, attempt), job_id, settings.heartbeat_seconds), \
            scratch_dir(settings, f"{job_id}.{attempt}"):
        status, ended = _attempt(job, attempt, writer, store, settings)
    if ended:
        remove_leftovers(settings, job_id)
    else:  # requeued meanwhile: the next attempt resumes from the work dir
        log.warning("job %s attempt %d lost the job before it ended", job_id, attempt)
    return status


def _attempt(job: Job, attempt: int, writer: ProgressWriter, store: Store,
             settings: Settings) -> tuple[str, bool]:
    """(status, whether this attempt recorded the end). Only an attempt that still owns the
    job publishes a checkpoint or records an end."""
    from worker.gptq.api import quantize
    from worker.gptq.export import publish_atomically
    from worker.gptq.progress import Cancelled

    job_id = job.id
    final = settings.artifacts_dir / job_id
    partial = settings.artifacts_dir / f"{job_id}.{attempt}.partial"

    def should_stop() -> bool:
        return writer.lost or store.cancel_requested(job_id)

    try:
        spec = job.spec
        report = quantize(
            jobspec.model_source(spec, settings), partial, jobspec.quantize_config(spec),
            jobspec.calibration_spec(spec, store, settings), progress=writer,
            should_stop=should_stop, work_dir=settings.work_dir / job_id,
            **_engine_kwargs(spec, store, settings),
        )
        artifacts = list_artifacts(partial)
        if not store.owns(job_id, attempt):
            return "lost", False
        publish_atomically(partial, final, overwrite=True)
        return "succeeded", store.finish_job(
            job_id, attempt, "succeeded", metrics=metrics_of(report.to_dict()),
            artifacts=artifacts, progress=writer.final("done", "checkpoint ready", 1.0),
        )
    except Cancelled:
        shutil.rmtree(partial, ignore_errors=True)
        return "cancelled", store.finish_job(
            job_id, attempt, "cancelled", progress=writer.final("cancelled", "cancelled while running"))
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        code, message = error_of(exc)
        if code == "model_not_found" and job.spec.get("model_source") != "local":
            message += jobspec.local_models_hint(job.spec["model_id"], settings)
        if code == "internal_error":
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        else:
            log.info("job %s failed: %s", job_id, code)
        return "failed", store.finish_job(job_id, attempt, "failed", error=(code, message),
                                          progress=writer.final("failed", message))


def metrics_of(report: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics from the engine's report: the per-module list is summarised (the
    full one is in the checkpoint's report file) and server paths are left out."""
    metrics = {k: v for k, v in public_report(report).items() if k not in ("modules", "model")}
    losses = [(m["name"], m["loss"]) for m in report.get("modules") or []
              if m.get("loss") is not None]
    if losses:
        worst = max(losses, key=lambda x: x[1])
        metrics["loss_summary"] = {
            "modules": len(losses),
            "mean": sum(v for _, v in losses) / len(losses),
            "max": worst[1],
            "worst_module": worst[0],
        }
    return metrics
