"""/jobs/{id}/verifications: perplexity and generations measured by a worker on the stored
checkpoint (read back with the engine's loader, as a user would)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.encoders import jsonable_encoder

from app.deps import DispatcherDep, JobDep, PrincipalDep, StoreDep
from app.routes.followups import follow_up_view, job_follow_up, require_checkpoint
from app.routes.paging import PageDep, field_error, paged
from app.routes.refusals import refusals
from app.schemas import VERIFICATION_ID, Page, VerificationIn, VerificationOut

router = APIRouter(prefix="/jobs", tags=["verifications"], responses=refusals(401, 404))


@router.post("/{job_id}/verifications", status_code=202, response_model=VerificationOut,
             responses=refusals(400, 409, code_409="the job has not succeeded: no checkpoint to verify"))
def create_verification(
    job: JobDep, body: VerificationIn, response: Response, principal: PrincipalDep,
    store: StoreDep, dispatcher: DispatcherDep,
) -> VerificationOut:
    require_checkpoint(job)
    if body.dataset_id is not None:
        ds = store.get_dataset(body.dataset_id)
        if ds is None or not principal.may_see(ds.owner):
            raise field_error(("body", "dataset_id"), f"dataset {body.dataset_id} not found")
    v = store.create_follow_up(job.id, jsonable_encoder(body))
    dispatcher.send_follow_up(v.id)
    response.headers["Location"] = f"/jobs/{job.id}/verifications/{v.id}"
    return follow_up_view(v, VerificationOut)


@router.get("/{job_id}/verifications", response_model=Page[VerificationOut])
def list_verifications(job: JobDep, store: StoreDep, page: PageDep) -> Page[VerificationOut]:
    return paged(lambda limit, cursor: store.list_follow_ups(job.id, limit, cursor),
                 lambda v: follow_up_view(v, VerificationOut), page)


@router.get("/{job_id}/verifications/{verification_id}", response_model=VerificationOut)
def get_verification(job: JobDep, verification_id: str, store: StoreDep) -> VerificationOut:
    return follow_up_view(job_follow_up(store, job, verification_id, VERIFICATION_ID,
                                        "verification"), VerificationOut)
