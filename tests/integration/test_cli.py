"""`gptqd quantize` and `gptqd eval` run as real subprocesses on a tiny model written by the test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.tinymodel import build_tiny_llama

SCRIPT = Path(sys.executable).parent / "gptqd"
ROOT = Path(__file__).resolve().parents[2]


def gptqd(*args: str, timeout: float = 300,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command with a bare environment: offline, unless env (e.g. a fake hub's) says."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "app.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1",
             **(env or {})},
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    from worker.gptq.calibration import builtin_rows

    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n\n".join(builtin_rows()[-200:]))
    return path


def quantize_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "quantize", "--model", str(model), "--out", str(out), "--bits", "4", "--group-size", "32",
        "--calibration", "builtin", "--num-samples", "8", "--seq-length", "64", *extra,
    ]


def test_quantize_then_eval(tiny_model, eval_text, tmp_path):
    out = tmp_path / "ckpt"
    run = gptqd(*quantize_args(tiny_model, out, "--eval-text", str(eval_text), "--eval-max-windows", "4"))
    assert run.returncode == 0, run.stderr
    assert "block 2/2" in run.stderr  # the progress bar went through both blocks
    # and through the whole-model evaluations' batches, before and after (one line an event
    # when stderr is not a terminal)
    evaluating = [line for line in run.stderr.splitlines() if line.startswith("evaluating")]
    assert sum("batch 1 of 1" in line for line in evaluating) == 2, run.stderr
    # and through the writing of the weights, to all of their bytes
    written = [re.search(r"writing the checkpoint: ([\d.]+) KB of ([\d.]+) KB", line)
               for line in run.stderr.splitlines() if line.startswith("saving")]
    written = [(float(m.group(1)), float(m.group(2))) for m in written if m]
    header = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    weights = ((out / "model.safetensors").stat().st_size - 8 - header) / 1000
    assert len(written) > 1 and written[-1] == (round(weights, 1), round(weights, 1)), written
    assert f"checkpoint: {out}" in run.stdout
    assert "perplexity after" in run.stdout
    assert "solver: torch column loop on cpu" in run.stdout  # which loop ran (a GPU: triton, or why not)
    for name in ("config.json", "quantize_config.json", "model.safetensors", "tokenizer.json",
                 "quant_report.json", "quant_log.csv", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "ckpt.partial").exists()
    qconfig = json.loads((out / "quantize_config.json").read_text())
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"]) == (4, 32, True)
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["modules"]) == 2 * 7
    assert "out_dir" not in report  # no trace of the temporary .partial directory
    assert ".partial" not in (out / "quant_report.json").read_text()

    scored = gptqd("eval", "--model", str(out), "--text", str(eval_text), "--seq-length", "64",
                   "--max-windows", "4", "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["kind"] == "quantized" and result["windows"] == 4
    # the CLI's eval and the run's own after-quantization eval use the same windows
    assert result["perplexity"] == pytest.approx(report["perplexity_after"], rel=1e-3)

    args = ("eval", "--model", str(tiny_model), "--text", str(eval_text), "--seq-length", "64",
            "--max-windows", "4", "--device", "cpu")
    original = gptqd(*args)
    assert original.returncode == 0, original.stderr
    assert original.stdout.startswith("perplexity ")
    assert "original model" in original.stdout and "read block by block" in original.stdout
    # its progress: block by block, with the time left
    steps = [line for line in original.stderr.splitlines() if line.startswith("evaluating")]
    assert any("block 2/2" in line and "ETA 00:00" in line for line in steps), original.stderr
    assert original.stderr.splitlines()[-1].startswith("evaluating  100%"), original.stderr
    # scored block by block (streameval.streamed_perplexity): the number the run's own
    # whole-model evaluation of the original gave, on the same windows
    streamed = json.loads(gptqd(*args, "--json").stdout)
    assert streamed["streamed"] and streamed["perplexity"] == report["perplexity_before"]

    # the checkpoint against its original (read block by block) on the same windows: what
    # each scores alone, and the divergence the run measured from the weights in memory
    compared = gptqd("eval", "--model", str(out), "--reference", str(tiny_model), "--text",
                     str(eval_text), "--seq-length", "64", "--max-windows", "4", "--json")
    assert compared.returncode == 0, compared.stderr
    both = json.loads(compared.stdout)
    assert both["perplexity"] == result["perplexity"]
    assert both["reference"] == {"model": str(tiny_model), "perplexity": report["perplexity_before"],
                                 "kind": "original", "streamed": True}
    assert both["kl_divergence"] == pytest.approx(report["kl_divergence"], rel=0.01)
    assert both["top1_agreement"] == pytest.approx(report["top1_agreement"], abs=0.01)
    shown = gptqd("eval", "--model", str(out), "--reference", str(tiny_model), "--text",
                  str(eval_text), "--seq-length", "64", "--max-windows", "4")
    assert shown.stdout.splitlines() == [
        f"perplexity {both['perplexity']:.4f} (4 windows of 64 tokens, quantized model {out}"
        f"{', read block by block' if both['streamed'] else ''})",
        f"reference perplexity {both['reference']['perplexity']:.4f} (original model {tiny_model}, "
        "read block by block)",
        f"agreement with the reference: top-1 token {100 * both['top1_agreement']:.1f}%, "
        f"KL {both['kl_divergence']:.3g} nats per token",
    ], shown.stdout + shown.stderr
    # through both models' passes to the end
    assert any(line.startswith("evaluating") and "reference" in line for line in shown.stderr.splitlines())
    assert shown.stderr.splitlines()[-1].startswith("evaluating  100%"), shown.stderr


def test_eval_refuses_a_reference_with_another_tokenizer(tiny_model, eval_text, tmp_path):
    from app.tinymodel import TinySpec

    other = build_tiny_llama(tmp_path / "other", TinySpec(vocab=384))
    run = gptqd("eval", "--model", str(tiny_model), "--reference", str(other), "--text",
                str(eval_text), "--seq-length", "64", "--max-windows", "2", env={"COLUMNS": "400"})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Invalid value for '--reference'" in run.stderr
    assert (f"{other} does not share {tiny_model}'s tokenizer (vocabularies of 384 and 512 "
            "tokens, or other token ids for the text)") in run.stderr
    # before either model is scored
    assert not any(line.startswith("evaluating") for line in run.stderr.splitlines()), run.stderr


def test_quantize_streamed_measures_what_the_whole_model_run_measures(tiny_model, eval_text, tmp_path):
    """--load stream: perplexity measured as the blocks go by (the same numbers); the sample
    text it cannot make is explained, not silently missing."""
    runs = {}
    for load in ("whole", "stream"):
        run = gptqd(*quantize_args(tiny_model, tmp_path / load, "--eval-text", str(eval_text),
                                   "--eval-max-windows", "4", "--load", load))
        assert run.returncode == 0, run.stderr
        runs[load] = (run.stdout, json.loads((tmp_path / load / "quant_report.json").read_text()))
    (whole_out, whole), (stream_out, stream) = runs["whole"], runs["stream"]
    assert (whole["lazy"], stream["lazy"]) == (False, True)
    assert "model: held whole in memory" in whole_out and "model: read block by block" in stream_out
    assert (stream["perplexity_before"], stream["perplexity_after"]) == (
        whole["perplexity_before"], whole["perplexity_after"])
    assert (stream["kl_divergence"], stream["top1_agreement"]) == (
        whole["kl_divergence"], whole["top1_agreement"])
    shown = (f"agreement with the original: top-1 token {100 * whole['top1_agreement']:.1f}%, "
             f"KL {whole['kl_divergence']:.3g} nats per token")
    assert shown in whole_out and shown in stream_out
    assert "sample: 'Once upon a time" in whole_out
    assert "no samples: greedy samples need the whole model: lazy loading was asked for" in stream_out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bits", "5"], "bits must be one of"),
        (["--group-size", "100"], "group_size must be one of"),
        (["--damp-percent", "2"], "damp_percent must be in"),
        (["--num-samples", "0"], "num_samples must be >= 1"),
        (["--bits", "four"], "'--bits'"),
        (["--load", "lazy"], "'--load'"),
        (["--dynamic", '{"+:(": {}}'], "is not a valid regex"),
        (["--dynamic", "{bits: 8}"], "not JSON"),
    ],
)
def test_bad_arguments_are_refused_cleanly(tmp_path, args, needle):
    run = gptqd("quantize", "--model", "x", "--out", str(tmp_path / "o"), *args, timeout=120)
    assert run.returncode == 2
    assert needle in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert not (tmp_path / "o").exists()


def test_engine_errors_are_one_line(tiny_model, tmp_path):
    missing = gptqd(*quantize_args(tmp_path / "nope", tmp_path / "a"))
    assert missing.returncode == 1
    assert "error [model_not_found]" in missing.stderr
    assert "Traceback" not in missing.stderr

    # hidden size 64 is not divisible by group 128: refused before any work, naming the layer
    shape = gptqd(*quantize_args(tiny_model, tmp_path / "b", "--group-size", "128"))
    assert shape.returncode == 1
    assert "error [layer_shape]" in shape.stderr and "model.layers.0.self_attn.q_proj" in shape.stderr
    assert "Traceback" not in shape.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_existing_output_is_not_overwritten(tiny_model, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = gptqd(*quantize_args(tiny_model, out), timeout=120)
    assert run.returncode == 2
    assert "--overwrite" in run.stderr and "Traceback" not in run.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_push_uploads_a_checkpoint_with_its_card(tiny_model, tmp_path):
    """`gptqd push DIR REPO`: the checkpoint on a hub (tests/fakehub.py) as written, with a
    card, its report without this machine's paths, the upload's progress on stderr; a token
    that may not write there is one line saying so, and a bad repository id a usage error."""
    from tests.fakehub import fake_hub, hub_env

    out = tmp_path / "ckpt"
    assert gptqd(*quantize_args(tiny_model, out)).returncode == 0
    with fake_hub({}) as hub:
        env = {**hub_env(hub.url, tmp_path / "hf"), "HF_TOKEN": hub.token}
        run = gptqd("push", str(out), "team/tiny-4bit", env=env)
        assert run.returncode == 0, run.stderr
        head = hub.head("team/tiny-4bit")
        assert re.fullmatch(rf"{hub.url}/team/tiny-4bit \(main\): commit {head}, \d+ files, "
                            r"[\d.]+ KB\n", run.stdout), run.stdout
        stages = [line.split()[0] for line in run.stderr.splitlines()]
        assert stages[0] == "preparing" and "uploading" in stages and stages[-1] == "committing"
        tree = hub.tree("team/tiny-4bit")
        for path in out.iterdir():
            if path.name != "quant_report.json":
                assert (tree / path.name).read_bytes() == path.read_bytes(), path.name
        local = json.loads((out / "quant_report.json").read_text())
        public = json.loads((tree / "quant_report.json").read_text())
        assert local["model"] == str(tiny_model) and public["model"] == tiny_model.name
        card = (tree / "README.md").read_text()
        assert "base_model" not in card and "\n\nA local llama model quantized to 4 bits" in card
        assert str(tmp_path) not in card + json.dumps(public)

        refused = gptqd("push", str(out), "acme/tiny", env=env)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.splitlines()[-1].startswith("error [hub_access_denied]: the hub "
                                                          "token belongs to gptqd-bot"), refused.stderr
    bad = gptqd("push", str(out), "no-namespace")
    assert bad.returncode == 2 and "repo_id must be 'namespace/name'" in bad.stderr, bad.stderr

