"""`gptqd quantize` and `gptqd eval`: the engine from the command line, no server needed.

Argument errors exit with code 2 and a usage message naming the option; engine errors (model
not found, calibration too short, layer sizes that cannot be packed...) exit with code 1 and
one line `error [code]: message`. Neither prints a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import typer

from app.commands.common import DYNAMIC_HELP, agreement_lines, published, rules_option, sample_lines

T = TypeVar("T")


class TensorNames(StrEnum):
    """--tensor-names: QuantizeConfig.tensor_names."""

    module = "module"
    original = "original"


class Load(StrEnum):
    """--load: how `gptqd quantize` holds the model."""

    auto = "auto"
    whole = "whole"
    stream = "stream"


LOAD_MODES = {Load.auto: None, Load.whole: False, Load.stream: True}  # api.quantize's lazy

# options whose values the engine's config classes validate: field name -> option
_FIELD_OPTIONS = {
    "bits": "--bits",
    "group_size": "--group-size",
    "damp_percent": "--damp-percent",
    "dynamic": "--dynamic",
    "num_samples": "--num-samples",
    "seq_length": "--seq-length",
    "eval seq_length": "--seq-length",
    "eval max_windows": "--eval-max-windows",
    "eval source": "--eval-text",
}


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
    app.command("eval")(evaluate)
    app.command("original-names")(original_names)
    app.command("push")(push)


def _build(make: Callable[[], T]) -> T:
    """Construct an engine config; its ValueError becomes a usage error naming the option."""
    try:
        return make()
    except ValueError as exc:
        message = str(exc)
        hint = next(
            (opt for field, opt in sorted(_FIELD_OPTIONS.items(), key=lambda kv: -len(kv[0]))
             if message.startswith(field + " ")),
            None,
        )
        raise typer.BadParameter(message, param_hint=f"'{hint}'" if hint else None) from exc


def _fail(exc: Exception) -> typer.Exit:
    code = getattr(exc, "code", None)
    prefix = f"error [{code}]" if code else "error"
    typer.echo(f"{prefix}: {getattr(exc, 'message', None) or exc}", err=True)
    return typer.Exit(1)


class ProgressBar:
    """Engine ProgressEvents shown as a live tqdm bar (stage, block i/n, module, loss, ETA).

    When stderr is not a terminal (logs, CI, pipes) each event is one plain line instead.
    """

    STEPS = 1000

    def __init__(self, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=self.STEPS,
            disable=not self.live,
            file=sys.stderr,
            # a list postfix is shown as is; a str one would get tqdm's ", " prefix
            bar_format="{desc:<12}{percentage:3.0f}%|{bar:24}| {postfix[0]}",
            postfix=[""],
            dynamic_ncols=True,
            mininterval=0.2,
        )

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        status = describe(event)
        if not self.live:
            typer.echo(f"{event.stage:<11} {event.fraction:4.0%}  {status}", err=True)
            return
        self.bar.set_description_str(event.stage, refresh=False)
        self.bar.postfix[0] = status
        self.bar.update(max(0, round(event.fraction * self.STEPS) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def describe(event: Any) -> str:
    """block i/n | module | loss | elapsed | ETA, for whatever the event carries; outside
    the blocks the engine's message (e.g. a hub download's bytes and time left)."""
    parts = []
    if event.block is not None and event.num_blocks:
        parts.append(f"block {event.block}/{event.num_blocks}")
    elif event.message:
        parts.append(event.message)
    if event.module:
        parts.append(event.module)
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4g}")
    parts.append(f"elapsed {_clock(event.seconds)}")
    if event.eta_seconds is not None:
        parts.append(f"ETA {_clock(event.eta_seconds)}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """The .partial directory to write into; refuses a non-empty out unless overwrite."""
    from worker.gptq.export import partial_dir

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="'--out'")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise typer.BadParameter(
            f"{out} already exists and is not empty (use --overwrite to replace it)",
            param_hint="'--out'",
        )
    tmp = partial_dir(out)
    if tmp.exists():  # left over from an interrupted run
        shutil.rmtree(tmp)
    return tmp


def quantize(
    model: str = typer.Option(..., "--model", help="Hub id (org/name) or local model directory."),
    out: Path = typer.Option(..., "--out", help="Directory for the GPTQ checkpoint."),
    bits: int = typer.Option(4, "--bits", help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(
        128, "--group-size", help="Input columns per scale/zero group; -1 for one per output channel."
    ),
    damp_percent: float = typer.Option(
        0.01, "--damp-percent", help="Hessian damping as a fraction of its mean diagonal."
    ),
    desc_act: bool = typer.Option(False, "--desc-act", help="Act-order: quantize columns by descending Hessian diagonal."),
    asym: bool = typer.Option(False, "--asym", help="Asymmetric quantization (written as format gptq_v2)."),
    static_groups: bool = typer.Option(False, "--static-groups", help="Fix group parameters before act-order."),
    mse: bool = typer.Option(True, "--mse/--no-mse", help="Search a clipping range per group minimising the MSE."),
    act_group_aware: bool = typer.Option(
        True, "--act-group-aware/--no-act-group-aware",
        help="Group-aware reordering: solve whole groups by Hessian importance (g_idx stays static; not with --desc-act).",
    ),
    true_sequential: bool = typer.Option(
        True, "--true-sequential/--no-true-sequential", help="Solve a block's layers in order."
    ),
    tensor_names: TensorNames = typer.Option(
        TensorNames.module, "--tensor-names",
        help="Name the checkpoint's tensors as transformers names the modules (module: what "
             "GPTQModel reads) or as the model's own checkpoints do (original: what vLLM reads "
             "for Mixtral; the same names for the other families).",
    ),
    calibration: str = typer.Option(
        "builtin", "--calibration",
        help="Calibration text: 'builtin', a .txt/.jsonl/.parquet file, or a hub dataset NAME[:CONFIG[:SPLIT]].",
    ),
    text_field: str = typer.Option("text", "--text-field", help="Text column of .jsonl/.parquet/hub sources."),
    num_samples: int = typer.Option(128, "--num-samples", help="Calibration windows."),
    seq_length: int = typer.Option(512, "--seq-length", help="Tokens per calibration (and eval) window."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing the calibration windows."),
    dynamic: str | None = typer.Option(None, "--dynamic", help=DYNAMIC_HELP),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    device: str | None = typer.Option(None, "--device", help="Compute device (default: cuda if present, else cpu)."),
    eval_text: str | None = typer.Option(
        None, "--eval-text", help="Held-out text to measure perplexity before and after."
    ),
    eval_max_windows: int | None = typer.Option(None, "--eval-max-windows", help="Limit the eval windows."),
    load: Load = typer.Option(
        Load.auto, "--load",
        help="Hold the whole model in memory, or stream it block by block (perplexity is "
             "measured either way; sample text needs the whole model). auto: stream whenever "
             "the model has safetensors weights, unless samples are wanted and it fits.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Quantize a causal LM with GPTQ and write a checkpoint the ecosystem loads."""
    from worker.gptq.config import CalibrationSpec, QuantizeConfig

    config = _build(lambda: QuantizeConfig(
        bits=bits, group_size=group_size, sym=not asym, desc_act=desc_act,
        static_groups=static_groups, damp_percent=damp_percent, true_sequential=true_sequential,
        mse=mse, act_group_aware=act_group_aware, tensor_names=tensor_names.value,
        dynamic=rules_option(dynamic) or {},
    ))
    calib = _build(lambda: CalibrationSpec(
        source=calibration, text_field=text_field, num_samples=num_samples,
        seq_length=seq_length, seed=seed,
    ))
    eval_spec = None
    if eval_text is not None:
        from worker.gptq.evaluate import EvalSpec

        eval_spec = _build(lambda: EvalSpec(
            source=eval_text, text_field=text_field, seq_length=seq_length,
            max_windows=eval_max_windows,
        ))
    tmp = _prepare_out(out, overwrite)
    report = _run_engine(
        lambda bar: _quantize(model, tmp, config, calib, eval_spec, revision,
                              trust_remote_code, device, LOAD_MODES[load], bar),
        progress,
        cleanup=tmp,
    )
    from worker.gptq.export import publish_atomically

    publish_atomically(tmp, out, overwrite=overwrite)
    report.out_dir = str(out)
    _print_summary(report, out)


def _quantize(model, out_dir, config, calib, eval_spec, revision, trust_remote_code, device, lazy, bar):
    from worker.gptq import api

    return api.quantize(
        model, out_dir, config, calib, revision=revision, trust_remote_code=trust_remote_code,
        device=device, progress=bar, evaluate=eval_spec, lazy=lazy,
    )


def _run_engine(run: Callable[[Any], T], progress: bool, cleanup: Path | None = None) -> T:
    """Run an engine call with a progress bar; engine errors become one clean line, exit 1."""
    from worker.gptq.errors import EngineError
    from worker.gptq.progress import Cancelled

    bar = ProgressBar(enabled=progress)
    finished = False
    try:
        result = run(bar)
        finished = True
        return result
    except (EngineError, Cancelled, OSError) as exc:
        bar.close()
        raise _fail(exc) from None
    except KeyboardInterrupt:
        bar.close()
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        bar.close()
        if not finished and cleanup is not None and cleanup.exists():
            shutil.rmtree(cleanup, ignore_errors=True)


def _print_summary(report: Any, out: Path) -> None:
    data = report.to_dict()
    typer.echo(f"checkpoint: {out}")
    typer.echo(f"quantized modules: {len(data.get('modules') or [])} in {data.get('num_blocks')} blocks")
    typer.echo(f"time: {data.get('duration_seconds', 0.0):.1f} s")
    rss = (data.get("peak_memory") or {}).get("rss_bytes")
    if rss:
        typer.echo(f"peak RSS: {rss / 2**20:.0f} MiB")
    size = (data.get("sizes") or {}).get("checkpoint_bytes")
    if size:
        typer.echo(f"checkpoint size: {size / 2**20:.2f} MiB")
    typer.echo("model: " + ("read block by block" if data.get("lazy") else "held whole in memory"))
    if data.get("column_kernel"):  # on a GPU: whether the Triton kernel ran, or why not
        typer.echo(f"solver: {data['column_kernel']} column loop on {data.get('device')}")
    for key in ("perplexity_before", "perplexity_after"):
        if data.get(key) is not None:
            typer.echo(f"{key.replace('_', ' ')}: {data[key]:.4f}")
    for line in agreement_lines(data):
        typer.echo(line)
    for line in sample_lines(data.get("evaluation") or {}):
        typer.echo(line)


def evaluate(
    model: str = typer.Option(..., "--model", help="Model directory (original or GPTQ) or hub id."),
    text: str = typer.Option(
        ..., "--text",
        help="Text to score: a file (plain text read as it is, or .jsonl/.parquet rows), "
             "'builtin-heldout' (English text shipped with gptqd), or a hub dataset "
             "NAME[:CONFIG[:SPLIT]].",
    ),
    seq_length: int | None = typer.Option(
        None, "--seq-length", min=2, help="Tokens per window (default: the model's context length)."
    ),
    max_windows: int | None = typer.Option(None, "--max-windows", min=1, help="Score at most this many windows."),
    text_field: str = typer.Option("text", "--text-field", help="Text column of .jsonl/.parquet files."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    device: str | None = typer.Option(
        None, "--device", help="Compute device (default: cuda if present, else cpu; on a GPU the "
                               "model runs in its checkpoint dtype)."),
    reference: str | None = typer.Option(
        None, "--reference",
        help="Another model with the same tokenizer (e.g. the original a checkpoint was made "
             "from): its perplexity too, and how far --model's next-token distributions are "
             "from its own on the same windows (KL divergence, top-1 agreement)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Print the perplexity of an original or a GPTQ-quantized model on a text (and, with
    --reference, how far it is from another model)."""
    result = _run_engine(
        lambda bar: _perplexity(model, text, seq_length, max_windows, text_field, trust_remote_code,
                                device, bar, reference),
        progress,
    )
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"perplexity {result['perplexity']:.4f} ({result['windows']} windows of "
               f"{result['seq_length']} tokens, {_scored(result, model)})")
    if reference is not None:
        typer.echo(f"reference perplexity {result['reference']['perplexity']:.4f} "
                   f"({_scored(result['reference'], reference)})")
        for line in agreement_lines(result, "the reference"):
            typer.echo(line)


def _scored(result: dict, model: str) -> str:
    """'quantized model DIR, read block by block': what was scored, and how."""
    return f"{result['kind']} model {model}{', read block by block' if result['streamed'] else ''}"


def original_names(
    checkpoint: Path = typer.Argument(..., help="A GPTQ checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Where the copy goes (a new directory)."),
) -> None:
    """Copy a GPTQ checkpoint with its tensors named as the model's own checkpoints name them:
    for Mixtral block_sparse_moe.experts.E.w1/w3/w2, what vLLM reads (GPTQModel reads the
    module names gptqd writes; gptqd reads both)."""
    from worker.gptq.tensornames import write_with_original_names

    renamed = _run_engine(lambda _bar: write_with_original_names(checkpoint, out), progress=False)
    typer.echo(f"{out}: a copy of {checkpoint}, {renamed} tensors renamed")


def push(
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="A checkpoint directory written by `gptqd quantize`."),
    repo_id: str = typer.Argument(..., help="The hub repository: namespace/name (created if missing)."),
    public: bool = typer.Option(False, "--public", help="Create the repository public (default: private; an existing one keeps its visibility)."),
    branch: str = typer.Option(None, help="A branch other than main (created if missing)."),
    message: str = typer.Option(None, help="The commit message."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card", help="Write a README.md saying how the model was quantized and what it lost."),
    base_model: str = typer.Option(None, help="The hub id it was quantized from, named in the card (default: the model its report names, when that is a hub id and not a local directory)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the upload's progress on stderr."),
) -> None:
    """Upload a checkpoint to a Hugging Face hub repository in one commit, with a model card
    (with HF_TOKEN, or the token `hf auth login` stored; it needs write access). A server's
    jobs are published with `gptqd publish JOB REPO` instead."""
    from pydantic import ValidationError

    from app.schemas import PublicationIn
    from worker.gptq.hubupload import Destination, publish_checkpoint

    try:  # the server's rules for a repository and a branch
        PublicationIn(repo_id=repo_id, branch=branch)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise typer.BadParameter(error["msg"].removeprefix("Value error, "),
                                 param_hint=f"'{error['loc'][0].upper()}'") from None
    base = base_model if base_model is not None else _hub_model_of(checkpoint)
    to = Destination(repo_id, private=not public, branch=branch, commit_message=message)
    result = _run_engine(lambda bar: publish_checkpoint(
        checkpoint, to, token=None, base_model=base, model_card=model_card, progress=bar),
        progress)
    typer.echo(published(result))


def _hub_model_of(checkpoint: Path) -> str | None:
    """The hub id the checkpoint's report says it was quantized from; None for a local model
    (a path, or a name that is a directory here)."""
    from worker.gptq.export import REPORT_NAME

    try:
        model = str(json.loads((checkpoint / REPORT_NAME).read_text()).get("model") or "")
    except (OSError, ValueError):
        return None  # publish_checkpoint says what is wrong with the checkpoint
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)
    return model if hub_id and not Path(model).expanduser().is_dir() else None


def _perplexity(
    model: str, text: str, seq_length: int | None, max_windows: int | None,
    text_field: str, trust_remote_code: bool, device: str | None = None,
    progress: Callable[[Any], None] | None = None, reference: str | None = None,
) -> dict:
    from worker.gptq.api import (
        COMPARING_STAGE_ENDS,
        SCORING_STAGE_ENDS,
        RunProgress,
        compute_device,
    )
    from worker.gptq.errors import EngineError
    from worker.gptq.evaluate import context_length, eval_windows, load_texts
    from worker.gptq.scoring import (
        IncomparableModels,
        check_same_tokens,
        open_for_scoring,
        score_against,
    )
    from worker.gptq.streameval import perplexity_of

    compute = compute_device(device)
    run = RunProgress(progress, None, COMPARING_STAGE_ENDS if reference else SCORING_STAGE_ENDS)
    texts = load_texts(text, text_field)  # a bad source is refused before the model loads
    with run.stage("loading"):
        opened = open_for_scoring(model, compute, trust_remote_code=trust_remote_code,
                                  on_transfer=run.transfer_reporter(model))
    if opened.tokenizer is None:
        raise EngineError(f"{model} has no tokenizer files")
    loaded, lazy = opened.held.model, opened.held.lazy
    length = seq_length or context_length(loaded) or 512
    limit = context_length(loaded)
    if limit is not None and length > limit:
        raise typer.BadParameter(
            f"{length} exceeds the model's context length {limit}", param_hint="'--seq-length'"
        )
    try:
        windows = eval_windows(opened.tokenizer, texts, length, max_windows)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--text'") from exc
    result: dict[str, Any] = {"windows": int(windows.shape[0]), "seq_length": length,
                              "kind": opened.kind, "streamed": lazy is not None}
    if reference is None:
        with run.stage("evaluating"):
            score = perplexity_of(loaded, lazy, windows, compute,
                                  run.steps("evaluating", "block" if lazy else "batch", with_eta=True))
        return {"perplexity": score, **result}
    # both read before either is scored: a reference that cannot be compared is refused early
    with run.stage("loading", "loading_reference", message=f"reference {reference}"):
        other = open_for_scoring(reference, compute, trust_remote_code=trust_remote_code,
                                 on_transfer=run.transfer_reporter(reference, "loading_reference"))
    try:
        check_same_tokens(model, reference, opened, other, texts, windows)
    except IncomparableModels as exc:
        raise typer.BadParameter(str(exc), param_hint="'--reference'") from exc
    scores = score_against(run, opened.held, other.held, windows, compute, f"reference {reference}")
    return {"perplexity": scores["perplexity"], **result,
            "reference": {"model": reference, "perplexity": scores["reference_perplexity"],
                          "kind": other.kind, "streamed": other.held.lazy is not None},
            "kl_divergence": scores["kl_divergence"], "top1_agreement": scores["top1_agreement"]}
