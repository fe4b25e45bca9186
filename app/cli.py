"""The `gptqd` command line.

Each group of commands lives in app/commands/<group>.py and registers itself with
`register(app)`; to add a group, import it here and call its register().
Imports of torch/transformers happen inside the commands, so `gptqd --help` is instant.
"""

from __future__ import annotations

import typer

from app.commands import engine, service

app = typer.Typer(
    name="gptqd",
    help="GPTQ quantization: quantize and evaluate models, run the gptqd service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """GPTQ quantization: quantize and evaluate models, run the gptqd service."""


engine.register(app)
service.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
