"""Command groups of the `gptqd` CLI; each module has register(app: typer.Typer)."""
