"""Request and response bodies of the HTTP API (pydantic). Unknown fields are refused."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from worker.gptq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from worker.gptq.module_rules import OVERRIDABLE, rules_problem

T = TypeVar("T")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# a hub id ("gpt2", "org/name") or a directory name under the models root
_MODEL_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*$")
WIKITEXT = "Salesforce/wikitext"  # the default calibration text, by its hub id
_DATASET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")
_NAMEISH = re.compile(r"^[A-Za-z0-9_.\-]+$")
# ids the store hands out (store.new_id): a prefix and 32 hex digits
JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
VERIFICATION_ID = re.compile(r"^ver_[0-9a-f]{32}$")
PUBLICATION_ID = re.compile(r"^pub_[0-9a-f]{32}$")
DATASET_ID = re.compile(r"^ds_[0-9a-f]{32}$")
# C0 control characters but tab, LF and CR (legitimate in text such as prompts): NUL is refused
# by PostgreSQL and the rest have no place in a request; refused in every string of a request.
# DEL and C1 (U+007F-U+009F) are kept: they turn up in real text (NEL, mis-decoded cp1252)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _json_integer(value: Any) -> Any:
    """A Literal of ints takes 4.0 for 4 (4.0 == 4), even in strict mode: not here."""
    if type(value) is not int:
        raise ValueError("must be a JSON integer")
    return value


Bits = Annotated[Literal[2, 3, 4, 8], BeforeValidator(_json_integer)]
GroupSize = Annotated[Literal[-1, 16, 32, 64, 128, 256, 512, 1024], BeforeValidator(_json_integer)]
assert set(Bits.__origin__.__args__) == set(SUPPORTED_BITS)  # one source of truth: the engine config
assert set(GroupSize.__origin__.__args__) == set(SUPPORTED_GROUP_SIZES)

Prompt = Annotated[str, Field(min_length=1, max_length=1000)]


def check_text(value: str) -> str:
    """The one check every string a client sends goes through (bodies, query, filenames)."""
    found = _CONTROL.search(value)
    if found:
        raise ValueError(
            f"must not contain control characters (found U+{ord(found.group()):04X} at "
            f"position {found.start()}); tab and newline are allowed"
        )
    return value


def _check_strings(value: Any) -> Any:
    """check_text on a string, or on every string inside a list or dict."""
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    return value


# a query parameter or header of text: the same check as every string of a body
CleanStr = Annotated[str, AfterValidator(check_text)]


def _check_dataset_id(v: str) -> str:
    if not DATASET_ID.match(v):
        raise ValueError("must be an id returned by POST /datasets (ds_ and 32 hex digits)")
    return v


DatasetId = Annotated[str, AfterValidator(_check_dataset_id)]


class Strict(BaseModel):
    """Base of every request body: unknown fields and control characters are refused, and JSON
    types are taken as they are (no "4" for 4, no "true" for true)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # every field of every body, so a new field cannot forget it; nested bodies check their own
    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        return _check_strings(value)


def _no_dotdot(value: str, what: str) -> str:
    if ".." in value.split("/") or ".." in value:
        raise ValueError(f"{what} must not contain '..'")
    return value


class CalibrationIn(Strict):
    """Calibration text: a hub dataset (dataset/config/split), "builtin", or an uploaded dataset."""

    # the stored spec keeps only what applies: no config/split for builtin or uploaded text, no
    # dataset for an uploaded one, and the wikitext config only for wikitext (by its hub id, or
    # its old name, which the worker resolves to the id: worker/gptq/calibration.py)
    dataset: Annotated[str, Field(min_length=1, max_length=200)] | None = WIKITEXT
    config: Annotated[str, Field(min_length=1, max_length=200)] | None = "wikitext-2-raw-v1"
    split: Annotated[str, Field(min_length=1, max_length=100)] | None = "train"
    text_field: Annotated[str, Field(min_length=1, max_length=100)] = "text"
    dataset_id: DatasetId | None = None
    num_samples: int = Field(128, ge=1, le=4096)
    seq_length: int = Field(512, ge=8, le=32768)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not _DATASET.match(v):
            raise ValueError(f"dataset must be a hub dataset id like {WIKITEXT!r} or 'builtin'")
        return _no_dotdot(v, "dataset")

    @field_validator("dataset", "split", mode="before")
    @classmethod
    def _given_as_text(cls, v: Any) -> Any:
        # None is what the stored spec says where they do not apply; a client gives text
        if v is None:
            raise ValueError("must be a string (leave it out for the default)")
        return v

    @field_validator("config", "split", "text_field")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        if v is not None and (not _NAMEISH.match(v) or v.startswith(".")):
            raise ValueError("may contain only letters, digits, '_', '-' and '.'")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationIn:
        if self.dataset_id is not None and "dataset" in self.model_fields_set:
            raise ValueError("give either calibration.dataset or calibration.dataset_id, not both")
        if self.dataset_id is not None:
            self.dataset = None
        if self.dataset_id is not None or self.dataset == "builtin":
            self.config = self.split = None  # a hub dataset's coordinates: nothing to echo
        elif "config" not in self.model_fields_set and self.dataset not in (WIKITEXT, "wikitext"):
            self.config = None  # the default config belongs to the default dataset
        return self


class VerificationIn(Strict):
    """Perplexity on a text and generations from prompts, measured on a stored checkpoint."""

    dataset_id: DatasetId | None = None  # held-out text; default: the calibration source's text
    seq_length: int | None = Field(None, ge=8, le=32768)  # default: calibration seq_length
    max_windows: int | None = Field(16, ge=1, le=10000)
    prompts: list[Prompt] = Field(default_factory=lambda: ["Once upon a time"], max_length=16)
    max_new_tokens: int = Field(32, ge=0, le=1024)


class VerifyIn(VerificationIn):
    """What a job measures after quantizing: perplexity before/after and sample generations."""

    perplexity: bool = True


# a hub repository, as the hub names them: namespace/name of letters, digits, '_', '-', '.'
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")


class PublicationIn(Strict):
    """Where a succeeded job's checkpoint goes on the Hugging Face hub. The worker's token
    (GPTQD_HF_TOKEN) writes it; a token is never part of a request."""

    repo_id: Annotated[str, Field(min_length=3, max_length=200)]
    private: bool = True  # a repository created now; an existing one keeps its visibility
    branch: Annotated[str, Field(min_length=1, max_length=100)] | None = None  # None: main
    commit_message: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    model_card: bool = True  # a README.md saying how the model was quantized and what it lost

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not _REPO_ID.match(v):
            raise ValueError("repo_id must be 'namespace/name' (a user or organisation, then "
                             "letters, digits, '_', '-', '.')")
        name = v.split("/", 1)[1]
        if len(name) > 96:
            raise ValueError("repo_id's name must be at most 96 characters")
        if "--" in v or ".." in v or v.endswith(".git") or name.startswith((".", "-")):
            raise ValueError("repo_id must not contain '--' or '..', nor end in '.git'")
        return v

    @field_validator("branch")
    @classmethod
    def _branch(cls, v: str | None) -> str | None:
        if v is not None and (not _REVISION.match(v) or ".." in v or v.endswith(("/", ".lock"))):
            raise ValueError("branch must be a git branch name (letters, digits, '_', '-', '.', '/')")
        return v


class ModuleSettings(Strict):
    """What a `dynamic` rule sets for the layers it matches; the rest are the job's."""

    bits: Bits | None = None
    group_size: GroupSize | None = None
    desc_act: bool | None = None
    damp_percent: float | None = Field(None, gt=0, lt=1)


assert set(ModuleSettings.model_fields) == set(OVERRIDABLE)  # the engine's list, one source


class JobIn(Strict):
    model_id: Annotated[str, Field(min_length=1, max_length=200)]
    revision: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    bits: Bits = 4
    group_size: GroupSize = 128
    damp_percent: float = Field(0.01, gt=0, lt=1)
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    act_group_aware: bool = True
    mse: bool = True
    # the checkpoint's tensor names: as transformers names the modules (what GPTQModel reads),
    # or as the model's own checkpoints do (what vLLM reads for Mixtral; the same elsewhere)
    tensor_names: Literal["module", "original"] = "module"
    # per-layer settings, GPTQModel's `dynamic` syntax (docs/api.md "Settings per layer"):
    # {"+:regex": {"bits": 8}} overrides, {"-:regex": {}} leaves layers unquantized
    dynamic: dict[str, ModuleSettings] | None = None
    trust_remote_code: bool = False
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    verify: VerifyIn = Field(default_factory=VerifyIn)
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None

    @field_validator("dynamic", mode="before")
    @classmethod
    def _dynamic_rules(cls, v: Any) -> Any:
        """The rules' own shape (regexes, skip rules without settings, known keys), with the
        engine's words; the settings' values are then checked as ModuleSettings."""
        problem = rules_problem(v) if isinstance(v, dict) else None
        if problem:
            raise ValueError(problem)
        return v

    @field_serializer("dynamic")
    def _dynamic_compact(self, rules: dict[str, ModuleSettings] | None) -> dict[str, dict] | None:
        # stored and shown as given: a rule's unset settings are the job's, not nulls
        return None if rules is None else {k: v.model_dump(exclude_none=True) for k, v in rules.items()}

    @model_validator(mode="after")
    def _dynamic_names(self) -> JobIn:
        if self.dynamic and self.tensor_names != "module":
            raise ValueError("dynamic rules match module names: they need tensor_names 'module'")
        return self

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, v: str) -> str:
        if v.startswith(("/", "~")) or "\\" in v:
            raise ValueError("model_id must be a hub id or a directory name, not a path")
        _no_dotdot(v, "model_id")
        if not _MODEL_ID.match(v):
            raise ValueError(
                "model_id must be a hub id like 'org/name' or the name of a directory under "
                "the models root (letters, digits, '_', '-', '.')"
            )
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None:
            if not _REVISION.match(v):
                raise ValueError("revision must be a branch, tag or commit sha")
            _no_dotdot(v, "revision")
        return v


class Progress(BaseModel):
    stage: str | None = None
    block: int | None = None  # 1-based block being quantized
    num_blocks: int | None = None
    module: str | None = None
    fraction: float = 0.0  # 0..1 over the whole job
    eta_seconds: float | None = None
    message: str = ""


class ErrorOut(BaseModel):
    code: str
    message: str


class Artifact(BaseModel):
    name: str
    size: int
    sha256: str


class JobOut(BaseModel):
    id: str
    name: str | None
    status: JobStatus
    model_id: str
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    attempts: int
    cancel_requested: bool
    progress: Progress
    metrics: dict[str, Any] | None
    error: ErrorOut | None
    artifacts: list[Artifact]
    links: dict[str, str]


class Page(BaseModel, Generic[T]):
    """Every collection: a page of items, newest first, and the cursor of the next page (None
    on the last page)."""

    items: list[T]
    next_cursor: str | None = None


JobPage = Page[JobOut]


class EventOut(BaseModel):
    seq: int
    type: str
    ts: datetime
    data: dict[str, Any]


class DatasetOut(BaseModel):
    id: str
    filename: str
    format: Literal["txt", "jsonl", "parquet"]
    size: int
    sha256: str
    created_at: datetime


class FollowUpOut(BaseModel):
    """Work a worker does on a succeeded job's stored checkpoint: a verification or a
    publication."""

    id: str
    job_id: str
    status: JobStatus
    spec: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    attempts: int  # runs started; more than 1 when a worker died and another took over
    # stage (a verification's loading, evaluating; a publication's preparing, uploading; done or
    # failed at the end), block i/n of a streamed checkpoint, fraction, ETA; null while queued
    progress: Progress | None = None
    result: dict[str, Any] | None
    error: ErrorOut | None


class VerificationOut(FollowUpOut):
    """result: perplexity, samples, where the text came from."""


class PublicationOut(FollowUpOut):
    """result: the repository's url, the commit, files and bytes sent."""
