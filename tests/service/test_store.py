"""The job store on PostgreSQL (its own schema) and on SQLite: the atomic transitions the
service relies on, under real concurrency (threads, each with its own connections)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from app.store import Store
from tests.service.conftest import pg_schema

pytestmark = pytest.mark.service


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store per test: its own PostgreSQL schema, or its own SQLite file."""
    with ExitStack() as stack:
        url = (stack.enter_context(pg_schema()) if request.param == "postgresql"
               else f"sqlite:///{tmp_path / 'store.sqlite'}")
        s = Store(url)
        s.create_all()
        yield s
        s.dispose()


def _job(store: Store, owner: str = "alice", key: str | None = None, spec_hash: str = "h"):
    return store.create_job(owner=owner, model_id="m", spec={"x": 1}, spec_hash=spec_hash,
                            name=None, idempotency_key=key)


def _race(n: int, fn) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_only_one_of_many_workers_claims_a_job(store: Store) -> None:
    job, _ = _job(store)
    claims = _race(6, lambda i: store.claim_job(job.id, f"w{i}"))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    assert winners[0].status == "running" and winners[0].attempts == 1


def test_event_seqs_have_no_gap_or_repeat_under_concurrent_writers(store: Store) -> None:
    job, _ = _job(store)
    claimed = store.claim_job(job.id, "w")
    _race(4, lambda i: [store.record_progress(job.id, claimed.attempts, {"fraction": 0.1},
                                              {"writer": i}) for _ in range(10)])
    store.cancel_job(job.id)
    events = store.events_after(job.id, 0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len(events) == 2 + 40 + 1  # queued, running, 40 progress, cancel_requested
    assert [e.seq for e in store.events_after(job.id, 20)] == list(range(21, len(events) + 1))


def test_terminal_states_never_change(store: Store) -> None:
    job, _ = _job(store)
    claimed = store.claim_job(job.id, "w")
    assert store.finish_job(job.id, claimed.attempts, "succeeded", artifacts=[])
    assert not store.finish_job(job.id, claimed.attempts, "failed", error=("x", "y"))
    assert store.cancel_job(job.id).status == "succeeded"
    assert store.claim_job(job.id, "w2") is None
    # a stale attempt cannot finish a job that was handed to another attempt
    other, _ = _job(store)
    first = store.claim_job(other.id, "w")
    assert not store.finish_job(other.id, first.attempts + 1, "succeeded")


def test_cancel_queued_is_immediate_and_the_job_cannot_be_claimed(store: Store) -> None:
    job, _ = _job(store)
    assert store.cancel_job(job.id).status == "cancelled"
    assert store.claim_job(job.id, "w") is None


def test_idempotency_key_under_concurrent_requests(store: Store) -> None:
    results = _race(5, lambda i: _job(store, key="same"))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_listing_is_newest_first_with_a_cursor_and_per_owner(store: Store) -> None:
    ids = [_job(store, owner="bob")[0].id for _ in range(5)]
    _job(store, owner="carol")
    seen, cursor = [], None
    while True:
        page, cursor = store.list_jobs(owner="bob", limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    everyone, _ = store.list_jobs(owner=None, limit=100)
    assert len(everyone) >= 6


def test_a_job_whose_worker_stopped_is_requeued_then_failed_past_max_attempts(
    store: Store,
) -> None:
    from datetime import timedelta

    from app.db import utcnow

    job, _ = _job(store)
    for attempt in (1, 2):
        claimed = store.claim_job(job.id, f"w{attempt}")
        assert claimed.attempts == attempt
        requeued, ended = store.requeue_stale(utcnow() - timedelta(hours=1), 2)
        assert job.id not in requeued + ended  # its worker still beats
        requeued, ended = store.requeue_stale(utcnow() + timedelta(seconds=1), 2)
        assert job.id in (requeued if attempt == 1 else ended)
        assert not store.finish_job(job.id, attempt, "succeeded")  # the stale attempt is fenced
    job = store.get_job(job.id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert "out of memory" in job.error_message
    statuses = [e.data["status"] for e in store.events_after(job.id, 0) if e.type == "status"]
    assert statuses == ["queued", "running", "queued", "running", "failed"]


def test_concurrent_reconcilers_hand_each_unclaimed_job_to_one_of_them(store: Store) -> None:
    from datetime import timedelta

    from app.db import utcnow

    ids = [_job(store)[0].id for _ in range(6)]
    store.claim_job(ids[0], "w")  # running: never re-sent
    assert store.take_unclaimed(utcnow() - timedelta(hours=1)) == []  # all sent just now
    time.sleep(0.6)
    before = utcnow() - timedelta(seconds=0.3)  # after the jobs were sent, before now
    taken = _race(4, lambda _: store.take_unclaimed(before))
    flat = [job_id for got in taken for job_id in got]
    assert sorted(flat) == sorted(ids[1:]), taken  # each queued job exactly once
    assert store.take_unclaimed(before) == []  # marked as sent again
    assert store.owns(ids[0], 1) and not store.owns(ids[0], 2) and not store.owns(ids[1], 1)


class RecordingSender:
    """Stands in for the broker: records what a reconciler sends."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def declare(self) -> None:
        pass

    def pending_ids(self) -> set[str] | None:
        return set()  # the broker holds nothing: every waiting job's message is lost

    def send_job(self, job_id: str) -> bool:
        with self.lock:
            self.sent.append(job_id)
        return True

    send_follow_up = send_job


def test_reconcilers_in_several_workers_requeue_and_resend_each_job_once(
    store: Store, tmp_path: Path
) -> None:
    from app.settings import Settings
    from worker.reconciler import reconcile

    # a pass that starts more than resend_seconds after another requeued a job would re-send
    # it: 1 s leaves room for a loaded machine's scheduling delays (0.3 s once failed here)
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.1, stale_seconds=1.0,
                        resend_seconds=1.0, max_attempts=2)
    dead = [_job(store)[0].id for _ in range(3)]
    for job_id in dead:
        store.claim_job(job_id, "killed-worker")
    (settings.work_dir / dead[0]).mkdir(parents=True)
    lost = [_job(store)[0].id for _ in range(3)]  # queued, their messages gone
    time.sleep(1.2)
    sender = RecordingSender()
    passes = _race(4, lambda _: reconcile(store, settings, sender))
    assert sorted(sender.sent) == sorted(dead + lost)  # each exactly once
    assert sorted(j for p in passes for j in p.requeued) == sorted(dead)
    assert sorted(j for p in passes for j in p.resent) == sorted(lost)
    assert all(store.get_job(j).status == "queued" for j in dead + lost)
    assert (settings.work_dir / dead[0]).is_dir()  # kept: the next attempt resumes from it

    # the second time they die, they used max_attempts: failed, and their leftovers removed
    for job_id in dead:
        assert store.claim_job(job_id, "killed-again").attempts == 2
    time.sleep(1.2)
    ended = reconcile(store, settings, RecordingSender()).ended
    assert sorted(ended) == sorted(dead)
    job = store.get_job(dead[0])
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert "died 2 times" in job.error_message and "num_samples" in job.error_message
    assert not (settings.work_dir / dead[0]).exists()


def test_a_verification_whose_worker_stopped_is_requeued_then_failed(store: Store, tmp_path: Path) -> None:
    from app.settings import Settings
    from worker.reconciler import reconcile

    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.1, stale_seconds=0.3,
                        resend_seconds=60, max_attempts=2)
    job, _ = _job(store)
    v = store.create_follow_up(job.id, {"max_windows": 1})
    beating = store.create_follow_up(job.id, {"max_windows": 2})
    for attempt in (1, 2):
        assert store.claim_follow_up(v.id).attempts == attempt
        if attempt == 1:
            store.claim_follow_up(beating.id)
        time.sleep(0.2)
        assert store.heartbeat_follow_up(beating.id, 1)
        assert store.heartbeat_follow_up(v.id, attempt)  # alive: left alone
        assert reconcile(store, settings, RecordingSender()).requeued == []
        time.sleep(0.5)
        assert store.heartbeat_follow_up(beating.id, 1)
        sender = RecordingSender()
        done = reconcile(store, settings, sender)
        if attempt == 1:
            assert done.requeued == [v.id] and sender.sent == [v.id]
            assert store.get_follow_up(v.id).status == "queued"
            # the presumed-dead attempt finishing late is fenced off
            assert not store.finish_follow_up(v.id, "succeeded", result={}, attempt=1)
            assert not store.heartbeat_follow_up(v.id, 1)
        else:
            assert done.ended == [v.id] and sender.sent == []
    gone = store.get_follow_up(v.id)
    assert gone.status == "failed" and gone.error_code == "worker_lost"
    assert "died 2 times" in gone.error_message and "max_windows" in gone.error_message
    assert store.get_follow_up(beating.id).status == "running"


def test_a_store_from_before_verification_heartbeats_gains_the_columns(tmp_path: Path) -> None:
    """create_all() adds nullable columns a store of an older version lacks; rows survive."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    Store(url).create_all()
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("INSERT INTO gptqd_verifications (id, job_id, status, spec, created_at, attempts) "
               "VALUES ('ver_old', 'job_x', 'queued', '{}', '2026-01-01 00:00:00', 0)")
    db.execute("ALTER TABLE gptqd_verifications DROP COLUMN heartbeat_at")
    db.execute("ALTER TABLE gptqd_verifications DROP COLUMN progress")  # and its progress
    db.execute("ALTER TABLE gptqd_verifications DROP COLUMN kind")  # from before publications
    db.commit()
    columns = [r[1] for r in db.execute("PRAGMA table_info(gptqd_verifications)")]
    assert not {"heartbeat_at", "progress", "kind"} & set(columns)
    db.close()
    store = Store(url)
    store.create_all()
    old = store.get_follow_up("ver_old")
    assert old.heartbeat_at is None and old.progress is None and old.kind is None
    # a row from before publications is a verification
    assert [v.id for v in store.list_follow_ups("job_x")[0]] == ["ver_old"]
    assert store.list_follow_ups("job_x", kind="publication")[0] == []
    assert store.claim_follow_up("ver_old").heartbeat_at is not None
    assert store.heartbeat_follow_up("ver_old", 1, {"stage": "loading", "fraction": 0.0})
    assert store.get_follow_up("ver_old").progress == {"stage": "loading", "fraction": 0.0}


def test_publications_are_listed_apart_and_a_lost_one_fails_with_its_own_advice(
        store: Store) -> None:
    from app.dispatch import ITEM_ID

    job, _ = _job(store)
    v = store.create_follow_up(job.id, {"max_windows": 1})
    p = store.create_follow_up(job.id, {"repo_id": "team/x"}, kind="publication")
    assert p.id.startswith("pub_") and p.kind == "publication" and v.kind == "verification"
    assert [x.id for x in store.list_follow_ups(job.id)[0]] == [v.id]
    assert [x.id for x in store.list_follow_ups(job.id, kind="publication")[0]] == [p.id]
    assert set(store.queued_follow_ups()) >= {v.id, p.id}  # the reconciler re-sends both kinds
    # the broker's messages name it (a message the reconciler cannot see would be re-sent)
    assert ITEM_ID.findall(f"['{p.id}']".encode()) == [p.id.encode()]
    assert store.claim_follow_up(p.id).attempts == 1
    requeued, ended = store.requeue_stale_follow_ups(None, 1, only=(p.id, 1))
    assert (requeued, ended) == ([], [p.id])
    lost = store.get_follow_up(p.id)
    assert lost.status == "failed" and lost.error_code == "worker_lost"
    assert "publication" in lost.error_message and "max_windows" not in lost.error_message


class BrokerHolding(RecordingSender):
    """A broker that holds the messages of the given ids and nothing else."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held

    def pending_ids(self) -> set[str] | None:
        return set(self.held)


def test_a_lost_message_is_resent_once_two_passes_missed_it(store: Store, tmp_path: Path) -> None:
    from app.settings import Settings
    from worker.reconciler import reconcile

    # resend_seconds far away: only the two-passes rule can re-send within this test
    # (a pass re-sends a job marked sent more than reconcile_seconds/2 ago: 0.6 s keeps the third
    # pass below it on a loaded machine, where 0.2 s once did not)
    settings = Settings(data_dir=tmp_path, reconcile_seconds=1.2, resend_seconds=3600)
    lost, held = _job(store)[0].id, _job(store)[0].id
    v = store.create_follow_up(held, {"max_windows": 1})
    time.sleep(0.7)
    sender = BrokerHolding({held})
    first = reconcile(store, settings, sender)
    assert first.missing == {lost, v.id} and first.resent == [] and sender.sent == []
    second = reconcile(store, settings, sender, first.missing)
    assert sorted(second.resent) == sorted([lost, v.id]) and sorted(sender.sent) == sorted([lost, v.id])
    # still missing right after: the job was marked sent just now, so it is not sent again yet
    # (another reconciler's pass in between would not send it twice); the verification has no
    # mark and goes out on every pass that finds it missing twice
    third = reconcile(store, settings, BrokerHolding({held}), second.missing)
    assert lost not in third.resent
    time.sleep(0.7)
    fourth = reconcile(store, settings, BrokerHolding({held}), third.missing)
    assert lost in fourth.resent  # lost again: re-sent again, half a pass period later
    assert store.get_job(held).status == "queued"  # never re-sent: its message is there


def test_progress_never_goes_back_across_attempts(store: Store) -> None:
    job, _ = _job(store)
    store.claim_job(job.id, "w1")
    assert store.record_progress(job.id, 1, {"stage": "quantizing", "fraction": 0.37}, {})
    requeued, _ = store.requeue_stale(None, 3, only=(job.id, 1))
    assert requeued == [job.id]
    assert store.get_job(job.id).progress["fraction"] == 0.37
    again = store.claim_job(job.id, "w2")
    assert again.attempts == 2 and again.progress == {
        "stage": "starting", "fraction": 0.37, "message": "starting"}
    # only the named attempt is requeued: a later one that is alive is left alone
    assert store.requeue_stale(None, 3, only=(job.id, 1)) == ([], [])
    assert store.get_job(job.id).status == "running"


def test_every_list_pages_the_same_way(store: Store) -> None:
    """Jobs, datasets and verifications: newest first, `limit` per page, a cursor to the next
    page (None on the last), and a cursor of another list is refused."""
    from datetime import timedelta

    from app.db import utcnow
    from app.store import Dataset, new_id

    job, _ = _job(store)
    now = utcnow()
    datasets = [store.add_dataset(Dataset(
        id=new_id("ds"), owner="alice", filename=f"d{i}.txt", format="txt", size=1,
        sha256="0" * 64, created_at=now + timedelta(seconds=i))) for i in range(3)]
    verifications = []
    for _ in range(3):
        verifications.append(store.create_follow_up(job.id, {}))
        time.sleep(0.01)
    for fetch, made in (
            (lambda limit, cursor: store.list_datasets("alice", limit, cursor), datasets),
            (lambda limit, cursor: store.list_follow_ups(job.id, limit, cursor), verifications)):
        first, cursor = fetch(2, None)
        assert [x.id for x in first] == [made[2].id, made[1].id] and cursor
        rest, end = fetch(2, cursor)
        assert [x.id for x in rest] == [made[0].id] and end is None
    other = store.list_datasets("alice", 1)[1]
    with pytest.raises(ValueError, match="not one returned by this list"):
        store.list_follow_ups(job.id, 2, other)  # a datasets cursor
