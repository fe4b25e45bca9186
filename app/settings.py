"""Service settings from the environment (prefix GPTQD_), with defaults that run on one machine.

Defaults: data under ./var, a SQLite job store and an embedded broker (kombu's SQLAlchemy
transport on a SQLite file) under the data dir, so nothing else has to be installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: str
    admin: bool


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPTQD_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None  # default: sqlite:///<data_dir>/gptqd.sqlite
    broker_url: str | None = None  # default: sqla+sqlite:///<data_dir>/broker.sqlite
    models_dir: Path | None = None  # default: <data_dir>/models
    queue: str = "gptqd"  # Celery queue the API sends to and the workers consume

    # "name:secret" entries separated by commas; names listed in admin_keys see every job
    api_keys: SecretStr = SecretStr("")
    admin_keys: str = "admin"
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HF_TOKEN", "GPTQD_HF_TOKEN")
    )
    allow_trust_remote_code: bool = False
    # hub namespaces (users, organisations) publications may go to, comma separated; empty:
    # wherever the hub token may write
    publish_namespaces: str = ""

    # Redis redelivers an unacked message after this long: it must exceed the longest job.
    visibility_timeout: int = 72 * 3600
    max_attempts: int = 3
    heartbeat_seconds: float = 10.0
    # the reconciler (in every worker) runs at start and then this often; it requeues running
    # jobs whose heartbeat is older than stale_seconds and re-sends queued jobs whose message
    # went out more than resend_seconds ago without being claimed
    reconcile_seconds: float = 30.0
    stale_seconds: float = 60.0
    resend_seconds: float = 300.0
    # address-space limit (RLIMIT_AS) of each job's process in MiB, so a job that needs more
    # fails with out_of_memory instead of waking the kernel's OOM killer; CPU workers only
    # (CUDA maps far more address space than it uses)
    job_memory_limit_mb: int | None = None
    progress_interval: float = 1.0  # least seconds between two stored progress updates
    max_upload_bytes: int = 256 * 1024 * 1024
    max_queued_per_key: int = 100
    device: str | None = None  # engine device for workers (None: cuda when present, else cpu)
    # a job asked for sample text loads the whole model only while it takes at most this share
    # of the memory free (host, and card on a GPU); otherwise it streams the model block by
    # block and measures perplexity only (worker/gptq/residency.py)
    whole_model_share: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _stale_after_beats(self) -> Settings:
        if self.stale_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("GPTQD_STALE_SECONDS must be more than twice GPTQD_HEARTBEAT_SECONDS")
        return self

    @field_validator("data_dir", "models_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @property
    def publish_to(self) -> list[str]:
        return [n.strip() for n in self.publish_namespaces.split(",") if n.strip()]

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'gptqd.sqlite'}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def models_root(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def work_dir(self) -> Path:
        """Finished blocks of running jobs, kept so a restarted attempt resumes from them."""
        return self.data_dir / "work"

    def keys(self) -> list[ApiKey]:
        admins = {n.strip() for n in self.admin_keys.split(",") if n.strip()}
        out = []
        for entry in self.api_keys.get_secret_value().split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, secret = entry.partition(":")
            if not sep or not name or not secret:
                raise ValueError("GPTQD_API_KEYS entries must look like name:secret")
            out.append(ApiKey(name=name, secret=secret, admin=name in admins))
        return out

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.artifacts_dir, self.datasets_dir, self.models_root):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
