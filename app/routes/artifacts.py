"""A succeeded job's checkpoint: the file list, single files (with Range) and a tar of all."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, StreamingResponse

from app.archive import check_files, tar_size, tar_stream
from app.deps import JobDep, SettingsDep
from app.paths import OutsideRoot, inside
from app.routes.refusals import refusals
from app.schemas import Artifact
from app.store import Job

router = APIRouter(prefix="/jobs", tags=["artifacts"], responses=refusals(
    401, 404, 409, code_409="the job has not succeeded: it has no checkpoint yet"))


def _listed(job: Job) -> list[dict]:
    # only a succeeded job lists files: its checkpoint was renamed into place complete
    if job.status != "succeeded":
        raise HTTPException(409, f"job {job.id} is {job.status}: it has no checkpoint yet")
    return job.artifacts


@router.get("/{job_id}/artifacts", response_model=list[Artifact])
def list_artifacts(job: JobDep) -> list[dict]:
    return _listed(job)


@router.get("/{job_id}/artifacts/{name:path}", responses=refusals(410))
def download_artifact(job: JobDep, name: str, settings: SettingsDep) -> FileResponse:
    """One file of the checkpoint; supports `Range` requests."""
    entry = next((a for a in _listed(job) if a["name"] == name), None)
    if entry is None:
        raise HTTPException(404, f"job {job.id} has no artifact {name!r}")
    try:
        path = inside(settings.artifacts_dir / job.id, name)
    except OutsideRoot as exc:
        raise HTTPException(404, f"job {job.id} has no artifact {name!r}") from exc
    if not path.is_file():
        raise HTTPException(410, f"artifact {name!r} is gone from the server's disk")
    return FileResponse(path, filename=path.name, headers={"X-Checksum-SHA256": entry["sha256"]})


@router.get("/{job_id}/archive", responses=refusals(410))
def download_archive(job: JobDep, settings: SettingsDep) -> StreamingResponse:
    """The whole checkpoint as one tar stream, its files under a directory named after the job."""
    files = [(a["name"], a["size"]) for a in _listed(job)]
    root = settings.artifacts_dir / job.id
    if not root.is_dir():
        raise HTTPException(410, f"job {job.id}'s checkpoint is gone from the server's disk")
    problem = check_files(root, files)
    if problem is not None:
        raise HTTPException(410, f"job {job.id}'s checkpoint cannot be served: {problem}")
    prefix = job.id
    return StreamingResponse(
        tar_stream(root, files, prefix),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="{job.id}.tar"',
            "Content-Length": str(tar_size(files, prefix)),
        },
    )
