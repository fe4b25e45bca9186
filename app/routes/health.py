"""Liveness and readiness: /healthz answers while the process runs; /readyz when the job store
and the broker both answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.deps import DispatcherDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the job store or the broker does not answer"}})
async def readyz(store: StoreDep, dispatcher: DispatcherDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, ping in (("store", store.ping), ("broker", dispatcher.ping)):
        try:
            await run_in_threadpool(ping)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)
