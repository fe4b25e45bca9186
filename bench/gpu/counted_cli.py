"""`gptqd quantize` (the CLI, same arguments) with its FLOPs counted by bench/flops.py:
prints FLOPS_JSON: {"forward", "hessian", "solve"} when the run ends."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for flops

from flops import counted


def main() -> int:
    from app.cli import main as cli

    with counted() as flops:
        try:
            cli()
            code = 0
        except SystemExit as exc:  # typer ends with SystemExit(0) on success too
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    print("FLOPS_JSON:" + json.dumps(flops), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
