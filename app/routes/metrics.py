"""GET /metrics: Prometheus text format (jobs by status, queue depth, durations, stage times)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.auth import require_admin
from app.deps import PrincipalDep, SettingsDep, StoreDep
from app.metrics import render_metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={403: {"description": "the key is not an admin key"}})
def metrics(principal: PrincipalDep, store: StoreDep, settings: SettingsDep) -> Response:
    # the numbers are totals over every owner, so only an admin key reads them (Prometheus
    # sends one as bearer_token); on an open box (no keys) every caller is admin
    require_admin(principal, "/metrics")
    return Response(render_metrics(store, settings.heartbeat_seconds), media_type=CONTENT_TYPE_LATEST)
