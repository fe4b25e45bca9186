"""/jobs: submit, list, show, cancel and delete quantization jobs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Response
from fastapi.encoders import jsonable_encoder

from app.deps import DispatcherDep, JobDep, PrincipalDep, SettingsDep, StoreDep
from app.paths import OutsideRoot, resolve_model
from app.routes.paging import PageDep, field_error, paged
from app.routes.refusals import refusals
from app.schemas import TERMINAL, CleanStr, ErrorOut, JobIn, JobOut, JobPage, Progress
from app.store import IdempotencyConflict, Job
from worker.gptq.config import context_limit
from worker.reconciler import remove_leftovers

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=refusals(401))

JobStatusQuery = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def job_view(job: Job) -> JobOut:
    base = f"/jobs/{job.id}"
    links = {"self": base, "events": f"{base}/events", "verifications": f"{base}/verifications",
             "publications": f"{base}/publications"}
    if job.status not in TERMINAL:
        links["cancel"] = f"{base}/cancel"
    if job.status == "succeeded":
        links |= {"artifacts": f"{base}/artifacts", "archive": f"{base}/archive"}
    error = ErrorOut(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobOut(
        id=job.id, name=job.name, status=job.status, model_id=job.model_id, spec=job.spec,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        updated_at=job.updated_at, attempts=job.attempts, cancel_requested=job.cancel_requested,
        progress=Progress(**{k: v for k, v in (job.progress or {}).items()
                             if k in Progress.model_fields}),
        metrics=job.metrics, error=error,
        artifacts=job.artifacts if job.status == "succeeded" else [], links=links,
    )


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def check_against_server(body: JobIn, principal: PrincipalDep, settings: SettingsDep,
                         store: StoreDep) -> str:
    """Checks that need the server's settings or store; each 422 names its field. Returns
    where the model comes from: "local" (a directory under the models root) or "hub"."""
    if body.trust_remote_code:
        if not settings.allow_trust_remote_code:
            raise field_error(("body", "trust_remote_code"),
                              "trust_remote_code is not allowed on this server")
        if not body.revision:
            raise field_error(("body", "revision"),
                              "trust_remote_code needs a pinned revision (a commit sha)")
    try:
        source = resolve_model(body.model_id, settings.models_root)
    except OutsideRoot as exc:
        raise field_error(("body", "model_id"), str(exc)) from exc
    for loc, dataset_id in ((("body", "calibration", "dataset_id"), body.calibration.dataset_id),
                            (("body", "verify", "dataset_id"), body.verify.dataset_id)):
        if dataset_id is None:
            continue
        ds = store.get_dataset(dataset_id)
        if ds is None or not principal.may_see(ds.owner):
            raise field_error(loc, f"dataset {dataset_id} not found (upload it to /datasets)")
    if source != body.model_id:
        check_context(body, Path(source))
        return "local"
    return "hub"


def check_context(body: JobIn, model_dir: Path) -> None:
    """A window longer than a local model's context is refused now, not a second after the
    job starts (a hub model's config is read by the worker)."""
    try:
        limit = context_limit(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError):
        return  # no readable config: the worker says what is wrong with the model
    if limit is None:
        return
    for loc, length in ((("body", "calibration", "seq_length"), body.calibration.seq_length),
                        (("body", "verify", "seq_length"), body.verify.seq_length)):
        if length is not None and length > limit:
            raise field_error(loc, f"{length} exceeds the context length of {body.model_id} "
                                   f"({limit} tokens): use at most {limit}")


@router.post("", status_code=202, response_model=JobOut, responses=refusals(400, 413, 429))
def submit_job(
    body: JobIn,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[CleanStr | None, Header(max_length=200, min_length=1)] = None,
) -> JobOut:
    model_source = check_against_server(body, principal, settings, store)
    spec = jsonable_encoder(body)
    if store.count_active(principal.name) >= settings.max_queued_per_key:
        raise HTTPException(
            429, f"this key already has {settings.max_queued_per_key} queued or running jobs",
            headers={"Retry-After": "60"},
        )
    try:
        # a local model must still be local when the job runs, never fetched from the hub
        # under the same name; the hash covers the request only
        job, created = store.create_job(
            owner=principal.name, model_id=body.model_id,
            spec={**spec, "model_source": model_source}, spec_hash=spec_hash(spec),
            name=body.name, idempotency_key=idempotency_key,
        )
    except IdempotencyConflict as exc:
        raise HTTPException(
            422, "Idempotency-Key was already used with a different request body"
        ) from exc
    if created:
        dispatcher.send_job(job.id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_view(job)


@router.get("", response_model=JobPage)
def list_jobs(principal: PrincipalDep, store: StoreDep, page: PageDep,
              status: JobStatusQuery | None = None) -> JobPage:
    def fetch(limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
        return store.list_jobs(owner=principal.owner_filter(), status=status, limit=limit,
                               cursor=cursor)

    return paged(fetch, job_view, page)


@router.get("/{job_id}", response_model=JobOut, responses=refusals(404))
def get_job(job: JobDep) -> JobOut:
    return job_view(job)


@router.post("/{job_id}/cancel", response_model=JobOut, responses={
    202: {"model": JobOut, "description": "the job is running: it stops at the next module boundary"},
    **refusals(404, 409, code_409="the job already ended")})
def cancel_job(job: JobDep, store: StoreDep, settings: SettingsDep, response: Response
               ) -> JobOut:
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job.id} already ended ({job.status})")
    job = store.cancel_job(job.id)
    if job.status == "running":
        response.status_code = 202  # it stops at the next module boundary
    else:  # a requeued job may have finished blocks of an earlier attempt on disk
        remove_leftovers(settings, job.id)
    return job_view(job)


@router.delete("/{job_id}", status_code=204, responses=refusals(404, 409, code_409="the job has not ended: cancel it first"))
def delete_job(job: JobDep, store: StoreDep, settings: SettingsDep) -> Response:
    if job.status not in TERMINAL:
        raise HTTPException(409, f"job {job.id} is {job.status}: cancel it first")
    if not store.delete_job(job.id):
        raise HTTPException(409, f"job {job.id} changed meanwhile; try again")
    shutil.rmtree(settings.artifacts_dir / job.id, ignore_errors=True)
    remove_leftovers(settings, job.id)
    return Response(status_code=204)
