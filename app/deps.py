"""FastAPI dependencies: settings, store, broker and the caller, all from the app's state."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

from app.auth import Principal, authenticate
from app.dispatch import Dispatcher
from app.schemas import JOB_ID
from app.settings import Settings
from app.store import Job, Store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


# declares the scheme in the OpenAPI document (Swagger's "Authorize" then sends the key); the
# header is read by authenticate, which also knows when no key is needed
_bearer = HTTPBearer(auto_error=False, description="an API key (GPTQD_API_KEYS), when the box has keys")


def get_principal(request: Request, _: Annotated[object, Depends(_bearer)] = None) -> Principal:
    return authenticate(request, request.app.state.api_keys)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def has_shape(pattern: re.Pattern[str], value: str) -> bool:
    """Whether a client-given id is of the shape the store hands out: one that is not cannot
    exist, so it is simply not found, and never reaches the database (a NUL fails there)."""
    return pattern.fullmatch(value) is not None


def visible_job(store: Store, principal: Principal, job_id: str) -> Job:
    """The job if it exists and the caller may see it; 404 otherwise (same answer for both)."""
    job = store.get_job(job_id) if has_shape(JOB_ID, job_id) else None
    if job is None or not principal.may_see(job.owner):
        raise HTTPException(404, f"job {job_id} not found")
    return job


def job_for(job_id: str, principal: PrincipalDep, store: StoreDep) -> Job:
    return visible_job(store, principal, job_id)


JobDep = Annotated[Job, Depends(job_for)]
