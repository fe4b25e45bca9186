"""/jobs/{id}/verifications: perplexity and generations measured by a worker on the stored
checkpoint (read back with the engine's loader, as a user would)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from fastapi.encoders import jsonable_encoder

from app.deps import DispatcherDep, JobDep, PrincipalDep, StoreDep, has_shape
from app.routes.paging import PageDep, field_error, paged
from app.routes.refusals import refusals
from app.schemas import VERIFICATION_ID, ErrorOut, Page, VerificationIn, VerificationOut
from app.store import Verification

router = APIRouter(prefix="/jobs", tags=["verifications"], responses=refusals(401, 404))


def verification_view(v: Verification) -> VerificationOut:
    error = ErrorOut(code=v.error_code, message=v.error_message or "") if v.error_code else None
    return VerificationOut(id=v.id, job_id=v.job_id, status=v.status, spec=v.spec,
                           created_at=v.created_at, finished_at=v.finished_at,
                           attempts=v.attempts or 0, progress=v.progress, result=v.result,
                           error=error)


@router.post("/{job_id}/verifications", status_code=202, response_model=VerificationOut,
             responses=refusals(400, 409, code_409="the job has not succeeded: no checkpoint to verify"))
def create_verification(
    job: JobDep, body: VerificationIn, response: Response, principal: PrincipalDep,
    store: StoreDep, dispatcher: DispatcherDep,
) -> VerificationOut:
    if job.status != "succeeded":
        raise HTTPException(409, f"job {job.id} is {job.status}: only a succeeded job has a checkpoint")
    if body.dataset_id is not None:
        ds = store.get_dataset(body.dataset_id)
        if ds is None or not principal.may_see(ds.owner):
            raise field_error(("body", "dataset_id"), f"dataset {body.dataset_id} not found")
    v = store.create_verification(job.id, jsonable_encoder(body))
    dispatcher.send_verification(v.id)
    response.headers["Location"] = f"/jobs/{job.id}/verifications/{v.id}"
    return verification_view(v)


@router.get("/{job_id}/verifications", response_model=Page[VerificationOut])
def list_verifications(job: JobDep, store: StoreDep, page: PageDep) -> Page[VerificationOut]:
    return paged(lambda limit, cursor: store.list_verifications(job.id, limit, cursor),
                 verification_view, page)


@router.get("/{job_id}/verifications/{verification_id}", response_model=VerificationOut)
def get_verification(job: JobDep, verification_id: str, store: StoreDep) -> VerificationOut:
    found = has_shape(VERIFICATION_ID, verification_id)
    v = store.get_verification(verification_id) if found else None
    if v is None or v.job_id != job.id:
        raise HTTPException(404, f"verification {verification_id} not found")
    return verification_view(v)
