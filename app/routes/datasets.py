"""/datasets: upload calibration text (.txt, .jsonl, .parquet) and list what was uploaded."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool

from app import datasets
from app.db import utcnow
from app.deps import PrincipalDep, SettingsDep, StoreDep
from app.routes.paging import PageDep, field_error, paged
from app.routes.refusals import refusals
from app.schemas import DatasetOut, Page
from app.store import Dataset, new_id

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=refusals(401))


def dataset_view(ds: Dataset) -> DatasetOut:
    return DatasetOut(id=ds.id, filename=ds.filename, format=ds.format, size=ds.size,
                      sha256=ds.sha256, created_at=ds.created_at)


@router.post("", status_code=201, response_model=DatasetOut, responses=refusals(400, 413))
async def upload_dataset(
    file: UploadFile, principal: PrincipalDep, settings: SettingsDep, store: StoreDep
) -> DatasetOut:
    """Multipart field `file`; its name must end in .txt, .jsonl or .parquet."""
    try:
        fmt = datasets.upload_format(file.filename or "")
    except datasets.BadUpload as exc:
        raise field_error(("body", "file"), str(exc)) from exc
    dataset_id = new_id("ds")
    dest = settings.datasets_dir / f"{dataset_id}.{fmt}"
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    try:
        size, sha = await run_in_threadpool(
            datasets.save_upload, file.file, dest, settings.max_upload_bytes
        )
        await run_in_threadpool(datasets.check_content, dest, fmt)
    except datasets.TooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except datasets.BadUpload as exc:
        datasets.remove(dest)
        raise field_error(("body", "file"), str(exc)) from exc
    ds = Dataset(id=dataset_id, owner=principal.name,
                 filename=datasets.clean_filename(file.filename or ""), format=fmt, size=size,
                 sha256=sha, created_at=utcnow())
    await run_in_threadpool(store.add_dataset, ds)
    return dataset_view(ds)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(principal: PrincipalDep, store: StoreDep, page: PageDep) -> Page[DatasetOut]:
    return paged(lambda limit, cursor: store.list_datasets(principal.owner_filter(), limit,
                                                           cursor), dataset_view, page)
