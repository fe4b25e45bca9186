"""What the commands that talk to a gptqd server share: its address and key, and how a
refusal or a server that is not there is told to the user (one line, exit code 1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import typer

from app.client import ApiError, Unreachable

URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="GPTQD_URL",
                   help="Address of the gptqd server (`gptqd up` starts one).")
KEY = typer.Option(None, "--api-key", envvar="GPTQD_API_KEY", help="API key (Bearer).")


def explain(exc: Exception) -> str:
    """The error as one line, with the fix where the error implies one."""
    message = f"error: {exc}"
    if isinstance(exc, ApiError) and exc.status_code == 401:
        message += " (pass --api-key or set GPTQD_API_KEY)"
    return message


@contextmanager
def talking_to_server() -> Iterator[None]:
    """Turns the API's refusals, an absent server and a bad download into one line, exit 1."""
    try:
        yield
    except (ApiError, Unreachable, ValueError) as exc:
        typer.echo(explain(exc), err=True)
        raise typer.Exit(1) from None


def age(timestamp: str, now: datetime | None = None) -> str:
    """'just now', '3 min ago', '5 h ago', '2 days ago' for an ISO timestamp (UTC if naive)."""
    then = datetime.fromisoformat(timestamp)
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - then).total_seconds()
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''} ago"
    return "just now"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Rows under a header, each column as wide as its widest cell (the last one not padded)."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)), line[-1]]).rstrip()
        for line in lines
    )


def eval_text(evaluation: dict) -> str:
    """' on SOURCE', warning when that is the text the job calibrated on."""
    if not evaluation.get("source"):
        return ""
    same = " (the calibration text itself)" if evaluation.get("held_out") is False else ""
    return f" on {evaluation['source']}{same}"


def agreement_lines(metrics: dict, other: str = "the original") -> list[str]:
    """How far the quantized model's next-token distributions are from the other model's, when
    that was measured (the finer measure: perplexity can stay put while they move)."""
    if metrics.get("kl_divergence") is None or metrics.get("top1_agreement") is None:
        return []
    return [f"agreement with {other}: top-1 token {100 * metrics['top1_agreement']:.1f}%, "
            f"KL {metrics['kl_divergence']:.3g} nats per token"]


def sample_lines(evaluation: dict) -> list[str]:
    """The quantized model's sample texts, or why there are none (a streamed run)."""
    lines = [f"sample: {text!r}" for text in evaluation.get("samples_after") or []]
    if evaluation.get("samples_skipped"):
        lines.append(f"no samples: {evaluation['samples_skipped']}")
    return lines


def outcome(kind: str, item: dict) -> list[str]:
    """'job ID: status' (or 'verification ...'), then why it failed if it did."""
    lines = [f"{kind} {item['id']}: {item['status']}"]
    if item.get("error"):
        lines.append(f"error [{item['error']['code']}]: {item['error']['message']}")
    return lines


def published(result: dict) -> str:
    """Where a publication put the checkpoint: url (branch): commit, files, bytes."""
    from worker.gptq.download import size_text

    return (f"{result['url']} ({result['branch']}): commit {result['commit']}, "
            f"{len(result['files'])} files, {size_text(result['bytes'])}")


DYNAMIC_HELP = ("Per-layer settings, GPTQModel's `dynamic` rules, as JSON or @FILE: "
                '\'{"+:.*down_proj": {"bits": 8}, "-:.*\\.0\\.self_attn\\.o_proj": {}}\' '
                "(the first rule whose regex matches a layer's name decides; -: leaves it unquantized).")


def rules_option(value: str | None) -> dict | None:
    """--dynamic: a JSON object given inline or as @path to a file holding one."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {value[1:]}: {exc.strerror}", param_hint="'--dynamic'") from exc
    try:
        rules = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON ({exc})", param_hint="'--dynamic'") from exc
    if not isinstance(rules, dict):
        raise typer.BadParameter("must be a JSON object of rules", param_hint="'--dynamic'")
    return rules
