"""`gptqd up / serve / worker / submit / jobs / download`: run the service and talk to it.

The client commands read the server address from --url or GPTQD_URL (default
http://127.0.0.1:8000) and the key from --api-key or GPTQD_API_KEY.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import typer

from app.client import ApiError, Client

URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="GPTQD_URL", help="API address.")
KEY = typer.Option(None, "--api-key", envvar="GPTQD_API_KEY", help="API key (Bearer).")
HOST = typer.Option("127.0.0.1", "--host", help="Address to listen on.")
PORT = typer.Option(8000, "--port", help="Port to listen on.")


def register(app: typer.Typer) -> None:
    for name, fn in (("up", up), ("serve", serve), ("worker", worker), ("submit", submit),
                     ("jobs", jobs), ("download", download)):
        app.command(name)(fn)


def up(host: str = HOST, port: int = PORT) -> None:
    """API and one worker on this machine (embedded store and broker unless configured)."""
    from app.box import spawn, stop, worker_command
    from app.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    typer.echo(f"gptqd: data in {settings.data_dir}, API on http://{host}:{port}", err=True)
    proc = spawn(worker_command("worker1", settings.queue))
    # uvicorn shuts down on SIGTERM/SIGHUP, then raises the signal again: as an exception here,
    # so that the worker (in a session of its own) is stopped below instead of orphaned
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        serve(host, port)
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut this short
        typer.echo("gptqd: stopping the worker", err=True)
        stop(proc, timeout=30)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(host: str = HOST, port: int = PORT) -> None:
    """The API server only."""
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port)


def worker(
    name: str = typer.Option("worker", help="Worker name (unique per host)."),
    pool: str = typer.Option("prefork", help="prefork (tasks in a pool process) or solo (in the worker's own); each job runs in a clean process of its own either way."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
) -> None:
    """One Celery worker: one job at a time (run one per GPU, with CUDA_VISIBLE_DEVICES)."""
    from app.box import worker_command
    from app.settings import get_settings

    cmd = worker_command(name, get_settings().queue, pool=pool, loglevel=loglevel)
    os.execv(cmd[0], cmd)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def build_spec(base: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The JSON spec with the options that were given laid over it (None = not given)."""
    spec = json.loads(json.dumps(base))
    calib_keys = {"dataset": "dataset", "dataset_config": "config", "split": "split",
                  "dataset_id": "dataset_id", "num_samples": "num_samples",
                  "seq_length": "seq_length", "seed": "seed", "text_field": "text_field"}
    for key, value in options.items():
        if value is None:
            continue
        if key in calib_keys:
            spec.setdefault("calibration", {})[calib_keys[key]] = value
        else:
            spec[key] = value
    return spec


def follow(client: Client, job_id: str, progress: bool = True) -> dict:
    """Shows the job's progress (a bar on stderr) until it ends; returns the final job."""
    from app.commands.engine import ProgressBar
    from worker.gptq.progress import ProgressEvent

    bar = ProgressBar(enabled=progress)
    fields = set(ProgressEvent.__dataclass_fields__)

    def on_event(event: dict) -> None:
        if event["type"] == "progress":
            bar(ProgressEvent(**{k: v for k, v in event.items() if k in fields}))

    try:
        return client.wait(job_id, on_event)
    finally:
        bar.close()


def summary(job: dict) -> str:
    """A few lines a person reads after a job ends."""
    lines = [f"job {job['id']}: {job['status']}"]
    if job.get("error"):
        lines.append(f"error [{job['error']['code']}]: {job['error']['message']}")
    metrics = job.get("metrics") or {}
    if metrics.get("perplexity_after") is not None:
        lines.append(f"perplexity: {metrics['perplexity_before']:.3f} before, "
                     f"{metrics['perplexity_after']:.3f} after quantization")
    sizes = metrics.get("sizes") or {}
    if sizes.get("original_bytes") and sizes.get("checkpoint_bytes"):
        lines.append(f"size: {sizes['original_bytes'] / 1e6:.2f} MB of weights -> "
                     f"{sizes['checkpoint_bytes'] / 1e6:.2f} MB checkpoint")
    for text in (metrics.get("evaluation") or {}).get("samples_after") or []:
        lines.append(f"sample: {text!r}")
    if job["status"] == "succeeded":
        lines.append(f"artifacts: {len(job['artifacts'])} files, GET {job['links']['archive']}")
    return "\n".join(lines)


def submit(
    model_id: str = typer.Argument(None, help="Hub id or a directory name under the models root."),
    spec_file: Path = typer.Option(None, "--spec", help="A JSON job spec; flags override it."),
    bits: int = typer.Option(None), group_size: int = typer.Option(None),
    damp_percent: float = typer.Option(None), desc_act: bool = typer.Option(None),
    sym: bool = typer.Option(None), revision: str = typer.Option(None),
    dataset: str = typer.Option(None, help="Hub dataset name, or 'builtin'."),
    dataset_config: str = typer.Option(None), split: str = typer.Option(None),
    dataset_id: str = typer.Option(None, help="An uploaded dataset (POST /datasets)."),
    num_samples: int = typer.Option(None), seq_length: int = typer.Option(None),
    name: str = typer.Option(None),
    wait: bool = typer.Option(False, "--wait", help="Show live progress and the result."),
    url: str = URL, api_key: str = KEY,
) -> None:
    """Submit a quantization job (prints its id, or with --wait follows it to the end)."""
    base = json.loads(spec_file.read_text()) if spec_file else {}
    spec = build_spec(base, model_id=model_id, bits=bits, group_size=group_size,
                      damp_percent=damp_percent, desc_act=desc_act, sym=sym, revision=revision,
                      dataset=dataset, dataset_config=dataset_config, split=split,
                      dataset_id=dataset_id, num_samples=num_samples, seq_length=seq_length,
                      name=name)
    client = Client(url, api_key)
    try:
        job = client.submit(spec)
        if not wait:
            typer.echo(job["id"])
            return
        typer.echo(f"submitted {job['id']}", err=True)
        job = follow(client, job["id"])
    except ApiError as exc:
        raise _fail(exc) from exc
    typer.echo(summary(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def jobs(status: str = typer.Option(None, help="Only jobs with this status."),
         limit: int = typer.Option(20), url: str = URL, api_key: str = KEY) -> None:
    """Recent jobs, newest first."""
    try:
        page = Client(url, api_key).jobs(status=status, limit=limit)
    except ApiError as exc:
        raise _fail(exc) from exc
    for job in page["items"]:
        p = job["progress"]
        typer.echo(f"{job['id']}  {job['status']:<9}  {p['fraction'] * 100:5.1f}%  "
                   f"{job['created_at'][:19]}  {job['model_id']}")


def download(job_id: str, out: Path = typer.Option(None, help="Directory (default: ./<job>)."),
             url: str = URL, api_key: str = KEY) -> None:
    """A succeeded job's checkpoint, every file checked against its sha256."""
    dest = out or Path(job_id)
    try:
        paths = Client(url, api_key).download(job_id, dest)
    except (ApiError, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"{len(paths)} files in {dest}")
