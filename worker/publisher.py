"""Runs one publication: a succeeded job's stored checkpoint uploaded to a hub repository with
the workers' token (GPTQD_HF_TOKEN), with a model card written from the job's report, and that
report without the server's paths where it held any (a local model's, an uploaded text's; the
checkpoint as downloaded from the server keeps them)."""

from __future__ import annotations

import json
import time
from typing import Any

from app.settings import Settings
from app.store import Job
from worker.gptq.download import Transfer
from worker.gptq.export import REPORT_NAME
from worker.gptq.progress import ProgressCallback, ProgressEvent
from worker.jobrunner import public_report

# the whole publication's fraction: checking the token and the repository, then the bytes,
# then the commit
UPLOAD_SHARE = (0.02, 0.98)


def publish(job: Job, request: dict[str, Any], settings: Settings,
            progress: ProgressCallback | None = None) -> dict[str, Any]:
    from worker.gptq.hubupload import Destination, Upload, upload
    from worker.gptq.modelcard import model_card

    started = time.monotonic()

    def emit(stage: str, fraction: float, message: str, eta: float | None = None) -> None:
        if progress is not None:
            progress(ProgressEvent(stage=stage, fraction=fraction, message=message,
                                   seconds=time.monotonic() - started, eta_seconds=eta))

    repo_id = request["repo_id"]
    emit("preparing", 0.0, f"checking the token and {repo_id}")
    checkpoint = settings.artifacts_dir / job.id
    stored = json.loads((checkpoint / REPORT_NAME).read_text())
    report = public_report(stored)
    replaced: dict[str, bytes] = {}
    if report != stored:  # a local model's or an uploaded text's path
        replaced[REPORT_NAME] = (json.dumps(report, indent=2) + "\n").encode()
    if request.get("model_card", True):
        # a local model has no hub id to cite (the hub checks base_model names a repository)
        base = None if job.spec.get("model_source") == "local" else job.spec["model_id"]
        replaced["README.md"] = model_card(report, repo_id, base).encode()

    def on_transfer(t: Transfer) -> None:
        low, high = UPLOAD_SHARE
        share = t.done / t.total if t.total else 1.0
        stage, message = "uploading", t.describe(repo_id, "uploading")
        if t.done >= t.total:
            stage, message = "committing", f"committing {t.files} files to {repo_id}"
        emit(stage, low + (high - low) * share, message, t.eta_seconds)

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    to = Destination(repo_id, private=request.get("private", True), branch=request.get("branch"),
                     commit_message=request.get("commit_message"))
    result = upload(Upload(checkpoint, replaced), to, token=token, on_transfer=on_transfer)
    return {**result, "model_card": "README.md" in replaced}

