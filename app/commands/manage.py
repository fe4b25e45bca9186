"""`gptqd upload / datasets / verify / verifications / publish / publications / cancel`: the
rest of what the API does, for jobs and calibration files already on a server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from app.client import Client
from app.commands.common import (
    KEY,
    URL,
    age,
    eval_text,
    outcome,
    published,
    table,
    talking_to_server,
)
from app.commands.service import follow_publication, follow_verification


def register(app: typer.Typer) -> None:
    for name, fn in (("upload", upload), ("datasets", datasets), ("verify", verify),
                     ("verifications", verifications), ("publish", publish),
                     ("publications", publications), ("cancel", cancel)):
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
    _start("verification", lambda: client.verify(job_id, body),
           lambda vid: follow_verification(client, job_id, vid), describe_verification, wait)


def _start(kind: str, start: Callable[[], dict], follow: Callable[[str], dict],
           describe: Callable[[dict], str], wait: bool) -> None:
    """Starts a follow-up and prints its id; with wait, follows it to its end, prints how it
    ended and exits 1 unless it succeeded."""
    with talking_to_server():
        item = start()
        if not wait:
            typer.echo(item["id"])
            return
        typer.echo(f"{kind} {item['id']} queued", err=True)
        item = follow(item["id"])
    typer.echo(describe(item))
    if item["status"] != "succeeded":
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
    _list(lambda: Client(url, api_key).verifications(job_id), "VERIFICATION", "PERPLEXITY",
          _verification_row, f"no verifications of {job_id} (`gptqd verify {job_id}` starts one)")


def _list(fetch: Callable[[], list[dict]], kind: str, last: str,
          row: Callable[[dict], list[str]], none: str) -> None:
    """A job's follow-ups as a table (id, status, age, last), or what to run when it has none."""
    with talking_to_server():
        items = fetch()
    typer.echo(table([kind, "STATUS", "CREATED", last], [row(i) for i in items]) if items
               else none)


def _verification_row(v: dict) -> list[str]:
    ppl = (v.get("result") or {}).get("perplexity")
    return _follow_up_row(v, f"{ppl:.3f}" if ppl is not None else None)


def _follow_up_row(item: dict, outcome_text: str | None) -> list[str]:
    """id, status (with how far a running one is), age, and its outcome and error code."""
    error, progress = item.get("error"), item.get("progress")
    last = " ".join(filter(None, (outcome_text, f"({error['code']})" if error else None))) or "-"
    status = item["status"]
    if status == "running" and progress:  # how far it is
        status += f" ({progress['stage']} {progress['fraction']:.0%})"
    return [item["id"], status, age(item["created_at"]), last]


def publish(
    job_id: str = typer.Argument(..., help="A succeeded job."),
    repo_id: str = typer.Argument(..., help="The hub repository: namespace/name (created if missing)."),
    public: bool = typer.Option(False, "--public", help="Create the repository public (default: private; an existing one keeps its visibility)."),
    branch: str = typer.Option(None, help="A branch other than main (created if missing)."),
    message: str = typer.Option(None, help="The commit message."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card", help="Write a README.md saying how the model was quantized and what it lost."),
    wait: bool = typer.Option(False, "--wait", help="Wait until it is on the hub, showing the upload."),
    url: str = URL, api_key: str = KEY,
) -> None:
    """Upload a succeeded job's checkpoint to a Hugging Face hub repository, from the server
    (with the workers' token, GPTQD_HF_TOKEN)."""
    body = {k: v for k, v in {"repo_id": repo_id, "private": not public, "branch": branch,
                              "commit_message": message, "model_card": model_card}.items()
            if v is not None}
    client = Client(url, api_key)
    _start("publication", lambda: client.publish(job_id, body),
           lambda pid: follow_publication(client, job_id, pid), describe_publication, wait)


def describe_publication(p: dict) -> str:
    """A publication's status, then where the checkpoint is, or why it failed."""
    lines = outcome("publication", p)
    result = p.get("result") or {}
    if result.get("url"):
        lines.append(published(result))
    return "\n".join(lines)


def publications(job_id: str = typer.Argument(..., help="A job id."),
                 url: str = URL, api_key: str = KEY) -> None:
    """A job's publications: where each went (or why it failed)."""
    _list(lambda: Client(url, api_key).publications(job_id), "PUBLICATION", "REPOSITORY",
          lambda p: _follow_up_row(p, p["spec"]["repo_id"]),
          f"no publications of {job_id} (`gptqd publish {job_id} ORG/NAME` starts one)")


def cancel(job_id: str = typer.Argument(..., help="A queued or running job."),
           url: str = URL, api_key: str = KEY) -> None:
    """Cancel a job: a queued one at once, a running one at its next module boundary."""
    with talking_to_server():
        job = Client(url, api_key).cancel(job_id)
    if job["status"] == "cancelled":
        typer.echo(f"job {job_id}: cancelled")
    else:
        typer.echo(f"job {job_id}: {job['status']}, cancel requested (it stops at the next module)")
