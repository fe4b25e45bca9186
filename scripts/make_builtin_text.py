"""Rebuilds the "builtin" text shipped in worker/gptq/data/ from two Project Gutenberg books.

    python scripts/make_builtin_text.py 1342-0.txt 1661-0.txt

The inputs are the plain-text files of Project Gutenberg eBook #1342 (Jane Austen, "Pride and
Prejudice", the 1894 George Allen edition) and eBook #1661 (Arthur Conan Doyle, "The
Adventures of Sherlock Holmes"), as kept in the public repositories github.com/gutenbergbooks/1342
and github.com/gutenbergbooks/1661 (already without Project Gutenberg's header, footer and
licence). Kept: the novel's and the stories' own text, one paragraph per row. Stripped: the
edition's front matter (title pages, Saintsbury's preface, the list of illustrations), the
table of contents, every "[Illustration: ...]" caption, the printer's colophon, the
underscores that mark italics, the "/* NIND ... */" layout marks around letters' openings,
section numerals and "* * *" rows, and the hard line breaks and runs of spaces inside
paragraphs. worker/gptq/data/BUILTIN-TEXT.md says the same for the package.

Held out for evaluation (never calibrated on): the last six chapters of the novel (LVI-LXI)
and the last two stories (XI, XII); the rest is the calibration text.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "worker" / "gptq" / "data"
NOVEL_HELD_OUT = "CHAPTER LVI."
STORIES_HELD_OUT = "XI. THE ADVENTURE OF THE BERYL CORONET"


def without_illustrations(text: str) -> str:
    """Drops every "[Illustration ...]" block, with the brackets nested inside it."""
    out, index = [], 0
    while (start := text.find("[Illustration", index)) >= 0:
        out.append(text[index:start])
        depth, pos = 0, start
        while True:
            char = text[pos]
            depth += {"[": 1, "]": -1}.get(char, 0)
            pos += 1
            if depth == 0:
                break
        index = pos
    out.append(text[index:])
    return "".join(out)


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each on one line, italics marks removed."""
    rows = []
    for block in re.split(r"\n\s*\n", text):
        row = re.sub(r"\s+", " ", block).strip()
        row = re.sub(r"_([^_]+)_", r"\1", row).replace("_", "")
        row = re.sub(r"/\* (?:NIND |RIGHT )?(.*?) \*/", r"\1", row)  # the edition's layout marks
        if row and not re.fullmatch(r"[IVXLC]+\.|[* ]+", row):  # section numerals, "* * *"
            rows.append(row)
    return rows


def split_at(rows: list[str], marker: str) -> tuple[list[str], list[str]]:
    index = rows.index(marker)
    return rows[:index], rows[index:]


def novel(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    text = text[text.index("It is a truth universally acknowledged"):]
    text = text[: text.rindex("CHISWICK PRESS")]
    return paragraphs(without_illustrations(text))


def stories(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return paragraphs(text[text.index("I. A SCANDAL IN BOHEMIA"):])


def write(name: str, rows: list[str]) -> None:
    # mtime=0: the same input gives the same bytes
    with gzip.GzipFile(DATA / name, "wb", mtime=0) as handle:
        handle.write(("\n\n".join(rows) + "\n").encode("utf-8"))
    print(f"{name}: {len(rows)} paragraphs, {sum(map(len, rows))} characters")


def main(novel_path: str, stories_path: str) -> None:
    novel_calib, novel_held = split_at(novel(Path(novel_path)), NOVEL_HELD_OUT)
    stories_calib, stories_held = split_at(stories(Path(stories_path)), STORIES_HELD_OUT)
    DATA.mkdir(parents=True, exist_ok=True)
    write("builtin-calibration.txt.gz", novel_calib + stories_calib)
    write("builtin-heldout.txt.gz", novel_held + stories_held)


if __name__ == "__main__":
    main(*sys.argv[1:3])
