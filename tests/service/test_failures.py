"""Failures a person can act on, each caused for real on a real box (SQLite store, embedded
broker, one worker): the job ends `failed` with its code and a plain message, nothing is
left on disk, and the same worker goes on to run the next job.

- model_not_found: a name that is neither a directory under the models root nor on the hub
  (the hub is offline here);
- unsupported_architecture: a BERT model directory;
- layer_shape: hidden size 64 with group_size 128;
- unmatched_rule: a per-layer rule (`dynamic`) with a typo, matching none of the layers;
- calibration: an uploaded text that is too short, a JSON-lines file without the text field;
- cholesky_failed: a model whose weights are NaN, so every Hessian is;
- out_of_memory: the worker's job processes are limited (RLIMIT_AS, GPTQD_JOB_MEMORY_LIMIT_MB)
  and the job asks for 256 windows of 512 tokens (of an uploaded text just long enough)
  through a block of width 512;
- disk_full: the artifacts directory is a small tmpfs (needs root to mount; skipped otherwise).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.tinymodel import TinySpec, build_tiny_llama
from tests.service.conftest import NO_VERIFY, TERMINAL, Box, start_box, tiny_spec, wait_status
from tests.service.helpers import job_processes, wait_for

pytestmark = pytest.mark.service

# one wide block: 256 windows of 512 tokens make activations of hundreds of MiB each
WIDE = TinySpec(hidden=512, intermediate=1024, layers=1, heads=8, vocab=512)
HEADROOM_MB = 700  # above a job process's size at start: small jobs need ~350 MiB of it
BASELINE = ("import celery, transformers, worker.gptq.api, worker.gptq.loader\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status')"
            " if l.startswith('VmSize')) // 1024)")


def job_process_baseline_mb() -> int:
    """Address space of a process with what a worker's job process has imported."""
    out = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    return int(out.stdout.strip().splitlines()[-1])


def nan_model(src: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    model.save_pretrained(dest)
    for tok in src.glob("tok*"):
        shutil.copy(tok, dest / tok.name)


def bert_model(dest: Path) -> None:
    from transformers import BertConfig

    dest.mkdir(parents=True, exist_ok=True)
    BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128).save_pretrained(dest)


def try_mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def failing_box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path
                ) -> Iterator[tuple[Box, bool]]:
    models = tmp_path_factory.mktemp("fail-models")
    for name in ("tiny", "tiny-deep"):
        shutil.copytree(models_dir / name, models / name)  # a symlink out would be refused
    nan_model(models_dir / "tiny", models / "nan")
    build_tiny_llama(models / "wide", WIDE)
    bert_model(models / "bert")
    data = tmp_path_factory.mktemp("failing")
    # the tiny checkpoint (~220 KB) fits, the 8-block one does not
    mounted = try_mount_tmpfs(data / "artifacts", "320k")
    limit = job_process_baseline_mb() + HEADROOM_MB
    box = start_box(data, models, {"GPTQD_JOB_MEMORY_LIMIT_MB": str(limit),
                                   "HF_HUB_OFFLINE": "1"}, workers=1)
    try:
        yield box, mounted
    finally:
        box.close()
        if mounted:
            subprocess.run(["umount", str(data / "artifacts")], check=False)


def enough_text() -> bytes:
    """About 400k characters of builtin text: 256 windows of 512 tokens for WIDE's tokenizer
    with some to spare. Not all of it: the job must run out of memory in quantization, where
    torch raises MemoryError, and not while tokenizing a larger text, where the tokenizers
    library aborts the process on a failed allocation."""
    from worker.gptq.calibration import builtin_rows

    rows, size = [], 0
    for row in builtin_rows():
        rows.append(row)
        size += len(row) + 2
        if size > 400_000:
            break
    return "\n\n".join(rows).encode()


def upload(box: Box, name: str, content: bytes) -> str:
    r = box.http.post("/datasets", files={"file": (name, content)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


CASES = {
    "model_not_found": lambda box: tiny_spec(model_id="no-such-model"),
    "unsupported_architecture": lambda box: tiny_spec(model_id="bert"),
    "layer_shape": lambda box: tiny_spec(group_size=128),
    "unmatched_rule": lambda box: tiny_spec(dynamic={"+:.*gate_projj": {"bits": 8}}),
    "calibration_too_short": lambda box: tiny_spec(
        calibration={"dataset_id": upload(box, "short.txt", b"far too short"),
                     "num_samples": 8, "seq_length": 64}),
    "calibration_no_text_field": lambda box: tiny_spec(
        calibration={"dataset_id": upload(box, "rows.jsonl",
                                          b'{"content": "some words"}\n' * 200),
                     "num_samples": 2, "seq_length": 16}),
    "cholesky_failed": lambda box: tiny_spec(model_id="nan"),
    "out_of_memory": lambda box: tiny_spec(
        model_id="wide", calibration={"dataset_id": upload(box, "calib.txt", enough_text()),
                                      "num_samples": 256, "seq_length": 512}),
    "disk_full": lambda box: tiny_spec(model_id="tiny-deep"),
}
# the words each message must contain so that a person knows what to do
ADVICE = {
    # and, since a mistyped local name is likelier than a missing hub model, what is local
    "model_not_found": ["no-such-model", "GPTQD_MODELS_DIR", "tiny-deep"],
    "unsupported_architecture": ["bert", "supported"],
    "layer_shape": ["group_size 128"],
    # the rule, and what the model's layers are called
    "unmatched_rule": ["gate_projj", "model.layers.0."],
    "calibration_too_short": ["too short"],
    "calibration_no_text_field": ["text"],
    "cholesky_failed": ["damp_percent"],
    "out_of_memory": ["num_samples", "seq_length"],
    "disk_full": ["space"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failure_ends_the_job_with_its_code_and_advice(failing_box: tuple[Box, bool],
                                                         case: str) -> None:
    box, mounted = failing_box
    if case == "disk_full" and not mounted:
        pytest.skip("mounting a small tmpfs needs root")
    spec = CASES[case](box)
    spec["verify"] = NO_VERIFY
    r = box.http.post("/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_status(box.http, r.json()["id"], TERMINAL, timeout=240)
    code = "calibration" if case.startswith("calibration") else case
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code, job["error"]
    message = job["error"]["message"]
    assert "Traceback" not in message and len(message) < 2000
    for word in ADVICE[case]:
        assert word.lower() in message.lower(), message
    assert job["artifacts"] == []
    assert box.http.get(f"/jobs/{job['id']}/artifacts").status_code == 409
    leftovers = [p for p in (box.data_dir / "artifacts").iterdir() if job["id"] in p.name]
    assert leftovers == []
    assert not (box.data_dir / "work" / job["id"]).exists()


def test_a_job_process_that_aborts_under_the_memory_limit_fails_as_out_of_memory(
        failing_box: tuple[Box, bool]) -> None:
    """Native code ends the process with abort() when an allocation fails under the limit
    (the tokenizers library does, on a text too large for it): retrying would abort again."""
    box, _ = failing_box
    job = box.http.post("/jobs", json=tiny_spec(
        model_id="tiny-deep", verify=NO_VERIFY,
        calibration={"dataset": "builtin", "num_samples": 32, "seq_length": 128})).json()
    wait_for("block 2", lambda: (box.http.get(f"/jobs/{job['id']}").json()["progress"]["block"]
                                 or 0) >= 2, 120)
    running = min(job_processes(box.workers[0]), key=lambda p: p.create_time())
    running.send_signal(signal.SIGABRT)  # what a failed allocation in Rust or C++ ends with
    done = wait_status(box.http, job["id"], TERMINAL, timeout=60)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"]["code"] == "out_of_memory", done["error"]
    for word in ("GPTQD_JOB_MEMORY_LIMIT_MB", "num_samples", "MiB"):
        assert word in done["error"]["message"], done["error"]["message"]
    assert not (box.data_dir / "work" / job["id"]).exists()


def test_after_every_failure_the_same_worker_runs_a_job(failing_box: tuple[Box, bool]) -> None:
    box, _ = failing_box
    worker = box.workers[0]
    job = box.http.post("/jobs", json=tiny_spec(verify=NO_VERIFY, calibration={
        "dataset": "builtin", "num_samples": 2, "seq_length": 16})).json()
    done = wait_status(box.http, job["id"], TERMINAL)
    assert done["status"] == "succeeded", done["error"]
    assert worker.poll() is None  # no failure took the worker down
    names = [a["name"] for a in done["artifacts"]]
    assert "model.safetensors" in names
    log = (box.data_dir / "w1.log").read_text(errors="replace")
    assert "Traceback" not in log
    statuses = json.dumps(box.http.get("/jobs", params={"limit": 200}).json())
    assert '"running"' not in statuses and '"queued"' not in statuses
