"""`gptqd upload / datasets / verify / verifications / cancel`: the rest of what the API does,
for jobs and calibration files already on a server."""

from __future__ import annotations

from pathlib import Path

import typer

from app.client import Client
from app.commands.common import KEY, URL, age, eval_text, outcome, table, talking_to_server
from app.commands.service import follow_verification


def register(app: typer.Typer) -> None:
    for name, fn in (("upload", upload), ("datasets", datasets), ("verify", verify),
                     ("verifications", verifications), ("cancel", cancel)):
        app.command(name)(fn)


def upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                help="Calibration text: .txt, .jsonl (one JSON object a line) or .parquet."),
    url: str = URL, api_key: str = KEY,
) -> None:
    """Upload a calibration file; prints its id for `gptqd submit --dataset-id`."""
    with talking_to_server():
        ds = Client(url, api_key).upload_dataset(file)
    typer.echo(f"uploaded {ds['filename']} ({ds['size']} bytes, {ds['format']})", err=True)
    typer.echo(ds["id"])


def datasets(url: str = URL, api_key: str = KEY) -> None:
    """Uploaded calibration files."""
    with talking_to_server():
        items = Client(url, api_key).datasets()
    if not items:
        typer.echo("no datasets (`gptqd upload FILE` adds one)")
        return
    typer.echo(table(["DATASET", "FORMAT", "SIZE", "CREATED", "FILE"],
                     [[d["id"], d["format"], str(d["size"]), age(d["created_at"]), d["filename"]]
                      for d in items]))


def verify(
    job_id: str = typer.Argument(..., help="A succeeded job."),
    dataset_id: str = typer.Option(None, help="Held-out text, an uploaded dataset (server default: builtin-heldout for a builtin job, else the job's calibration text or its hub test split)."),
    seq_length: int = typer.Option(None, help="Tokens per window (server default: the job's calibration length)."),
    max_windows: int = typer.Option(None, help="Windows evaluated (server default: 16)."),
    prompts: list[str] = typer.Option(None, "--prompt", help="A prompt to generate from (repeatable) (server default: 'Once upon a time')."),
    max_new_tokens: int = typer.Option(None, help="Tokens per generation, 0 for none (server default: 32)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the result and show it."),
    url: str = URL, api_key: str = KEY,
) -> None:
    """Measure a succeeded job's stored checkpoint on a worker: perplexity and generated text."""
    body = {k: v for k, v in {"dataset_id": dataset_id, "seq_length": seq_length,
                              "max_windows": max_windows, "prompts": prompts or None,
                              "max_new_tokens": max_new_tokens}.items() if v is not None}
    client = Client(url, api_key)
    with talking_to_server():
        v = client.verify(job_id, body)
        if not wait:
            typer.echo(v["id"])
            return
        typer.echo(f"verification {v['id']} queued", err=True)
        v = follow_verification(client, job_id, v["id"])
    typer.echo(describe_verification(v))
    if v["status"] != "succeeded":
        raise typer.Exit(1)


def describe_verification(v: dict) -> str:
    """A verification's status, then its perplexity and samples, or why it failed."""
    lines = outcome("verification", v)
    result = v.get("result") or {}
    if result.get("perplexity") is not None:
        where = eval_text({"source": result.get("eval_source"), "held_out": result.get("held_out")})
        lines.append(f"perplexity: {result['perplexity']:.3f}{where} "
                     f"({result.get('max_windows')} windows of {result.get('seq_length')} tokens)")
    for sample in result.get("samples") or []:
        lines.append(f"sample: {sample['text']!r}")
    return "\n".join(lines)


def verifications(job_id: str = typer.Argument(..., help="A job id."),
                  url: str = URL, api_key: str = KEY) -> None:
    """A job's verifications, with their perplexity (or why one failed)."""
    with talking_to_server():
        items = Client(url, api_key).verifications(job_id)
    if not items:
        typer.echo(f"no verifications of {job_id} (`gptqd verify {job_id}` starts one)")
        return
    typer.echo(table(["VERIFICATION", "STATUS", "CREATED", "PERPLEXITY"],
                     [_verification_row(v) for v in items]))


def _verification_row(v: dict) -> list[str]:
    ppl = (v.get("result") or {}).get("perplexity")
    error, progress = v.get("error"), v.get("progress")
    last = f"{ppl:.3f}" if ppl is not None else (error["code"] if error else "-")
    status = v["status"]
    if status == "running" and progress:  # how far it is
        status += f" ({progress['stage']} {progress['fraction']:.0%})"
    return [v["id"], status, age(v["created_at"]), last]


def cancel(job_id: str = typer.Argument(..., help="A queued or running job."),
           url: str = URL, api_key: str = KEY) -> None:
    """Cancel a job: a queued one at once, a running one at its next module boundary."""
    with talking_to_server():
        job = Client(url, api_key).cancel(job_id)
    if job["status"] == "cancelled":
        typer.echo(f"job {job_id}: cancelled")
    else:
        typer.echo(f"job {job_id}: {job['status']}, cancel requested (it stops at the next module)")
