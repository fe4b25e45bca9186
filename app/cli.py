"""The `gptqd` command line.

Each group of commands lives in app/commands/<group>.py and registers itself with
`register(app)`; to add a group, import it here and call its register().
Imports of torch/transformers happen inside the commands, so `gptqd --help` is instant.
"""

from __future__ import annotations

import typer

from app.commands import engine, manage, service
from app.quiet import quiet_third_party

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
    quiet_third_party()


def _no_type_for_flags() -> None:
    """Typer's rich help shows `<bool>` beside a flag (--desc-act, --wait, even --help), as if
    it took a value; a flag takes none, so show no type (click's plain help shows none either)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_type_for_flags()
engine.register(app)
service.register(app)
manage.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
