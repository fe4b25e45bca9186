"""`gptqd up / serve / worker / submit / jobs / download`: run the service and talk to it.

The client commands read the server address from --url or GPTQD_URL (default
http://127.0.0.1:8000) and the key from --api-key or GPTQD_API_KEY.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from app.client import Client
from app.commands.common import (
    DYNAMIC_HELP,
    KEY,
    URL,
    age,
    agreement_lines,
    eval_text,
    outcome,
    rules_option,
    sample_lines,
    table,
    talking_to_server,
)

HOST = typer.Option("127.0.0.1", "--host", help="Address to listen on.")
PORT = typer.Option(8000, "--port", help="Port to listen on.")


def register(app: typer.Typer) -> None:
    for name, fn in (("up", up), ("serve", serve), ("worker", worker), ("submit", submit),
                     ("jobs", jobs), ("download", download)):
        app.command(name)(fn)


def up(host: str = HOST, port: int = PORT) -> None:
    """API and one worker on this machine (embedded store and broker unless configured).

    Jobs, artifacts and logs go under GPTQD_DATA_DIR (default ./var, from the current
    directory); local models are directories under GPTQD_MODELS_DIR (default
    GPTQD_DATA_DIR/models)."""
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

    bar = ProgressBar(enabled=progress)

    def on_event(event: dict) -> None:
        if event["type"] == "progress":
            bar(progress_event(event))

    try:
        return client.wait(job_id, on_event)
    finally:
        bar.close()


def follow_verification(client: Client, job_id: str, verification_id: str,
                        progress: bool = True) -> dict:
    """Shows the verification's progress until it ends; returns it."""
    return follow_polled(lambda on_poll: client.wait_verification(job_id, verification_id,
                                                                  on_poll), progress)


def follow_publication(client: Client, job_id: str, publication_id: str,
                       progress: bool = True) -> dict:
    """Shows the publication's progress until it ends; returns it."""
    return follow_polled(lambda on_poll: client.wait_publication(job_id, publication_id,
                                                                 on_poll), progress)


def follow_polled(wait: Callable[[Callable[[dict], None]], dict], progress: bool) -> dict:
    """A follow-up's progress as a bar on stderr, from its polled state, until wait returns
    the ended follow-up."""
    from app.commands.engine import ProgressBar

    bar = ProgressBar(enabled=progress)
    began = time.monotonic()

    def on_poll(item: dict) -> None:
        if item.get("progress"):
            bar(progress_event({**item["progress"], "seconds": time.monotonic() - began}))

    try:
        return wait(on_poll)
    finally:
        bar.close()


def progress_event(fields: dict) -> Any:
    """An engine ProgressEvent from the API's progress (or progress event) fields."""
    from worker.gptq.progress import ProgressEvent

    known = set(ProgressEvent.__dataclass_fields__)
    return ProgressEvent(**{k: v for k, v in fields.items() if k in known})


def summary(job: dict) -> str:
    """A few lines a person reads after a job ends."""
    lines = outcome("job", job)
    metrics = job.get("metrics") or {}
    if metrics.get("perplexity_after") is not None:
        lines.append(f"perplexity: {metrics['perplexity_before']:.3f} before, "
                     f"{metrics['perplexity_after']:.3f} after quantization"
                     f"{eval_text(metrics.get('evaluation') or {})}")
    lines.extend(agreement_lines(metrics))
    sizes = metrics.get("sizes") or {}
    if sizes.get("original_bytes") and sizes.get("checkpoint_bytes"):
        lines.append(f"size: {sizes['original_bytes'] / 1e6:.2f} MB of weights -> "
                     f"{sizes['checkpoint_bytes'] / 1e6:.2f} MB checkpoint")
    lines.extend(sample_lines(metrics.get("evaluation") or {}))
    if job["status"] == "succeeded":
        lines.append(f"artifacts: {len(job['artifacts'])} files, GET {job['links']['archive']}")
    return "\n".join(lines)


def _default(field: str) -> str:
    """The server's default for a job spec field (calibration.* for the calibration's)."""
    from app.schemas import CalibrationIn, JobIn

    model, _, name = field.rpartition(".")
    schema = CalibrationIn if model == "calibration" else JobIn
    value = schema.model_fields[name].default
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _opt(field: str, text: str, *names: str) -> Any:
    """An option that is left out of the spec unless given, so the server's default applies."""
    return typer.Option(None, *names, help=f"{text} (server default: {_default(field)})",
                        show_default=False)


def submit(
    model_id: str = typer.Argument(None, help="Hub id or a directory name under the models root."),
    spec_file: Path = typer.Option(None, "--spec", help="A JSON job spec (POST /jobs's body; the only way to "
                                   "set verify.* and trust_remote_code); options override it."),
    bits: int = _opt("bits", "Bits per weight: 2, 3, 4 or 8."),
    group_size: int = _opt("group_size", "Columns per scale/zero group: -1 (one per row), 16, 32, 64, 128, 256, 512 or 1024."),
    damp_percent: float = _opt("damp_percent", "Hessian damping, a fraction of its mean diagonal."),
    desc_act: bool = _opt("desc_act", "Act-order: columns by decreasing Hessian diagonal.",
                          "--desc-act/--no-desc-act"),
    sym: bool = _opt("sym", "Symmetric quantization (--no-sym writes gptq_v2).", "--sym/--no-sym"),
    static_groups: bool = _opt("static_groups", "Group scales fixed before the act-order sweep.",
                               "--static-groups/--no-static-groups"),
    true_sequential: bool = _opt("true_sequential", "Quantize a block's layers in order.",
                                 "--true-sequential/--no-true-sequential"),
    act_group_aware: bool = _opt("act_group_aware", "Group-aware reordering (static g_idx; not with act-order).",
                                 "--act-group-aware/--no-act-group-aware"),
    mse: bool = _opt("mse", "Search a clipping range per group minimising the MSE.", "--mse/--no-mse"),
    tensor_names: str = _opt("tensor_names", "Checkpoint tensor names: module (what GPTQModel reads) or "
                             "original (the model's own; what vLLM reads for Mixtral).", "--tensor-names"),
    dynamic: str = typer.Option(None, "--dynamic", help=DYNAMIC_HELP),
    revision: str = typer.Option(None, help="Hub branch, tag or commit."),
    dataset: str = _opt("calibration.dataset", "Calibration: a hub dataset, or 'builtin' (offline)."),
    dataset_config: str = _opt("calibration.config", "The hub dataset's config."),
    split: str = _opt("calibration.split", "The hub dataset's split."),
    text_field: str = _opt("calibration.text_field", "Column / JSON key holding the text."),
    dataset_id: str = typer.Option(None, help="An uploaded dataset (`gptqd upload FILE`) instead of --dataset."),
    num_samples: int = _opt("calibration.num_samples", "Calibration windows (1..4096)."),
    seq_length: int = _opt("calibration.seq_length", "Tokens per window (8..32768, at most the model's context)."),
    seed: int = _opt("calibration.seed", "Which windows are picked."),
    name: str = typer.Option(None, help="A label shown in `gptqd jobs` and the dashboard."),
    wait: bool = typer.Option(False, "--wait", help="Show live progress and the result."),
    url: str = URL, api_key: str = KEY,
) -> None:
    """Submit a quantization job (prints its id, or with --wait follows it to the end)."""
    base = json.loads(spec_file.read_text()) if spec_file else {}
    spec = build_spec(base, model_id=model_id, bits=bits, group_size=group_size,
                      damp_percent=damp_percent, desc_act=desc_act, sym=sym,
                      static_groups=static_groups, true_sequential=true_sequential,
                      act_group_aware=act_group_aware, mse=mse, tensor_names=tensor_names,
                      dynamic=rules_option(dynamic), revision=revision, dataset=dataset, dataset_config=dataset_config,
                      split=split, text_field=text_field, dataset_id=dataset_id,
                      num_samples=num_samples, seq_length=seq_length, seed=seed, name=name)
    client = Client(url, api_key)
    with talking_to_server():
        job = client.submit(spec)
        if not wait:
            typer.echo(job["id"])
            return
        typer.echo(f"submitted {job['id']}", err=True)
        job = follow(client, job["id"])
    typer.echo(summary(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def jobs(status: str = typer.Option(None, help="Only jobs with this status."),
         limit: int = typer.Option(20, help="At most this many jobs."),
         url: str = URL, api_key: str = KEY) -> None:
    """Recent jobs, newest first (a failed one with its error)."""
    with talking_to_server():
        page = Client(url, api_key).jobs(status=status, limit=limit)
    if not page["items"]:
        typer.echo("no jobs" + (f" with status {status}" if status else ""))
        return
    typer.echo(table(["JOB", "NAME", "STATUS", "PROGRESS", "CREATED", "MODEL", "ERROR"],
                     [job_row(job) for job in page["items"]]))


def job_row(job: dict, width: int = 60) -> list[str]:
    """One `gptqd jobs` row: id, name, status, progress, age, model, error (shortened)."""
    error = job.get("error")
    why = f"{error['code']}: {error['message']}" if error else ""
    if len(why) > width:
        why = why[:width - 1] + "…"
    return [job["id"], job.get("name") or "-", job["status"],
            f"{job['progress']['fraction'] * 100:.0f}%", age(job["created_at"]),
            job["model_id"], why]


def download(job_id: str, out: Path = typer.Option(None, help="Directory (default: ./<job>)."),
             url: str = URL, api_key: str = KEY) -> None:
    """A succeeded job's checkpoint, every file checked against its sha256."""
    dest = out or Path(job_id)
    with talking_to_server():
        paths = Client(url, api_key).download(job_id, dest)
    typer.echo(f"{len(paths)} files in {dest}")
