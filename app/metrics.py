"""Prometheus metrics, computed from the job store at scrape time.

API and workers are separate processes (often separate machines), so counters kept in one
process's memory would show only part of the picture; the store has all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from app.db import utcnow
from app.schemas import JobStatus
from app.store import FollowUp, Job, Store

DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 48 * 3600)
HISTORY_LIMIT = 10_000  # finished jobs looked at for the duration histogram and stage times
STATUSES: tuple[str, ...] = JobStatus.__args__


class StoreCollector:
    def __init__(self, store: Store, heartbeat_seconds: float) -> None:
        self.store = store
        self.stale_after = timedelta(seconds=max(3 * heartbeat_seconds, 30))

    def collect(self) -> Iterator[Metric]:
        with self.store.engine.connect() as conn:
            counts = dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            busy = conn.scalar(
                select(func.count(func.distinct(Job.worker))).where(
                    Job.status == "running", Job.heartbeat_at >= utcnow() - self.stale_after
                )
            )
            follow_ups = conn.execute(
                select(func.coalesce(FollowUp.kind, "verification"), FollowUp.status,
                       func.count()).group_by(FollowUp.kind, FollowUp.status)).all()
            finished = conn.execute(
                select(Job.started_at, Job.finished_at, Job.metrics)
                .where(Job.status == "succeeded", Job.started_at.is_not(None))
                .order_by(Job.finished_at.desc())
                .limit(HISTORY_LIMIT)
            ).all()

        jobs = GaugeMetricFamily("gptqd_jobs", "Jobs in the store by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "gptqd_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0)
        )
        yield GaugeMetricFamily(
            "gptqd_busy_workers", "Workers running a job (fresh heartbeat)", value=busy or 0
        )
        by_kind = GaugeMetricFamily("gptqd_follow_ups", "Verifications and publications of "
                                    "jobs' checkpoints by status", labels=["kind", "status"])
        counted: dict[tuple[str, str], int] = {}
        for kind, status, n in follow_ups:  # NULL and "verification" rows are one kind
            counted[(kind, status)] = counted.get((kind, status), 0) + n
        for kind in ("verification", "publication"):
            for status in STATUSES:
                by_kind.add_metric([kind, status], counted.get((kind, status), 0))
        yield by_kind

        durations = [
            (f - s).total_seconds() for s, f, _ in finished if s is not None and f is not None
        ]
        yield _histogram(
            "gptqd_job_duration_seconds", "Wall time of succeeded jobs", durations, DURATION_BUCKETS
        )

        stages = CounterMetricFamily(
            "gptqd_stage_seconds", "Time spent per engine stage in succeeded jobs", labels=["stage"]
        )
        totals: dict[str, float] = {}
        for _, _, metrics in finished:
            for stage, secs in ((metrics or {}).get("stage_seconds") or {}).items():
                if isinstance(secs, int | float):
                    totals[stage] = totals.get(stage, 0.0) + float(secs)
        for stage, secs in sorted(totals.items()):
            stages.add_metric([stage], secs)
        yield stages


def _histogram(
    name: str, doc: str, values: list[float], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    buckets = [(str(float(b)), sum(1 for v in values if v <= b)) for b in bounds]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=sum(values))


def render_metrics(store: Store, heartbeat_seconds: float) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, heartbeat_seconds))
    return generate_latest(registry)
