"""Loading a model: local directories, family check before weights, hub errors a person can act on."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import errors as hub
from transformers import BertConfig

from tests.conftest import fixture_path
from worker.gptq.errors import ModelAccessDenied, ModelNotFound, UnsupportedArchitecture
from worker.gptq.modelio import load_config, load_model, map_load_error


def _response(status: int):
    # the HTTP library huggingface_hub itself uses (httpx or httpx2, by version)
    http = importlib.import_module(hub.Response.__module__.split(".")[0])
    return http.Response(status, request=http.Request("GET", "https://hub.invalid/org/m"))


def test_loads_a_local_directory_on_the_cpu_in_eval_mode() -> None:
    loaded = load_model(str(fixture_path("models", "babyllama-tok105")))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.arch.family == "llama"
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert loaded.tokenizer("Once upon a time")["input_ids"]


def test_unsupported_family_is_refused_before_weights_are_read(tmp_path: Path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedArchitecture, match="model type 'bert' is not supported"):
        load_model(str(tmp_path))


def test_a_type_transformers_does_not_know_is_an_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "frobnicator"}')
    with pytest.raises(UnsupportedArchitecture, match="'frobnicator' is not supported"):
        load_config(str(tmp_path))


def test_local_path_mistakes_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=re.escape(f"model directory {tmp_path / 'nope'} does not exist")):
        load_config(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match=r"has no config\.json"):
        load_config(str(tmp_path))
    with pytest.raises(ModelNotFound, match="neither a local directory nor a valid hub id"):
        load_config("not a valid id!")


def test_hub_id_offline_and_not_cached_says_so(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound) as info:
        load_config("some-org/some-model-not-in-cache", revision="main")
    message = str(info.value)
    assert "'some-org/some-model-not-in-cache' at revision 'main'" in message
    assert "HF_HUB_OFFLINE is set" in message and "local model directory" in message


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (lambda: hub.GatedRepoError("gated", response=_response(403)), ModelAccessDenied, "is gated"),
        (lambda: hub.RepositoryNotFoundError("nf", response=_response(401)), ModelNotFound, "HF_TOKEN"),
        (lambda: hub.RevisionNotFoundError("rev", response=_response(404)), ModelNotFound, "revision 'v9'"),
        (lambda: hub.HfHubHTTPError("forbidden", response=_response(403)), ModelAccessDenied, "HTTP 403"),
        (lambda: hub.HfHubHTTPError("teapot", response=_response(418)), ModelNotFound, "could not be loaded"),
    ],
)
def test_hub_errors_are_mapped_even_when_wrapped(error, expected, words) -> None:
    try:
        try:
            raise error()
        except Exception as inner:
            raise OSError("transformers wraps hub errors") from inner
    except OSError as wrapped:
        mapped = map_load_error("org/m", "v9", wrapped)
    assert type(mapped) is expected
    assert words in str(mapped)


class FakeHub:
    """snapshot_download over a repository held in memory: writes the files its patterns
    match into one snapshot directory and records what each call asked for."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.snapshot, self.files, self.fetched = root / "snapshot", files, []

    def __call__(self, repo_id: str, *, revision=None, token=None, allow_patterns=(),
                 tqdm_class=None) -> str:
        import fnmatch

        for name, content in self.files.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                path = self.snapshot / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
                self.fetched.append(name)
        self.snapshot.mkdir(exist_ok=True)
        return str(self.snapshot)


@pytest.mark.parametrize("trust", [False, True])
def test_a_hub_snapshot_fetches_only_the_weights_its_index_names(tmp_path, monkeypatch, trust) -> None:
    import huggingface_hub

    from worker.gptq.modelio import hub_snapshot

    index = '{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}'
    fake = FakeHub(tmp_path, {
        "config.json": "{}", "tokenizer.json": "{}", "tokenizer.model": "", "modeling_x.py": "",
        "model.safetensors.index.json": index, "model-00001-of-00002.safetensors": "w1",
        "model-00002-of-00002.safetensors": "w2", "consolidated.safetensors": "copy",
        "pytorch_model.bin": "old", "original/consolidated.00.pth": "old",
    })
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub_snapshot("org/m", trust_remote_code=trust) == fake.snapshot
    assert sorted(fake.fetched) == sorted([
        "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
        *(["modeling_x.py"] if trust else []),
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])


def test_a_hub_snapshot_without_safetensors_is_none(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from worker.gptq.modelio import hub_snapshot

    fake = FakeHub(tmp_path, {"config.json": "{}", "pytorch_model.bin": "old"})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub_snapshot("org/m") is None
    assert fake.fetched == ["config.json"]
