"""A model card (the README.md of a hub repository) for a GPTQ checkpoint, written from its
quantization report: what it was quantized from and how, what it lost (perplexity before and
after, on which text), how big it is, and how to load it in the runtimes that read the format.
A card states only what the report measured: a figure the run did not take is left out. What a
report may show in public (public_report) is here too: no path of the machine that made it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.gptq.download import size_text

# settings a reader needs to reproduce or judge the checkpoint, in the order shown
SHOWN_SETTINGS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent",
                  "true_sequential", "mse", "act_group_aware")


def model_card(report: dict[str, Any], repo_id: str, base_model: str | None) -> str:
    """The card's markdown, with the hub's metadata header. base_model: the hub id the
    checkpoint was quantized from (None for a local model: the hub checks that it exists)."""
    config = report.get("config") or {}
    bits, group = config.get("bits"), config.get("group_size")
    groups = "per channel" if group == -1 else f"group size {group}"
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["gptq", f"{bits}-bit", "gptqd"]}
    if base_model:
        meta = {"base_model": base_model, "base_model_relation": "quantized", **meta}
    source = _link(base_model) if base_model else f"A local {report.get('model_type', '')} model"
    version = (report.get("versions") or {}).get("gptqd")
    lines = ["---", *_yaml(meta), "---", "",
             f"# {repo_id.split('/', 1)[1]}", "",
             f"{source} quantized to {bits} bits ({groups}"
             f"{', some layers otherwise: below' if config.get('dynamic') else ''}) with GPTQ "
             f"(Frantar et al., 2022) by gptqd{f' {version}' if version else ''}.", ""]
    lines += _settings(config, report.get("calibration") or {})
    lines += _losses(report)
    lines += _usage(repo_id, config)
    return "\n".join(lines) + "\n"


def _yaml(meta: dict[str, Any]) -> list[str]:
    # JSON strings are valid YAML scalars: no quoting rules of our own
    out = []
    for key, value in meta.items():
        if isinstance(value, list):
            out += [f"{key}:", *(f"- {json.dumps(item)}" for item in value)]
        else:
            out.append(f"{key}: {json.dumps(value)}")
    return out


def _text(source: str) -> str:
    return {"builtin": "gptqd's built-in text",
            "builtin-heldout": "gptqd's built-in held-out text"}.get(source, source)


def _link(hub_id: str) -> str:
    return f"[{hub_id}](https://huggingface.co/{hub_id})"


def _settings(config: dict[str, Any], calibration: dict[str, Any]) -> list[str]:
    rows = [f"| {key} | {json.dumps(config[key])} |" for key in SHOWN_SETTINGS if key in config]
    lines = ["## Quantization", "", "| setting | value |", "|---|---|", *rows, ""]
    rules = config.get("dynamic") or {}
    if rules:
        # GPTQModel's syntax; the first rule whose regex matches a layer's name decides
        lines += ["Per-layer rules (`dynamic`; the first whose regex matches a layer's name "
                  "decides, `-:` leaves it unquantized):", "", "| rule | settings |", "|---|---|",
                  *(f"| `{_cell(key)}` | {_rule_settings(value)} |" for key, value in rules.items()), ""]
    if calibration.get("num_samples"):
        where = _text(calibration.get("source") or "the job's text")
        lines += [f"Calibrated on {calibration['num_samples']} windows of "
                  f"{calibration.get('seq_length')} tokens from {where} "
                  f"(seed {calibration.get('seed', 0)}).", ""]
    return lines


def _losses(report: dict[str, Any]) -> list[str]:
    before, after = report.get("perplexity_before"), report.get("perplexity_after")
    lines: list[str] = []
    if before is not None and after is not None:
        ev = report.get("evaluation") or {}
        text = _text(ev.get("source") or "held-out text")
        same = "" if ev.get("held_out", True) else " (the calibration text itself)"
        lines += ["## What quantization lost", "", "| model | perplexity |", "|---|---:|",
                  f"| original | {before:.3f} |", f"| this checkpoint | {after:.3f} |", "",
                  f"Measured on {text}{same}, {ev.get('windows', '?')} windows of "
                  f"{ev.get('seq_length', '?')} tokens: {100 * (after / before - 1):+.2f}% "
                  "perplexity.", ""]
        kl, top1 = report.get("kl_divergence"), report.get("top1_agreement")
        if kl is not None and top1 is not None:
            lines += [f"On the same windows this checkpoint's most likely next token is the "
                      f"original's at {100 * top1:.1f}% of positions, and its next-token "
                      f"distributions are {kl:.3g} nats per token from the original's (mean "
                      "KL divergence): finer measures of what was lost than perplexity.", ""]
    sizes = report.get("sizes") or {}
    if sizes.get("original_bytes") and sizes.get("checkpoint_bytes"):
        lines += [f"Size: {size_text(sizes['checkpoint_bytes'])} "
                  f"(the original weights: {size_text(sizes['original_bytes'])}).", ""]
    losses = [m for m in report.get("modules") or [] if m.get("loss") is not None]
    if losses:
        worst = max(losses, key=lambda m: m["loss"])
        mean = sum(m["loss"] for m in losses) / len(losses)
        lines += [f"GPTQ loss over {len(losses)} layers: mean {mean:.4g}, largest {worst['loss']:.4g} "
                  f"({worst['module']}); every layer's is in `quant_report.json` and "
                  "`quant_log.csv`.", ""]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a regex's alternation would end the table's cell


def _rule_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {json.dumps(v)}" for k, v in settings.items()) or "unquantized"


# vLLM picks Marlin from the checkpoint's own settings, then refuses a layer whose rule Marlin
# cannot run (gptq_marlin TYPE_MAP: 4 and 8 bits; groups -1, 32, 64, 128)
MARLIN_BITS, MARLIN_GROUPS = (4, 8), (-1, 32, 64, 128)


def _vllm_kernel(config: dict[str, Any]) -> str:
    layers = [{**config, **rule} for rule in config["dynamic"].values()]
    off_marlin = any(c.get("bits") not in MARLIN_BITS or c.get("group_size") not in MARLIN_GROUPS
                     for c in layers)
    return " --quantization gptq" if off_marlin else ""


def _usage(repo_id: str, config: dict[str, Any]) -> list[str]:
    if config.get("dynamic"):
        # transformers builds every layer at the config's bits: it refuses the others' tensors
        return ["## Use", "",
                "GPTQModel and vLLM load this checkpoint with its per-layer rules; transformers' "
                "`from_pretrained` ignores them and refuses it:", "",
                "```python", "from gptqmodel import GPTQModel", "",
                f'model = GPTQModel.load("{repo_id}")', "```", "",
                "```bash", f"vllm serve {repo_id}{_vllm_kernel(config)}", "```"]
    return ["## Use", "",
            "The checkpoint is in the GPTQ format that transformers (with GPTQModel "
            "installed), GPTQModel and vLLM load:", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
            "```bash", f"vllm serve {repo_id}", "```"]


def public_source(source: str) -> str:
    """A source as users may see it: a server path shows only its file name."""
    return Path(source).name if source.startswith("/") else source


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The engine's report as anyone may read it: server paths (where it was written, a local
    model's or an uploaded text's path) show only their last name."""
    out = {k: v for k, v in report.items() if k != "out_dir"}
    if "model" in out:
        out["model"] = public_source(str(out["model"]))
    for key in ("calibration", "evaluation"):
        if isinstance(out.get(key), dict) and "source" in out[key]:
            out[key] = {**out[key], "source": public_source(str(out[key]["source"]))}
    return out
