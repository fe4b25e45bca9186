"""The job store: the source of truth for jobs, their event log, uploaded datasets and
follow-ups (verifications and publications of a job's checkpoint). API and workers share it;
every state change is one short transaction, and the ones that race (claim, cancel, finish)
are single conditional UPDATEs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from app.cursor import decode_cursor, encode_cursor
from app.db import WRITE, UTCDateTime, make_engine, utcnow
from app.schemas import DATASET_ID, JOB_ID, PUBLICATION_ID, TERMINAL, VERIFICATION_ID


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "gptqd_jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_gptqd_jobs_idem"),
        Index("ix_gptqd_jobs_list", "owner", "created_at"),
        Index("ix_gptqd_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    model_id: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    artifacts: Mapped[list] = mapped_column(JSON, default=list)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)  # last event's seq


class Event(Base):
    __tablename__ = "gptqd_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_gptqd_events_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("gptqd_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON)


class Dataset(Base):
    __tablename__ = "gptqd_datasets"
    __table_args__ = (Index("ix_gptqd_datasets_owner", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


FollowUpKind = Literal["verification", "publication"]


@dataclass(frozen=True)
class FollowUpShape:
    prefix: str  # of its ids
    id_shape: re.Pattern[str]
    # why its worker kept dying, and what to do (a worker_lost failure's message)
    lost_advice: str


FOLLOW_UPS: dict[FollowUpKind, FollowUpShape] = {
    "verification": FollowUpShape(
        "ver", VERIFICATION_ID, "probably out of memory: use fewer max_windows or a shorter "
        "seq_length, or a machine with more memory"),
    "publication": FollowUpShape(
        "pub", PUBLICATION_ID, "the upload ended its process each time; see the worker's log"),
}


class FollowUp(Base):
    """Work a worker does on a succeeded job's stored checkpoint, one row each: a verification
    (perplexity, samples) or a publication (an upload to the hub). Both are claimed, beat,
    requeued and finished alike; the table keeps the name it had when it held verifications
    only."""

    __tablename__ = "gptqd_verifications"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("gptqd_jobs.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[dict | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # stage, block i/n, fraction, ETA while it runs (added in 0.1: older stores gain it)
    progress: Mapped[dict | None] = mapped_column(JSON)
    # verification or publication (added with publications: older rows, all verifications,
    # have NULL)
    kind: Mapped[str | None] = mapped_column(String(16))


def _kind_is(kind: str) -> Any:
    return FollowUp.kind == kind if kind != "verification" else or_(
        FollowUp.kind.is_(None), FollowUp.kind == kind)


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request body."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def progress_fraction(progress: dict | None) -> float:
    """The fraction a stored progress reached (0 for none)."""
    return float((progress or {}).get("fraction") or 0.0)


def _stale_or_only(table: Any, beat: Any, stale_before: datetime | None,
                   only: tuple[str, int] | None) -> list[Any]:
    """The conditions picking the rows to requeue: one given attempt, or all stale ones."""
    if only is not None:
        return [table.id == only[0], table.attempts == only[1]]
    assert stale_before is not None, "give stale_before or only"
    return [beat < stale_before]


class Store:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._write_engine = self.engine.execution_options(**WRITE)

    def create_all(self) -> None:
        # API and workers start at once; on PostgreSQL two concurrent CREATE TABLEs can clash
        for _ in range(5):
            try:
                Base.metadata.create_all(self.engine)
                self._add_missing_columns()
                return
            except (IntegrityError, OperationalError, ProgrammingError):
                continue
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Nullable columns added since a store was created (create_all makes only missing
        tables): a store from an older version keeps its rows and gains the new columns."""
        existing = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    with self.engine.begin() as conn:
                        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def ping(self) -> None:
        with self._read() as s:
            s.execute(select(1))

    # -- events ------------------------------------------------------------------------------

    @staticmethod
    def _append_event(s: Session, job_id: str, type_: str, data: dict) -> int:
        """Adds the job's next event in the caller's transaction. The seq comes from the job
        row, whose lock orders concurrent writers, so seqs commit in order with no gaps."""
        seq = s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(event_seq=Job.event_seq + 1)
            .returning(Job.event_seq)
        ).scalar_one()
        s.add(Event(job_id=job_id, seq=seq, ts=utcnow(), type=type_, data=data))
        return seq

    def events_after(self, job_id: str, after: int, limit: int = 500) -> list[Event]:
        with self._read() as s:
            rows = s.scalars(
                select(Event)
                .where(Event.job_id == job_id, Event.seq > after)
                .order_by(Event.seq)
                .limit(limit)
            )
            return list(rows)

    # -- jobs --------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        owner: str,
        model_id: str,
        spec: dict[str, Any],
        spec_hash: str,
        name: str | None,
        idempotency_key: str | None,
    ) -> tuple[Job, bool]:
        """Returns (job, created). A repeated Idempotency-Key returns the first job."""
        if idempotency_key is not None:
            existing = self._by_idempotency_key(owner, idempotency_key, spec_hash)
            if existing is not None:
                return existing, False
        now = utcnow()
        job = Job(
            id=new_id("job"), owner=owner, name=name, status="queued", model_id=model_id,
            spec=spec, spec_hash=spec_hash, idempotency_key=idempotency_key, created_at=now,
            updated_at=now, attempts=0, cancel_requested=False, progress={"stage": "queued",
            "fraction": 0.0, "message": "waiting for a worker"}, artifacts=[], event_seq=0,
        )
        try:
            with self._write() as s:
                s.add(job)
                s.flush()
                self._append_event(s, job.id, "status", {"status": "queued", "attempts": 0})
        except IntegrityError:
            # a concurrent request with the same key won the insert
            existing = self._by_idempotency_key(owner, idempotency_key or "", spec_hash)
            if existing is None:
                raise
            return existing, False
        return job, True

    def _by_idempotency_key(self, owner: str, key: str, spec_hash: str) -> Job | None:
        with self._read() as s:
            job = s.scalars(
                select(Job).where(Job.owner == owner, Job.idempotency_key == key)
            ).first()
        if job is not None and job.spec_hash != spec_hash:
            raise IdempotencyConflict(key)
        return job

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as s:
            return s.get(Job, job_id)

    def list_jobs(
        self,
        *,
        owner: str | None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Newest first; `owner=None` lists everyone's (admin)."""
        q = select(Job)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if status is not None:
            q = q.where(Job.status == status)
        return self._page(q, Job, JOB_ID, limit, cursor)

    def _page(self, q: Any, table: Any, shape: re.Pattern[str], limit: int,
              cursor: str | None) -> tuple[list, str | None]:
        """One page of q, newest first, after `cursor`; and the cursor of the next page (None
        on the last). Every list pages this way."""
        if cursor is not None:
            stamp, last_id = decode_cursor(cursor, shape)
            q = q.where(or_(table.created_at < stamp,
                            (table.created_at == stamp) & (table.id < last_id)))
        q = q.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
        with self._read() as s:
            rows = list(s.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)

    def count_active(self, owner: str) -> int:
        with self._read() as s:
            return s.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.owner == owner, Job.status.in_(("queued", "running")))
            )

    def queued_job_ids(self) -> list[str]:
        with self._read() as s:
            return list(s.scalars(select(Job.id).where(Job.status == "queued")))

    def take_unclaimed(
        self, sent_before: datetime, in_broker: set[str] | frozenset[str] = frozenset(),
        only: set[str] | None = None,
    ) -> list[str]:
        """Queued jobs last sent to the broker before sent_before (their message may be lost)
        and not among in_broker (nor outside `only`, when given), each marked as sent now. A
        job is handed to one caller only, so reconcilers running at once never both re-send
        it; a duplicate message would be harmless anyway (claim_job)."""
        taken = []
        now = utcnow()
        with self._read() as s:
            candidates = list(s.scalars(
                select(Job.id).where(Job.status == "queued", Job.updated_at < sent_before)
                .order_by(Job.created_at)
            ))
        for job_id in candidates:
            if job_id in in_broker or (only is not None and job_id not in only):
                continue
            with self._write() as s:
                n = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == "queued",
                           Job.updated_at < sent_before)
                    .values(updated_at=now)
                ).rowcount
            if n:
                taken.append(job_id)
        return taken

    def owns(self, job_id: str, attempt: int) -> bool:
        """Whether this attempt still runs the job (not requeued, cancelled or finished)."""
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(Job).where(
                self._mine(job_id, attempt))) == 1

    def claim_job(self, job_id: str, worker: str) -> Job | None:
        """queued → running for exactly one caller; None if the job is not queued. The
        progress keeps the fraction an earlier attempt reached (it never goes backwards)."""
        now = utcnow()
        with self._write() as s:
            claimed = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
                .values(
                    status="running", attempts=Job.attempts + 1, worker=worker, started_at=now,
                    heartbeat_at=now, updated_at=now,
                )
                .returning(Job.attempts, Job.progress)
            ).one_or_none()
            if claimed is None:
                return None
            claimed, progress = claimed
            s.execute(update(Job).where(Job.id == job_id).values(progress={
                "stage": "starting", "fraction": progress_fraction(progress), "message": "starting"}))
            self._append_event(
                s, job_id, "status", {"status": "running", "attempts": claimed, "worker": worker}
            )
        return self.get_job(job_id)

    @staticmethod
    def _mine(job_id: str, attempt: int) -> Any:
        # the attempt number fences a worker whose job was handed to another one meanwhile
        return (Job.id == job_id) & (Job.status == "running") & (Job.attempts == attempt)

    def record_progress(self, job_id: str, attempt: int, progress: dict, event: dict) -> bool:
        """Stores the job's progress and logs one progress event; False if no longer ours."""
        now = utcnow()
        with self._write() as s:
            n = s.execute(
                update(Job)
                .where(self._mine(job_id, attempt))
                .values(progress=progress, heartbeat_at=now, updated_at=now)
            ).rowcount
            if n:
                self._append_event(s, job_id, "progress", event)
        return bool(n)

    def heartbeat(self, job_id: str, attempt: int) -> bool:
        with self._write() as s:
            return bool(
                s.execute(
                    update(Job).where(self._mine(job_id, attempt)).values(heartbeat_at=utcnow())
                ).rowcount
            )

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def finish_job(
        self,
        job_id: str,
        attempt: int,
        status: str,
        *,
        metrics: dict | None = None,
        artifacts: list[dict] | None = None,
        error: tuple[str, str] | None = None,
        progress: dict | None = None,
    ) -> bool:
        """running → a terminal state, only by the attempt that runs it."""
        assert status in TERMINAL
        now = utcnow()
        values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now}
        if metrics is not None:
            values["metrics"] = metrics
        if artifacts is not None:
            values["artifacts"] = artifacts
        if error is not None:
            values["error_code"], values["error_message"] = error
        if progress is not None:
            values["progress"] = progress
        with self._write() as s:
            n = s.execute(update(Job).where(self._mine(job_id, attempt)).values(**values)).rowcount
            if n:
                data: dict[str, Any] = {"status": status, "attempts": attempt}
                if error is not None:
                    data["error"] = {"code": error[0], "message": error[1]}
                self._append_event(s, job_id, "status", data)
        return bool(n)

    def cancel_job(self, job_id: str) -> Job | None:
        """A queued job becomes cancelled at once; a running one is asked to stop."""
        now = utcnow()
        with self._write() as s:
            n = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=now,
                        updated_at=now, progress={"stage": "cancelled", "fraction": 0.0,
                                                  "message": "cancelled before it started"})
            ).rowcount
            if n:
                self._append_event(s, job_id, "status", {"status": "cancelled", "attempts": 0})
            else:
                n = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == "running",
                           Job.cancel_requested.is_(False))
                    .values(cancel_requested=True, updated_at=now)
                ).rowcount
                if n:
                    self._append_event(
                        s, job_id, "cancel_requested", {"message": "stops at the next module"}
                    )
        return self.get_job(job_id)

    def requeue_stale(
        self, stale_before: datetime | None, max_attempts: int, *,
        only: tuple[str, int] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Running jobs whose worker stopped beating before stale_before: back to queued (the
        next claim counts a new attempt), or failed once they used max_attempts, or cancelled
        when that was asked. Returns (requeued ids, ended ids); the caller re-sends the
        requeued ones to the broker. only=(job id, attempt): that attempt alone, whatever its
        heartbeat (its process is known to be dead)."""
        requeued, ended = [], []
        now = utcnow()
        with self._write() as s:
            rows = s.execute(
                select(Job.id, Job.attempts, Job.cancel_requested, Job.progress)
                .where(Job.status == "running",
                       *_stale_or_only(Job, Job.heartbeat_at, stale_before, only))
            ).all()
            for job_id, attempts, cancel, progress in rows:
                values: dict[str, Any] = {"updated_at": now, "worker": None}
                data: dict[str, Any] = {"attempts": attempts}
                if cancel:
                    values |= {"status": "cancelled", "finished_at": now}
                elif attempts >= max_attempts:
                    message = (
                        f"the worker died {attempts} times while running this job, probably "
                        "out of memory (killed by the system): lower calibration.num_samples "
                        "or seq_length, or run it on a machine with more memory"
                    )
                    values |= {"status": "failed", "finished_at": now,
                               "error_code": "worker_lost", "error_message": message}
                    data["error"] = {"code": "worker_lost", "message": message}
                else:
                    # the next attempt resumes from the finished blocks: progress stays
                    values |= {"status": "queued", "progress": {
                        "stage": "queued", "fraction": progress_fraction(progress),
                        "message": "requeued: its worker stopped"}}
                n = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == "running", Job.attempts == attempts)
                    .values(**values)
                ).rowcount
                if n:
                    self._append_event(s, job_id, "status", {"status": values["status"], **data})
                    (requeued if values["status"] == "queued" else ended).append(job_id)
        return requeued, ended

    def delete_job(self, job_id: str) -> bool:
        """Deletes a finished job's rows; False when it is still queued or running."""
        with self._write() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in TERMINAL:
                return False
            s.execute(delete(FollowUp).where(FollowUp.job_id == job_id))
            s.execute(delete(Event).where(Event.job_id == job_id))
            s.execute(delete(Job).where(Job.id == job_id))
        return True

    # -- datasets ----------------------------------------------------------------------------

    def add_dataset(self, ds: Dataset) -> Dataset:
        with self._write() as s:
            s.add(ds)
        return ds

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self._read() as s:
            return s.get(Dataset, dataset_id)

    def list_datasets(self, owner: str | None, limit: int = 50, cursor: str | None = None
                      ) -> tuple[list[Dataset], str | None]:
        """Newest first, a page at a time (see list_jobs); `owner=None` lists everyone's."""
        q = select(Dataset)
        if owner is not None:
            q = q.where(Dataset.owner == owner)
        return self._page(q, Dataset, DATASET_ID, limit, cursor)

    # -- follow-ups: verifications and publications ------------------------------------------

    def create_follow_up(self, job_id: str, spec: dict,
                         kind: FollowUpKind = "verification") -> FollowUp:
        v = FollowUp(
            id=new_id(FOLLOW_UPS[kind].prefix), job_id=job_id, status="queued", spec=spec,
            created_at=utcnow(), attempts=0, kind=kind,
        )
        with self._write() as s:
            s.add(v)
        return v

    def queued_follow_ups(self) -> dict[str, datetime]:
        """Queued follow-ups' ids with when each was created (one read per reconcile pass)."""
        with self._read() as s:
            return {vid: created for vid, created in s.execute(
                select(FollowUp.id, FollowUp.created_at)
                .where(FollowUp.status == "queued"))}

    def get_follow_up(self, follow_up_id: str) -> FollowUp | None:
        with self._read() as s:
            return s.get(FollowUp, follow_up_id)

    def list_follow_ups(self, job_id: str, limit: int = 50, cursor: str | None = None,
                        kind: FollowUpKind = "verification") -> tuple[list[FollowUp], str | None]:
        """A job's follow-ups of one kind, newest first, a page at a time (see list_jobs)."""
        q = select(FollowUp).where(FollowUp.job_id == job_id, _kind_is(kind))
        return self._page(q, FollowUp, FOLLOW_UPS[kind].id_shape, limit, cursor)

    def claim_follow_up(self, follow_up_id: str) -> FollowUp | None:
        now = utcnow()
        with self._write() as s:
            n = s.execute(
                update(FollowUp)
                .where(FollowUp.id == follow_up_id, FollowUp.status == "queued")
                .values(status="running", started_at=now, heartbeat_at=now,
                        attempts=FollowUp.attempts + 1)
            ).rowcount
        return self.get_follow_up(follow_up_id) if n else None

    def heartbeat_follow_up(self, follow_up_id: str, attempt: int,
                            progress: dict | None = None) -> bool:
        """A running follow-up's beat, with its progress when given; False if no longer
        this attempt's."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = progress
        with self._write() as s:
            return bool(s.execute(
                update(FollowUp)
                .where(FollowUp.id == follow_up_id, FollowUp.status == "running",
                       FollowUp.attempts == attempt)
                .values(**values)
            ).rowcount)

    def requeue_stale_follow_ups(
        self, stale_before: datetime | None, max_attempts: int, *,
        only: tuple[str, int] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Running follow-ups whose worker stopped beating: queued again (the caller re-sends
        them), or failed as worker_lost once they used max_attempts. (requeued, failed).
        only=(follow-up id, attempt) as in requeue_stale."""
        requeued, ended = [], []
        now = utcnow()
        # rows from before heartbeats were kept have only started_at
        beat = func.coalesce(FollowUp.heartbeat_at, FollowUp.started_at)
        with self._write() as s:
            rows = s.execute(
                select(FollowUp.id, FollowUp.attempts, FollowUp.kind).where(
                    FollowUp.status == "running",
                    *_stale_or_only(FollowUp, beat, stale_before, only),
                )
            ).all()
            for vid, attempts, kind in rows:
                if attempts >= max_attempts:
                    kind = kind or "verification"
                    values: dict[str, Any] = {
                        "status": "failed", "finished_at": now, "error_code": "worker_lost",
                        "error_message": f"the worker died {attempts} times while running this "
                        f"{kind}, {FOLLOW_UPS[kind].lost_advice}"}
                else:
                    values = {"status": "queued", "heartbeat_at": None, "progress": None}
                n = s.execute(
                    update(FollowUp)
                    .where(FollowUp.id == vid, FollowUp.status == "running",
                           FollowUp.attempts == attempts)
                    .values(**values)
                ).rowcount
                if n:
                    (requeued if values["status"] == "queued" else ended).append(vid)
        return requeued, ended

    def finish_follow_up(
        self,
        follow_up_id: str,
        status: str,
        *,
        result: dict | None = None,
        error: tuple[str, str] | None = None,
        attempt: int | None = None,
        progress: dict | None = None,
    ) -> bool:
        """attempt: only if the follow-up is still in that attempt (a worker presumed dead
        and replaced must not overwrite its successor's result); progress: the last one, with
        where it ended."""
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "result": result}
        if progress is not None:
            values["progress"] = progress
        if error is not None:
            values["error_code"], values["error_message"] = error
        mine = [FollowUp.id == follow_up_id, FollowUp.status == "running"]
        if attempt is not None:
            mine.append(FollowUp.attempts == attempt)
        with self._write() as s:
            return bool(
                s.execute(
                    update(FollowUp)
                    .where(*mine)
                    .values(**values)
                ).rowcount
            )
