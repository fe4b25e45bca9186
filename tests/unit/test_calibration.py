"""Calibration: text sources, reproducible non-overlapping windows, clear errors."""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import fixture_path
from worker.gptq.calibration import (
    Preparation,
    build_calibration,
    builtin_rows,
    load_rows,
    parse_hub_source,
    tokenize,
)
from worker.gptq.config import CalibrationSpec
from worker.gptq.errors import CalibrationError

PARAGRAPHS = [
    f"Paragraph {i} tells of the {word} river that runs past the old mill near town {i}."
    for i, word in enumerate(["quiet", "long", "cold", "wide", "green", "slow"] * 10)
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(fixture_path("tokenizers", "gpt2"))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    # blank and whitespace-only lines between paragraphs, as in wikitext
    path = tmp_path / "calib.txt"
    path.write_text("\n \n\n".join(PARAGRAPHS) + "\n\n\n")
    return path


def _is_slice_of(window: torch.Tensor, stream: torch.Tensor, step: int = 1) -> bool:
    length = window.numel()
    starts = range(0, stream.numel() - length + 1, step)
    return any(torch.equal(stream[s : s + length], window) for s in starts)


def test_windows_are_reproducible_slices_of_the_text_as_written(tokenizer, text_file) -> None:
    spec = CalibrationSpec(source=str(text_file), num_samples=6, seq_length=32, seed=7)
    first = build_calibration(tokenizer, spec)
    assert first.dtype == torch.long and first.shape == (6, 32)
    assert torch.equal(first, build_calibration(tokenizer, spec))
    other = build_calibration(tokenizer, CalibrationSpec(source=str(text_file), num_samples=6, seq_length=32, seed=8))
    assert not torch.equal(first, other)
    stream = tokenize(tokenizer, text_file.read_text())  # the file as it is, blank lines kept
    for window in first:
        assert _is_slice_of(window, stream, step=32)  # windows of the non-overlapping grid
    assert len({tuple(w.tolist()) for w in first}) == 6  # no window twice


def test_random_starts_are_available(tokenizer, text_file) -> None:
    """The GPTQ paper's placement, kept for bench/quality.py's calibration study."""
    spec = CalibrationSpec(source=str(text_file), num_samples=12, seq_length=32, seed=7)
    ids = build_calibration(tokenizer, spec, Preparation("as-written", "random"))
    stream = tokenize(tokenizer, text_file.read_text())
    assert all(_is_slice_of(window, stream) for window in ids)
    assert not all(_is_slice_of(window, stream, step=32) for window in ids)  # not only the grid


def test_the_paragraph_grid_preparation_is_still_available(tokenizer, text_file) -> None:
    """The previous default, kept for bench/quality.py's calibration study."""
    spec = CalibrationSpec(source=str(text_file), num_samples=6, seq_length=32, seed=7)
    ids = build_calibration(tokenizer, spec, Preparation("paragraphs", "grid"))
    stream = tokenize(tokenizer, "\n\n".join(PARAGRAPHS))
    assert all(_is_slice_of(window, stream, step=32) for window in ids)
    assert len({tuple(w.tolist()) for w in ids}) == 6  # distinct grid windows
    with pytest.raises(ValueError, match="unknown preparation"):
        Preparation("lines", "grid")


def test_records_keep_their_text_and_are_joined_by_blank_lines(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    rows = [f" {p}\n  indented line {i}" for i, p in enumerate(PARAGRAPHS)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in [*rows[:3], "  ", *rows[3:]]))
    ids = build_calibration(tokenizer, CalibrationSpec(source=str(path), num_samples=4, seq_length=24))
    stream = tokenize(tokenizer, "\n\n".join(rows))  # unstripped, the blank record dropped
    assert all(_is_slice_of(window, stream) for window in ids)


def test_no_sample_is_empty_or_padded(tokenizer, text_file) -> None:
    ids = build_calibration(tokenizer, CalibrationSpec(source=str(text_file), num_samples=8, seq_length=16))
    for window in ids:
        assert len(tokenizer.decode(window).strip()) > 20
    assert (ids != tokenizer.eos_token_id).all()


def test_too_little_text_is_a_clear_error(tokenizer, text_file) -> None:
    total = tokenize(tokenizer, text_file.read_text()).numel()
    windows = total // 64
    spec = CalibrationSpec(source=str(text_file), num_samples=windows + 1, seq_length=64)
    with pytest.raises(CalibrationError) as info:
        build_calibration(tokenizer, spec)
    assert str(info.value).startswith(
        f"calibration text too short: {total} tokens give {windows} windows of 64, need {windows + 1}"
    )
    # exactly as many windows as there are is fine: all of them, each once
    every = build_calibration(tokenizer, CalibrationSpec(source=str(text_file), num_samples=windows, seq_length=64))
    assert len({tuple(w.tolist()) for w in every}) == windows


def test_a_text_file_of_blank_lines_holds_no_text(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\t\n")
    with pytest.raises(CalibrationError, match="holds no text"):
        build_calibration(tokenizer, CalibrationSpec(source=str(path), num_samples=1, seq_length=8))


def test_txt_rows_are_paragraphs_without_blank_ones(text_file) -> None:
    assert load_rows(CalibrationSpec(source=str(text_file))) == PARAGRAPHS


def test_jsonl_rows_come_from_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    records = [{"content": p, "id": i} for i, p in enumerate(PARAGRAPHS[:5])]
    records.insert(2, {"content": "   ", "id": 99})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_rows(CalibrationSpec(source=str(path), text_field="content")) == PARAGRAPHS[:5]
    with pytest.raises(CalibrationError, match=r"line 1 has no text_field 'text' \(found \['content', 'id'\]\)"):
        load_rows(CalibrationSpec(source=str(path)))


def test_jsonl_that_is_not_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(CalibrationError, match="line 2 is not JSON"):
        load_rows(CalibrationSpec(source=str(path)))


def test_parquet_rows_come_from_the_text_column(tmp_path: Path) -> None:
    path = tmp_path / "calib.parquet"
    column = [*PARAGRAPHS[:4], "", None, PARAGRAPHS[4]]
    pq.write_table(pa.table({"body": column, "n": list(range(len(column)))}), path)
    assert load_rows(CalibrationSpec(source=str(path), text_field="body")) == PARAGRAPHS[:5]
    with pytest.raises(CalibrationError, match=r"no text_field column 'text' \(columns: body, n\)"):
        load_rows(CalibrationSpec(source=str(path)))


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="does not exist"):
        load_rows(CalibrationSpec(source=str(tmp_path / "missing.txt")))
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\x81\xfe" * 100)
    with pytest.raises(CalibrationError, match=r"weights\.bin is not UTF-8 text .*save it as UTF-8"):
        load_rows(CalibrationSpec(source=str(binary)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(CalibrationError, match="holds no text"):
        load_rows(CalibrationSpec(source=str(empty)))


def test_builtin_source_covers_128_windows_of_512(tokenizer) -> None:
    rows = builtin_rows()
    assert len(rows) > 1000 and all(r.strip() for r in rows)
    assert rows == builtin_rows()  # same text every time
    spec = CalibrationSpec(source="builtin", num_samples=128, seq_length=512, seed=3)
    ids = build_calibration(tokenizer, spec)
    assert ids.shape == (128, 512)
    assert len({tuple(w.tolist()) for w in ids}) == 128
    text = tokenizer.decode(ids[0])
    assert sum(ch.isalpha() for ch in text) > len(text) / 2  # prose, not noise


def test_builtin_text_is_english_prose_with_a_separate_held_out_part() -> None:
    calibration, held_out = builtin_rows("builtin"), builtin_rows("builtin-heldout")
    assert len(held_out) > 500 and all(r.strip() == r and r for r in held_out)
    # narrative prose: the commonest words of a novel, none of the marks of code or docs
    words = Counter(re.findall(r"[a-z]+", " ".join(calibration).lower()))
    top = {w for w, _ in words.most_common(60)}
    assert {"the", "and", "she", "her", "was", "had", "said"} <= top, sorted(top)
    assert not any(mark in row for row in calibration + held_out
                   for mark in (">>>", "def ", "()", "[Illustration", "Gutenberg", "/*"))
    # the held-out paragraphs are other text than the calibration paragraphs
    long_rows = {row for row in calibration if len(row) > 60}
    assert not long_rows & {row for row in held_out if len(row) > 60}
    assert "CHAPTER LVI." in held_out and "CHAPTER LVI." not in calibration


def test_builtin_text_and_its_licence_are_package_data() -> None:
    """The wheel, the sdist and the Docker image (COPY worker) get what pyproject declares."""
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["worker"]
    shipped = {p.name for pattern in patterns for p in (root / "worker").glob(pattern)}
    assert {"builtin-calibration.txt.gz", "builtin-heldout.txt.gz", "BUILTIN-TEXT.md"} <= shipped
    notes = (root / "worker" / "gptq" / "data" / "BUILTIN-TEXT.md").read_text()
    assert "public domain" in notes and "stripped" in notes


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("wikitext", ("wikitext", None, "train")),
        ("wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
        ("wikitext:wikitext-2-raw-v1:validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
        ("allenai/c4:en:train[:2000]", ("allenai/c4", "en", "train[:2000]")),
        ("org/data::test", ("org/data", None, "test")),
    ],
)
def test_hub_source_parsing(source, expected) -> None:
    assert parse_hub_source(source) == expected


def test_hub_dataset_offline_is_a_calibration_error(monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CalibrationError) as info:
        load_rows(CalibrationSpec(source="wikitext:wikitext-2-raw-v1:train"))
    message = str(info.value)
    assert "dataset 'wikitext' config 'wikitext-2-raw-v1' split 'train' could not be loaded" in message
    assert "'builtin'" in message
    assert info.value.code == "calibration"


def test_large_text_is_cut_to_a_seeded_run_of_rows(tokenizer, tmp_path: Path) -> None:
    # 3000 paragraphs (~60k tokens) for 2 windows of 16: only a contiguous run is tokenized
    path = tmp_path / "big.txt"
    rows = [f"Row {i} says the number {i} twice: {i}." for i in range(3000)]
    path.write_text("\n\n".join(rows))
    spec = CalibrationSpec(source=str(path), num_samples=2, seq_length=16, seed=1)
    ids = build_calibration(tokenizer, spec)
    assert torch.equal(ids, build_calibration(tokenizer, spec))
    # whole numbers only: a window may begin in the middle of one
    numbers = [int(n) for window in ids for n in re.findall(r"number (\d+)", tokenizer.decode(window))]
    assert numbers
    assert max(numbers) - min(numbers) < 60  # 2*16*32 characters of budget span ~40 rows


def test_a_text_file_is_text_whatever_its_suffix(tmp_path: Path) -> None:
    """wiki.test.raw, notes.md, README: plain text, for calibration (paragraphs) and eval (one
    text, layout kept)."""
    from worker.gptq.evaluate import load_texts

    for name in ("wiki.test.raw", "notes.md", "README"):
        path = tmp_path / name
        path.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
        assert load_rows(CalibrationSpec(source=str(path))) == PARAGRAPHS
        assert load_texts(str(path)) == ["\n\n".join(PARAGRAPHS)]


def test_a_bad_source_is_refused_before_anything_is_read(tmp_path: Path, monkeypatch) -> None:
    from worker.gptq import hubstatus
    from worker.gptq.calibration import check_source

    check_source("builtin", "calibration")
    check_source("builtin-heldout", "eval text")
    with monkeypatch.context() as m:  # a hub that answers: its dataset is checked when read
        m.setattr(hubstatus, "unreachable", lambda: None)
        check_source("wikitext:wikitext-2-raw-v1:train", "calibration")
    with pytest.raises(CalibrationError, match=r"^eval text file .*missing\.raw does not exist"):
        check_source(str(tmp_path / "missing.raw"), "eval text")
    with pytest.raises(CalibrationError, match="is not a file"):
        check_source(str(tmp_path), "calibration")
    latin1 = tmp_path / "old.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(CalibrationError, match=r"old\.txt is not UTF-8 text"):
        check_source(str(latin1), "calibration")
    cut = tmp_path / "cut.txt"  # a multi-byte character across the sampled head is fine
    cut.write_bytes(b"a" * ((1 << 16) - 1) + "\u00e9".encode())
    check_source(str(cut), "calibration")


def test_text_pieces_cut_between_words_and_lose_nothing() -> None:
    from worker.gptq.calibration import text_pieces

    prose = "\n\n".join(PARAGRAPHS)
    pieces = text_pieces(prose, 200)
    assert "".join(pieces) == prose and len(pieces) > 10
    for before, after in itertools.pairwise(pieces):
        assert len(before) <= 200
        assert before[-1].isalpha() and after[0] == " " and after[1].isalpha(), (before, after)
    # no word gap: after a line break; neither: at the size
    lines = "\n".join(["x" * 30] * 20)
    assert all(p.endswith("\n") for p in text_pieces(lines, 100)[:-1])
    assert [len(p) for p in text_pieces("y" * 250, 100)] == [100, 100, 50]
    assert text_pieces("", 100) == [""]


@pytest.mark.parametrize("source", ["builtin", "wikitext"])
@pytest.mark.parametrize("name", [("tokenizers", "gpt2"), ("models", "tiny-gpt2-wikitext2"),
                                  ("models", "babyllama-tok105")])
def test_a_large_text_tokenized_in_pieces_has_the_ids_of_one_call(
        source: str, name: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gptq import calibration

    tok = AutoTokenizer.from_pretrained(fixture_path(*name))
    text = ("\n\n".join(builtin_rows()) if source == "builtin"
            else fixture_path("wikitext-2", "valid.txt").read_text())[:200_000]
    whole = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(calibration, "TOKENIZE_PIECE_CHARS", 4000)  # ~50 cuts
    assert torch.equal(tokenize(tok, text), whole)


TOKENIZE_UNDER_LIMIT = """
import resource, sys
from transformers import AutoTokenizer
from worker.gptq.calibration import builtin_rows, tokenize
tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = "\\n\\n".join(builtin_rows())
text = (text * (6_000_000 // len(text) + 1))[:6_000_000]
size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (400 << 20),) * 2)
print(tokenize(tok, text).numel())
"""


def test_a_6_mb_text_tokenizes_in_400_mib_more_address_space() -> None:
    """In one call the tokenizers library aborted the process on a 5 MB text 700 MiB above
    a job process's start (GPTQD_JOB_MEMORY_LIMIT_MB)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TOKENIZE_UNDER_LIMIT,
                          str(fixture_path("tokenizers", "gpt2"))],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 1_000_000
