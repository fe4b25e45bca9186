"""Runs one publication: a succeeded job's stored checkpoint uploaded to a hub repository with
the workers' token (GPTQD_HF_TOKEN), as worker/gptq/hubupload.publish_checkpoint does it (a
model card, the report without the server's paths)."""

from __future__ import annotations

from typing import Any

from app.settings import Settings
from app.store import Job
from worker.gptq.progress import ProgressCallback


def publish(job: Job, request: dict[str, Any], settings: Settings,
            progress: ProgressCallback | None = None) -> dict[str, Any]:
    from worker.gptq.hubupload import Destination, publish_checkpoint

    to = Destination(request["repo_id"], private=request.get("private", True),
                     branch=request.get("branch"), commit_message=request.get("commit_message"))
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    # a local model has no hub id to cite (the hub checks that base_model names a repository)
    base = None if job.spec.get("model_source") == "local" else job.spec["model_id"]
    return publish_checkpoint(settings.artifacts_dir / job.id, to, token=token, base_model=base,
                              model_card=request.get("model_card", True), progress=progress)
