"""The main job, end to end on one machine: `python -m app.demo` (or `make demo`).

Starts the box on the embedded defaults (SQLite store and broker under GPTQD_DATA_DIR, default
./var: nothing else to install), submits a GPTQ job, shows its progress, verifies the stored
checkpoint on a worker (perplexity and generated text) and says where the checkpoint is.

The model: GPTQD_DEMO_MODEL when set (a hub id, or a local model directory); otherwise a hub
model when the hub answers; otherwise a small Llama that the demo builds and trains for a few
seconds on the engine's builtin English text (its tokenizer is trained here too), so the demo
runs on a fresh machine with no network.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx

from app.box import api_command, free_port, spawn, stop, wait_ready, worker_command
from app.client import Client
from app.commands.service import follow, summary
from app.quiet import quiet_third_party
from app.settings import Settings
from app.tinymodel import TinySpec, build_tiny_llama

HUB_MODEL = "openai-community/gpt2"
TINY_NAME = "gptqd-demo-llama"
# ~30 s of CPU time to build: perplexity ~25 on the held-out text (vocabulary 512)
TINY = TinySpec(hidden=128, intermediate=256, layers=2, heads=4, vocab=512, train_steps=400,
                train_seq=128, train_batch=8)


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants  # HF_ENDPOINT: the hub, or a team's mirror of it

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return httpx.head(f"{constants.ENDPOINT}/api/models/{HUB_MODEL}", timeout=timeout,
                          follow_redirects=True).status_code == 200
    except httpx.HTTPError:
        return False


def choose_model(settings: Settings) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(model_id, extra environment for the box, calibration) for the demo job."""
    builtin = {"dataset": "builtin", "num_samples": 32, "seq_length": 128}
    wanted = os.environ.get("GPTQD_DEMO_MODEL")
    if wanted:
        path = Path(wanted).expanduser()
        if path.is_dir():  # a local directory becomes the models root's only entry
            path = path.resolve()
            return path.name, {"GPTQD_MODELS_DIR": str(path.parent)}, builtin
        return wanted, {}, builtin
    if hub_reachable():
        say(f"the model hub answers: quantizing {HUB_MODEL} on wikitext-2")
        return HUB_MODEL, {}, {"num_samples": 32, "seq_length": 256}
    say("no model hub here: building a small Llama (tokenizer trained in-process, ~30 s)")
    build_tiny_llama(settings.models_root / TINY_NAME, TINY)
    return TINY_NAME, {}, builtin


def next_steps(checkpoint: Path, job_id: str) -> list[str]:
    """What a user can do with the checkpoint once the demo's box has stopped."""
    return [
        f"score it on a text: gptqd eval --model {checkpoint} --text FILE.txt",
        "load it with transformers, GPTQModel or vLLM as any GPTQ model (docs/interop.md)",
        f"the box stops now; `gptqd up` (with GPTQD_DATA_DIR={checkpoint.parent.parent}) "
        f"serves it again: gptqd download {job_id}",
    ]


def quiet_libraries() -> None:
    """Only errors from third-party libraries in the demo's own output: a demo user can act on
    none of torchao's and torch's import noise, transformers' advice, or the progress bar of
    saving the small model. Only this process is quieted: the box's processes log in full to
    their files."""
    quiet_third_party()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def run() -> int:
    quiet_libraries()
    settings = Settings()
    settings.ensure_dirs()
    model_id, env, calibration = choose_model(settings)
    env = {**env, "GPTQD_DATA_DIR": str(settings.data_dir)}
    port = int(os.environ.get("GPTQD_DEMO_PORT") or free_port())
    url = f"http://127.0.0.1:{port}"
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    say(f"starting the API on {url} and one worker (data in {settings.data_dir}, "
        f"logs in {logs})")
    api = spawn(api_command("127.0.0.1", port), env, logs / "api.log")
    worker = spawn(worker_command("demo", settings.queue), env, logs / "worker.log")
    try:
        wait_ready(url, timeout=120, proc=api)
        client = Client(url, os.environ.get("GPTQD_API_KEY"))
        spec = {"model_id": model_id, "name": "demo", "calibration": calibration,
                "verify": {"max_windows": 16, "max_new_tokens": 24,
                           "prompts": ["Once upon a time", "She looked at him and"]}}
        job = client.submit(spec)
        say(f"submitted job {job['id']} ({model_id}, 4-bit, group {job['spec']['group_size']})")
        job = follow(client, job["id"])
        print(summary(job), flush=True)
        if job["status"] != "succeeded":
            say(f"the job {job['status']}; see {logs / 'worker.log'}")
            return 1
        say("verifying the stored checkpoint on the worker (engine loader, perplexity, text)")
        v = client.verify(job["id"], {"max_windows": 16, "max_new_tokens": 24,
                                      "prompts": ["Once upon a time"]})
        v = client.wait_verification(job["id"], v["id"])
        if v["status"] != "succeeded":
            say(f"verification {v['status']}: {v['error']}")
            return 1
        result = v["result"]
        text = result["eval_source"] + (", held out from calibration" if result["held_out"] else "")
        say(f"verification: perplexity {result['perplexity']:.3f} on {text} "
            f"(the job reported {job['metrics']['perplexity_after']:.3f})")
        for sample in result["samples"]:
            say(f"generated: {sample['text']!r}")
        checkpoint = settings.artifacts_dir / job["id"]
        say(f"checkpoint: {checkpoint}")
        for line in next_steps(checkpoint, job["id"]):
            say(line)
        return 0
    finally:
        stop(worker, timeout=30)
        stop(api, timeout=10)


if __name__ == "__main__":
    sys.exit(run())
