"""Calibration text -> tokenized windows of seq_length, chosen reproducibly from a seed.

Protocol (Preparation, default "as-written" + "grid"): a plain text file is tokenized as it is
written, once, without special tokens (its line breaks, blank lines and leading spaces are
kept: they are part of the text the model will see); records (.jsonl/.parquet rows, a hub
dataset's rows, the builtin text) are kept as they are, blank ones dropped, and joined with
blank lines ("\\n\\n"). The token stream is cut into non-overlapping windows of seq_length
(the tail shorter than a window is dropped) and num_samples of them are picked at random
without replacement, from a torch generator seeded with `seed`. Every sample is a full
window of real text, none empty, padded or repeated.

Why (bench/quality.py --calibration-study, figures in docs/engine.md): keeping the text as
written loses 6% less (KL to the original, four seeds) than the previous layout, "paragraphs"
(rows stripped, blank ones dropped), on wikitext-2, and the same on TinyStories, whose text has
no blank lines or leading spaces to drop. Windows at random starts (the GPTQ paper's code;
"random") lose 2-4% more than the grid on TinyStories, where the text is only 4x the windows
asked for and random windows overlap, and tie with it on wikitext-2: the grid is the default.

When the text holds fewer windows than asked for, the run is refused with a CalibrationError
saying how many tokens there are, rather than training the Hessians on repeated text without
telling anyone.

Sources (CalibrationSpec.source):
- "builtin": public-domain English prose shipped with the package (Pride and Prejudice and The
  Adventures of Sherlock Holmes, from Project Gutenberg; data/BUILTIN-TEXT.md), one paragraph
  per row: about 1.07M characters, ~265k tokens with the GPT-2 tokenizer (4 x 128 x 512);
  "builtin-heldout" is the part kept apart for evaluation (the last chapters and stories;
  ~43k GPT-2 tokens); calibrating on "builtin" never sees it.
- a local file: plain text (.txt or any other name: its whole content), .jsonl/.json (one JSON
  object per line, text in `text_field`), .parquet (column `text_field`). The service's
  uploaded datasets are such files.
- a hub dataset "NAME[:CONFIG[:SPLIT]]" loaded with `datasets.load_dataset` (split defaults to
  "train"; slicing such as "train[:2000]" works and keeps the download small).

Very large sources are cut before tokenizing: when the text is much longer than needed
(more than TEXT_BUDGET_CHARS_PER_TOKEN characters per requested token), a seeded random
contiguous run of rows (a text file's lines) of that size is used.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.gptq import hubstatus
from worker.gptq.config import BUILTIN, BUILTIN_HELDOUT, CalibrationSpec
from worker.gptq.errors import CalibrationError

# files read as records by their suffix; a file with any other name is plain UTF-8 text
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
FILE_SUFFIXES = (".txt", *RECORD_SUFFIXES)  # names that are files even before they exist
TEXT_BUDGET_CHARS_PER_TOKEN = 32  # ~8x the ~4 characters per token of English BPE

# "builtin": public-domain English novels and stories shipped with the package (see
# data/BUILTIN-TEXT.md), one paragraph per row; the held-out part is never calibrated on.
BUILTIN_FILES = {BUILTIN: "builtin-calibration.txt.gz", BUILTIN_HELDOUT: "builtin-heldout.txt.gz"}
DATA_DIR = Path(__file__).with_name("data")


@dataclass(frozen=True)
class Preparation:
    """How a source becomes the token stream windows are cut from, and where they are cut.

    layout "as-written": a text file's whole content as it is (line breaks, blank lines,
    leading spaces), records kept as they are and joined by blank lines; "paragraphs": rows
    stripped, blank ones dropped, joined by blank lines (the previous default). placement
    "random": each window starts at a random token, as in the GPTQ paper's code; "grid":
    distinct windows of a non-overlapping grid. docs/engine.md has the measurements that made
    DEFAULT_PREPARATION the default (bench/quality.py --calibration-study)."""

    layout: str = "as-written"
    placement: str = "grid"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS or self.placement not in PLACEMENTS:
            raise ValueError(f"unknown preparation {self}: layouts {LAYOUTS}, placements {PLACEMENTS}")


LAYOUTS = ("as-written", "paragraphs")
PLACEMENTS = ("random", "grid")
DEFAULT_PREPARATION = Preparation()


def build_calibration(
    tokenizer: Any, spec: CalibrationSpec, preparation: Preparation = DEFAULT_PREPARATION
) -> torch.Tensor:
    """LongTensor [num_samples, seq_length] of token ids; raises CalibrationError."""
    pieces, separator = source_pieces(spec, preparation.layout)
    needed = spec.num_samples * spec.seq_length
    generator = torch.Generator().manual_seed(spec.seed)
    pieces = _limit_rows(pieces, len(separator), needed * TEXT_BUDGET_CHARS_PER_TOKEN, generator)
    ids = tokenize(tokenizer, separator.join(pieces))
    return choose_windows(ids, spec.num_samples, spec.seq_length, generator, preparation.placement)


def source_pieces(spec: CalibrationSpec, layout: str) -> tuple[list[str], str]:
    """(pieces, separator): the source's text is separator.join(pieces). A plain text file as
    written is its lines with their line breaks (joined by ""): any cut for size falls
    between lines."""
    source = spec.source.strip()
    if layout == "as-written" and source not in BUILTIN_FILES and looks_like_file(source):
        path = Path(source).expanduser()
        if path.suffix.lower() not in RECORD_SUFFIXES:
            check_file(path, "calibration")
            lines = read_text(path, "calibration").splitlines(keepends=True)
            if not any(line.strip() for line in lines):
                raise CalibrationError(f"calibration source {spec.source!r} holds no text")
            return lines, ""
    return load_rows(spec, strip=layout == "paragraphs"), "\n\n"


# A text is tokenized in pieces of about this many characters: in one call on a 5 MB text the
# tokenizers library took over 700 MiB (offsets, token strings and alignments for every token)
# and, under the job memory limit, aborted the process.
TOKENIZE_PIECE_CHARS = 1 << 20


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The text as one 1-D LongTensor of ids (no BOS/EOS: windows are cut from the middle),
    tokenized a piece at a time (text_pieces)."""
    ids = [torch.tensor(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"],
                        dtype=torch.long)
           for piece in text_pieces(text, TOKENIZE_PIECE_CHARS)]
    return torch.cat(ids)


def text_pieces(text: str, size: int) -> list[str]:
    """text as consecutive pieces of at most about `size` characters. A cut falls, where it
    can, just before a space between two letters ("word| word"): the place byte-level BPE
    tokenizers (GPT-2, Llama 3, Qwen) split the text anyway, so their ids are those of the
    whole text. A SentencePiece tokenizer that adds a prefix space sees one more space there:
    a token per cut, one per MiB of text. Without such a space in a piece's second half, the
    cut falls after a line break, else anywhere."""
    pieces, start = [], 0
    while len(text) - start > size:
        pieces.append(text[start : (cut := _cut(text, start + size // 2, start + size))])
        start = cut
    pieces.append(text[start:])
    return pieces


_WORD_GAP = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")  # a space between two letters


def _cut(text: str, low: int, high: int) -> int:
    """Where to cut text within [low, high): see text_pieces."""
    gap = max((m.start() for m in _WORD_GAP.finditer(text, low, high)), default=None)
    if gap is not None:
        return gap
    line = text.rfind("\n", low, high)
    return line + 1 if line != -1 else high


def choose_windows(
    ids: torch.Tensor, num_samples: int, seq_length: int, generator: torch.Generator,
    placement: str = DEFAULT_PREPARATION.placement,
) -> torch.Tensor:
    """num_samples windows of seq_length, chosen with the generator: at random starts, or
    distinct windows of the non-overlapping grid. Either way the text must hold num_samples
    whole windows, so the Hessians never silently learn from text repeated to fill the set."""
    available = ids.numel() // seq_length
    if available < num_samples:
        raise CalibrationError(
            f"calibration text too short: {ids.numel()} tokens give {available} windows of "
            f"{seq_length}, need {num_samples}; give more text, or lower num_samples or "
            "seq_length"
        )
    if placement == "random":
        starts = torch.randint(0, ids.numel() - seq_length + 1, (num_samples,), generator=generator)
        return torch.stack([ids[s : s + seq_length] for s in starts.tolist()])
    windows = ids[: available * seq_length].view(available, seq_length)
    picked = torch.randperm(available, generator=generator)[:num_samples]
    return windows[picked].clone()


# --- sources ------------------------------------------------------------------------------


def load_rows(spec: CalibrationSpec, strip: bool = True) -> list[str]:
    """The source's text rows, blank ones dropped (the others stripped unless strip=False);
    raises CalibrationError when there are none."""
    source = spec.source.strip()
    if source in BUILTIN_FILES:
        rows = builtin_rows(source)
    elif looks_like_file(source):
        rows = read_file_rows(Path(source).expanduser(), spec.text_field)
    else:
        rows = hub_rows(source, spec.text_field)
    rows = [row.strip() if strip else row for row in rows if row and row.strip()]
    if not rows:
        raise CalibrationError(f"calibration source {spec.source!r} holds no text")
    return rows


def looks_like_file(source: str) -> bool:
    path = Path(source).expanduser()
    return (
        path.exists()
        or path.suffix.lower() in FILE_SUFFIXES
        or source.startswith(("/", "./", "../", "~"))
    )


def read_file_rows(path: Path, text_field: str, what: str = "calibration") -> list[str]:
    """Records of a .jsonl/.json/.parquet file; the paragraphs (blank-line separated) of any
    other file, read as plain text whatever its suffix (.txt, .raw, .md, none...)."""
    check_file(path, what)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return _jsonl_rows(path, text_field)
        if suffix == ".parquet":
            return _parquet_rows(path, text_field)
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{what} file {path} is not UTF-8 text: {exc}") from exc
    return re.split(r"\n[ \t\r\f\v]*\n", read_text(path, what))


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{what} file {path} is not UTF-8 text ({exc.reason} at byte "
                               f"{exc.start}); save it as UTF-8") from exc


def check_file(path: Path, what: str) -> None:
    """Cheap checks of a local text source, made before any weight is read: it is a readable
    file, and a plain-text one starts as UTF-8."""
    if not path.is_file():
        raise CalibrationError(f"{what} file {path} does not exist" if not path.exists()
                               else f"{what} file {path} is not a file")
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except OSError as exc:
        raise CalibrationError(f"{what} file {path} cannot be read: {exc.strerror}") from exc
    if path.suffix.lower() != ".parquet":
        try:  # a multi-byte character cut at the end of the sample is not an error
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{what} file {path} is not UTF-8 text ({exc.reason} at "
                                   f"byte {exc.start}); save it as UTF-8") from exc


def check_source(source: str, what: str) -> None:
    """Refuses a source that cannot work before a model is loaded: a local file that is
    missing, unreadable or not UTF-8; a hub dataset that is not in the cache when the hub
    does not answer. Builtin text always works; a reachable hub's dataset is checked when read."""
    source = source.strip()
    if source in BUILTIN_FILES:
        return
    if looks_like_file(source):
        check_file(Path(source).expanduser(), what)
    elif hubstatus.unreachable():
        _hub_dataset(source, what)  # from the cache, quickly, or a CalibrationError now


def _jsonl_rows(path: Path, text_field: str) -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path} line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CalibrationError(
                    f"{path} line {number} has no text_field {text_field!r} (found {keys})"
                )
            rows.append(_as_text(record[text_field], f"{path} line {number}"))
    return rows


def _parquet_rows(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise CalibrationError(f"calibration file {path} is not a readable parquet file: {exc}") from exc
    if text_field not in schema.names:
        raise CalibrationError(
            f"{path} has no text_field column {text_field!r} (columns: {', '.join(schema.names)})"
        )
    column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [_as_text(value, f"{path} column {text_field}") for value in column]


def _as_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: expected text, found {type(value).__name__}")
    return value


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    """'NAME[:CONFIG[:SPLIT]]' -> (name, config or None, split, default 'train')."""
    name, config, split = ([*source.split(":", 2), "", ""])[:3]
    if not name:
        raise CalibrationError(f"calibration source {source!r} names no dataset")
    return name, (config or None), (split or "train")


def hub_rows(source: str, text_field: str) -> list[str]:
    dataset, where = _hub_dataset(source)
    if text_field not in dataset.column_names:
        raise CalibrationError(
            f"calibration {where} has no text_field {text_field!r} "
            f"(columns: {', '.join(dataset.column_names)})"
        )
    return [_as_text(value, f"{where} field {text_field}") for value in dataset[text_field]]


def canonical_dataset(name: str) -> str:
    """The hub's id of a dataset named the old way, without a namespace ('wikitext' ->
    'Salesforce/wikitext'): the hub still redirects such names, but datasets 5 on
    huggingface_hub >= 1.x refuses them (an hf:// path needs 'namespace/name'; datasets
    issue #8612). Unchanged when namespaced, offline (the cache knows it by the name it was
    fetched by) or when the hub does not say (loading then says why)."""
    if "/" in name or hubstatus.offline():
        return name
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name).id or name
    except Exception:  # not found, refused, unreachable: load_dataset reports it
        return name


def _hub_dataset(source: str, what: str = "calibration") -> tuple[Any, str]:
    """(the hub dataset, how to name it in a message); raises CalibrationError."""
    name, config, split = parse_hub_source(source)
    hubstatus.unreachable()  # a 3 s probe first, not ~30 s of silent retries
    name = canonical_dataset(name)
    where = f"dataset {name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split), where
    except Exception as exc:  # datasets/hub raise many types: network, missing, auth, bad split
        why = f"; {hubstatus.why_offline()}" if hubstatus.offline() else ""
        raise CalibrationError(
            f"{what} {where} could not be loaded ({type(exc).__name__}: {exc}){why}; "
            "offline, use a local file (.txt, .jsonl, .parquet) or 'builtin'"
        ) from exc


def builtin_rows(part: str = BUILTIN) -> list[str]:
    """The paragraphs of the shipped English text: its calibration part ("builtin") or the
    part held out for evaluation ("builtin-heldout")."""
    with gzip.open(DATA_DIR / BUILTIN_FILES[part], "rt", encoding="utf-8") as handle:
        return handle.read().strip().split("\n\n")


def _limit_rows(
    rows: list[str], separator_chars: int, budget_chars: int, generator: torch.Generator
) -> list[str]:
    """A seeded random contiguous run of rows of about budget_chars, if the text is larger."""
    lengths = [len(row) + separator_chars for row in rows]
    if sum(lengths) <= budget_chars:
        return rows
    # last start index from which the remaining rows still hold the budget
    tail, last_start = 0, 0
    for index in range(len(rows) - 1, -1, -1):
        tail += lengths[index]
        if tail >= budget_chars:
            last_start = index
            break
    start = int(torch.randint(0, last_start + 1, (1,), generator=generator))
    total, end = 0, start
    while end < len(rows) and total < budget_chars:
        total += lengths[end]
        end += 1
    return rows[start:end]
