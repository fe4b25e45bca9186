"""/jobs/{id}/publications: a succeeded job's checkpoint uploaded by a worker to a Hugging Face
hub repository, with a model card, using the workers' token (GPTQD_HF_TOKEN; never one from a
request)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from fastapi.encoders import jsonable_encoder

from app.deps import DispatcherDep, JobDep, SettingsDep, StoreDep
from app.routes.followups import follow_up_view, job_follow_up, require_checkpoint
from app.routes.paging import PageDep, field_error, paged
from app.routes.refusals import refusals
from app.schemas import PUBLICATION_ID, Page, PublicationIn, PublicationOut
from worker.gptq import hubstatus

router = APIRouter(prefix="/jobs", tags=["publications"], responses=refusals(401, 404))


@router.post("/{job_id}/publications", status_code=202, response_model=PublicationOut,
             responses=refusals(400, 409, code_409="the job has not succeeded, or this server "
                                "has no hub token or does not use the hub"))
def create_publication(
    job: JobDep, body: PublicationIn, response: Response, settings: SettingsDep,
    store: StoreDep, dispatcher: DispatcherDep,
) -> PublicationOut:
    require_checkpoint(job)
    namespace = body.repo_id.split("/", 1)[0]
    if settings.publish_to and namespace not in settings.publish_to:
        raise field_error(("body", "repo_id"), f"this server publishes only to "
                          f"{', '.join(settings.publish_to)} (GPTQD_PUBLISH_NAMESPACES), not to "
                          f"{namespace!r}")
    if settings.hf_token is None:
        raise HTTPException(409, "publishing needs a hub token with write access: set "
                                 "GPTQD_HF_TOKEN (or HF_TOKEN) for the server and its workers")
    if hubstatus.offline():
        raise HTTPException(409, "this server does not use the hub (HF_HUB_OFFLINE is set)")
    p = store.create_follow_up(job.id, jsonable_encoder(body), kind="publication")
    dispatcher.send_follow_up(p.id)
    response.headers["Location"] = f"/jobs/{job.id}/publications/{p.id}"
    return follow_up_view(p, PublicationOut)


@router.get("/{job_id}/publications", response_model=Page[PublicationOut])
def list_publications(job: JobDep, store: StoreDep, page: PageDep) -> Page[PublicationOut]:
    return paged(lambda limit, cursor: store.list_follow_ups(job.id, limit, cursor,
                                                             kind="publication"),
                 lambda p: follow_up_view(p, PublicationOut), page)


@router.get("/{job_id}/publications/{publication_id}", response_model=PublicationOut)
def get_publication(job: JobDep, publication_id: str, store: StoreDep) -> PublicationOut:
    return follow_up_view(job_follow_up(store, job, publication_id, PUBLICATION_ID,
                                        "publication"), PublicationOut)
