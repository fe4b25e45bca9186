"""Load a causal LM and its tokenizer from a hub id or a local directory.

The config is read first and the model family checked (get_arch) before any weights are read,
so an unsupported model fails in a second, not after a multi-GB download. Hub and file errors
are mapped to ModelNotFound / ModelAccessDenied with a message a person can act on.
revision, token and trust_remote_code are always passed explicitly (never a prompt, never a
token from a job spec echoed back). Weights: safetensors when the repository has them
(use_safetensors=None lets transformers prefer them; its .bin fallback uses
torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from worker.gptq import hubstatus
from worker.gptq.arch import ArchSpec, get_arch
from worker.gptq.download import OnTransfer, fetch
from worker.gptq.errors import EngineError, ModelAccessDenied, ModelNotFound
from worker.gptq.lazyload import INDEX_FILE

T = TypeVar("T")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    arch: ArchSpec
    source: str  # the hub id or local directory it came from
    lazy: Any = None  # lazyload.LazyModel when the weights are read block by block


def load_config(
    model_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, ArchSpec]:
    """The model's config and family, read without any weights (refuses unsupported types)."""
    from transformers import AutoConfig

    _check_local_path(model_id)
    _check_local_model_type(model_id)
    if not Path(model_id).expanduser().is_dir():
        hubstatus.unreachable()  # a hub id: a 3 s probe first, not ~30 s of silent retries
    config = _mapped(
        model_id,
        revision,
        lambda: AutoConfig.from_pretrained(
            model_id, revision=revision, token=token, trust_remote_code=trust_remote_code
        ),
    )
    return config, get_arch(config)


def skeleton(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device: every shape, no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def compute_dtype(config: Any, compute: torch.device) -> torch.dtype:
    """What a loaded model runs in: fp32 on the CPU (faster there, and exact), the checkpoint's
    own dtype on a GPU."""
    return torch.float32 if compute.type == "cpu" else config_dtype(config)


def config_dtype(config: Any) -> torch.dtype:
    """The dtype the config says the checkpoint's weights are in (fp32 when it says none)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype, torch.float32) if isinstance(dtype, str) else dtype


def load_model(
    model_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    config: Any = None,
) -> LoadedModel:
    """Config (and family check), tokenizer, then weights onto the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    if config is None:
        config, arch = load_config(
            model_id, revision=revision, token=token, trust_remote_code=trust_remote_code
        )
    else:
        arch = get_arch(config)
    common = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    tokenizer = load_tokenizer(model_id, **common)
    model = _mapped(
        model_id,
        revision,
        lambda: AutoModelForCausalLM.from_pretrained(
            model_id, config=config, dtype=dtype, use_safetensors=None, **common
        ),
    )
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, source=model_id)


# what a streamed run needs of a hub repository besides its weights: config, generation
# config, tokenizer files (and the model's own code, when it is trusted)
HUB_SIDE_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")


def hub_snapshot(
    model_id: str, *, revision: str | None = None, token: str | None = None,
    trust_remote_code: bool = False, on_transfer: OnTransfer | None = None,
) -> Path | None:
    """A hub model's files in the local hub cache, to be read block by block: its safetensors
    weights (only the files its index names, the ones from_pretrained fetches: no duplicate
    `consolidated.safetensors`), or None when the repository (or, offline, the cache) has none.
    on_transfer hears how the download of the weights goes (download.fetch)."""

    def get(patterns: list[str], report: OnTransfer | None = None) -> Path:
        return _mapped(model_id, revision, lambda: fetch(
            model_id, patterns, revision=revision, token=token, on_transfer=report))

    directory = get([*HUB_SIDE_FILES, *(["*.py"] if trust_remote_code else [])])
    index = directory / INDEX_FILE
    weights = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
               if index.is_file() else ["model.safetensors"])
    directory = get(weights, on_transfer)
    return directory if all((directory / name).is_file() for name in weights) else None


def load_tokenizer(
    model_id: str, *, revision: str | None = None, token: str | None = None, trust_remote_code: bool = False
) -> Any:
    from transformers import AutoTokenizer

    return _mapped(
        model_id,
        revision,
        lambda: AutoTokenizer.from_pretrained(
            model_id, revision=revision, token=token, trust_remote_code=trust_remote_code
        ),
    )


def _check_local_path(model_id: str) -> None:
    """A path-looking id that is not a directory is a local mistake, not a hub lookup."""
    if not model_id or not model_id.strip():
        raise ModelNotFound("model is empty: give a hub id like 'org/name' or a local directory")
    path = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelNotFound(f"model directory {model_id} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFound(f"model directory {model_id} has no config.json")


def _check_local_model_type(model_id: str) -> None:
    """A local model's family, from its config.json alone: a type transformers does not know
    would otherwise surface as a config loading error, not as an unsupported architecture."""
    path = Path(model_id).expanduser() / "config.json"
    if not path.is_file():
        return
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelNotFound(f"{path} is not a readable JSON model config: {exc}") from exc
    get_arch(model_type)


def _mapped(model_id: str, revision: str | None, load: Callable[[], T]) -> T:
    try:
        return load()
    except EngineError:
        raise
    except (OSError, ValueError) as exc:
        raise map_load_error(model_id, revision, exc) from exc


def map_load_error(model_id: str, revision: str | None, exc: BaseException) -> EngineError:
    """The EngineError a person can act on for a hub/file error (looks down the cause chain)."""
    from huggingface_hub import errors as hub

    at = f"{model_id!r}" + (f" at revision {revision!r}" if revision else "")
    for cause in chain(exc):
        if isinstance(cause, hub.GatedRepoError):
            return ModelAccessDenied(
                f"model {at} is gated: accept its terms on the model page with your account, "
                "then give the worker a token (HF_TOKEN) of that account"
            )
        if isinstance(cause, hub.RepositoryNotFoundError):
            return ModelNotFound(
                f"model {at} was not found on the hub: check the id, or if it is private "
                "give the worker a token (HF_TOKEN) that can read it"
            )
        if isinstance(cause, hub.RevisionNotFoundError):
            return ModelNotFound(f"revision {revision!r} of model {model_id!r} does not exist")
        if isinstance(cause, hub.LocalEntryNotFoundError):
            return ModelNotFound(
                f"model {at} is not a local directory and could not be fetched: "
                f"{hubstatus.why_offline()}, and the hub cache does not hold it; give a local "
                "model directory, or fetch the model where the hub answers"
            )
        if isinstance(cause, hub.HFValidationError):
            return ModelNotFound(
                f"model {model_id!r} is neither a local directory nor a valid hub id "
                "('name' or 'org/name')"
            )
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status in (401, 403):
            return ModelAccessDenied(
                f"access to model {at} was refused (HTTP {status}): give the worker a token "
                "(HF_TOKEN) that can read it"
            )
        if isinstance(cause, hub.EntryNotFoundError):
            return ModelNotFound(f"model {at} lacks a file it needs: {cause}")
    return ModelNotFound(f"model {at} could not be loaded: {exc}")


def chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
