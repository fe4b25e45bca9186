"""A model id found neither locally nor on the hub: the error lists what the server has."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings
from worker.jobspec import local_models_hint


def test_a_mistyped_local_name_gets_the_closest_local_models(tmp_path: Path) -> None:
    for name in ("llama-3-8b", "qwen2-7b", "mistral-7b"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    hint = local_models_hint("lama-3-8b", Settings(data_dir=tmp_path, models_dir=tmp_path))
    assert "did you mean 'llama-3-8b'?" in hint
    assert "GPTQD_MODELS_DIR" in hint and "llama-3-8b, mistral-7b, qwen2-7b" in hint
    assert "notes.txt" not in hint
    far = local_models_hint("org/other", Settings(data_dir=tmp_path, models_dir=tmp_path))
    assert "did you mean" not in far and "qwen2-7b" in far


def test_an_empty_models_directory_says_so(tmp_path: Path) -> None:
    hint = local_models_hint("x", Settings(data_dir=tmp_path, models_dir=tmp_path / "none"))
    assert hint == "; the server's models directory (GPTQD_MODELS_DIR) holds no model either"
