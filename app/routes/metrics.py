"""GET /metrics: Prometheus text format (jobs by status, queue depth, durations, stage times)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import PrincipalDep, SettingsDep, StoreDep
from app.metrics import render_metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(_: PrincipalDep, store: StoreDep, settings: SettingsDep) -> Response:
    # a scraper authenticates like any client when keys are configured (bearer_token in
    # Prometheus' scrape config); the numbers are aggregates over every owner
    return Response(render_metrics(store, settings.heartbeat_seconds), media_type=CONTENT_TYPE_LATEST)
