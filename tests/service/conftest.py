"""Real processes for the service tests: uvicorn on a free port, Celery worker subprocesses,
Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (db `test`).

One "team" box (PostgreSQL store + Redis broker) is shared by the whole session; each session
uses its own Redis db/queue name and its own PostgreSQL schema, so parallel runs do not mix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.box import api_command, free_port, spawn, stop, wait_ready, worker_command
from app.tinymodel import TinySpec, build_tiny_llama

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = 11  # keep away from db 0, which other tools on the machine use
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

TINY = TinySpec(hidden=64, intermediate=128, layers=2, heads=4, vocab=512)
DEEP = TinySpec(hidden=64, intermediate=128, layers=8, heads=4, vocab=512)


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis(REDIS_HOST, REDIS_PORT, socket_timeout=2).ping())
    except redis.RedisError:
        return False


@dataclass
class Box:
    """An API server and its workers, all sharing one environment."""

    url: str
    env: dict[str, str]
    data_dir: Path
    queue: str
    api: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def add_worker(self, name: str, timeout: float = 120) -> subprocess.Popen:
        """Starts a worker and waits until it consumes from the queue and its first job
        process has imported the engine (a job it takes then starts at once)."""
        from worker.jobprocess import READY_LINE

        log = self.data_dir / f"{name}.log"
        proc = spawn(worker_command(name, self.queue), self.env, log)
        self.workers.append(proc)
        deadline = time.monotonic() + timeout
        while not all(line in (log.read_text(errors="replace") if log.exists() else "")
                      for line in ("ready.", READY_LINE)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return proc

    def remove_worker(self, proc: subprocess.Popen) -> None:
        stop(proc, timeout=20)
        self.workers.remove(proc)

    def close(self) -> None:
        for proc in list(self.workers):
            stop(proc, timeout=20)
        stop(self.api, timeout=10)


def start_box(data_dir: Path, models_dir: Path, extra_env: dict[str, str], workers: int) -> Box:
    queue = f"gptqd-test-{uuid.uuid4().hex[:8]}"
    env = {
        "GPTQD_DATA_DIR": str(data_dir),
        "GPTQD_MODELS_DIR": str(models_dir),
        "GPTQD_QUEUE": queue,
        "GPTQD_PROGRESS_INTERVAL": "0.2",
        "GPTQD_HEARTBEAT_SECONDS": "2",
        **extra_env,
    }
    for key in ("GPTQD_DATABASE_URL", "GPTQD_BROKER_URL", "GPTQD_API_KEYS"):
        env.setdefault(key, "")  # the embedded defaults unless the test says otherwise
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = spawn(api_command("127.0.0.1", port), env, data_dir / "api.log")
    box = Box(url=f"http://127.0.0.1:{port}", env=env, data_dir=data_dir, queue=queue, api=api)
    try:
        wait_ready(box.url, timeout=90, proc=api)
        for i in range(workers):
            box.add_worker(f"w{i + 1}")
    except BaseException:
        print((data_dir / "api.log").read_text(errors="replace")[-3000:])
        box.close()
        raise
    return box


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_llama(root / "tiny", TINY)
    build_tiny_llama(root / "tiny-deep", DEEP)
    return root


@contextmanager
def pg_schema() -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a schema of their own, dropped afterwards."""
    import sqlalchemy as sa

    schema = f"gptqd_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


STORES = ["sqlite", "postgresql"]  # params of fixtures whose tests must hold on either store


@contextmanager
def store_env(kind: str) -> Iterator[dict[str, str]]:
    """The environment of a box on that store: SQLite in its data dir (the default) or a
    PostgreSQL schema of its own, dropped afterwards."""
    if kind == "sqlite":
        yield {}
        return
    assert kind == "postgresql", kind
    with pg_schema() as url:
        yield {"GPTQD_DATABASE_URL": url}


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url


@pytest.fixture(scope="session")
def team_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, pg_url: str
             ) -> Iterator[Box]:
    """PostgreSQL store + Redis broker + one worker, shared by the session."""
    if not _redis_up():
        pytest.fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} (scripts/run-tests.sh starts it)")
    box = start_box(
        tmp_path_factory.mktemp("team"), models_dir,
        {"GPTQD_DATABASE_URL": pg_url,
         "GPTQD_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"},
        workers=1,
    )
    yield box
    box.close()
    _dump_logs_on_failure(box)


def _dump_logs_on_failure(box: Box) -> None:
    if os.environ.get("GPTQD_TEST_KEEP_LOGS"):
        keep = Path(os.environ["GPTQD_TEST_KEEP_LOGS"])
        keep.mkdir(parents=True, exist_ok=True)
        for log in box.data_dir.glob("*.log"):
            shutil.copy(log, keep / log.name)


def wait_status(http: httpx.Client, job_id: str, statuses: tuple[str, ...],
                timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        time.sleep(0.1)


TERMINAL = ("succeeded", "failed", "cancelled")
NO_VERIFY = {"perplexity": False, "prompts": []}  # for tests that only need the job to run


def tiny_spec(**overrides: object) -> dict:
    """A job that takes seconds on the tiny model: builtin text, 8 windows of 64 tokens."""
    spec = {
        "model_id": "tiny",
        "group_size": 32,
        "calibration": {"dataset": "builtin", "num_samples": 8, "seq_length": 64},
        "verify": {"max_windows": 4, "max_new_tokens": 8, "prompts": ["Return the"]},
    }
    spec.update(overrides)
    return spec


CHROMIUM = os.environ.get("GPTQD_CHROMIUM", "/usr/bin/chromium")
# a closed network: background services would only fill the log with refused connections
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        reason = f"chromium not found at {CHROMIUM} (make test installs Debian's chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()
