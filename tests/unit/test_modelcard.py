"""The model card a publication writes, from a quantization report: metadata the hub reads
(valid YAML, base_model only for a hub model), the settings, what was lost (only what the run
measured), and a report made public without the server's paths."""

from __future__ import annotations

import yaml

from worker.gptq.modelcard import model_card, public_report

REPORT = {
    "model": "/srv/gptqd/models/llama-local", "model_type": "llama",
    "out_dir": "/srv/gptqd/artifacts/job_1.1.partial",
    "config": {"bits": 3, "group_size": -1, "sym": False, "desc_act": True,
               "damp_percent": 0.05, "block_size": 128},
    "calibration": {"source": "/srv/gptqd/datasets/ds_1.jsonl", "num_samples": 128,
                    "seq_length": 2048, "seed": 7},
    "evaluation": {"source": "Salesforce/wikitext", "windows": 40, "seq_length": 2048,
                   "held_out": True},
    "perplexity_before": 6.125, "perplexity_after": 6.4321,
    "kl_divergence": 0.04567, "top1_agreement": 0.91234,
    "sizes": {"original_bytes": 16_060_000_000, "checkpoint_bytes": 4_500_000_000},
    "modules": [{"module": "model.layers.0.mlp.down_proj", "loss": 0.5},
                {"module": "model.layers.3.self_attn.q_proj", "loss": 2.0},
                {"module": "model.layers.1.mlp.up_proj", "loss": None}],
    "versions": {"gptqd": "0.1.0"},
}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_hub_models_card_names_its_base_and_what_it_lost() -> None:
    card = model_card(public_report(REPORT), "team/llama-gptq", "meta-llama/Llama-3.1-8B")
    meta = front_matter(card)
    assert meta == {"base_model": "meta-llama/Llama-3.1-8B", "base_model_relation": "quantized",
                    "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["gptq", "3-bit", "gptqd"]}
    assert "quantized to 3 bits (per channel)" in card and "by gptqd 0.1.0." in card
    assert "| desc_act | true |" in card and "| sym | false |" in card
    assert "block_size" not in card  # an engine detail, not a setting a reader weighs
    assert "| original | 6.125 |" in card and "| this checkpoint | 6.432 |" in card
    assert "+5.01% perplexity" in card and "40 windows of 2048 tokens" in card
    assert "the original's at 91.2% of positions" in card and "0.0457 nats per token" in card
    assert "Size: 4.5 GB (the original weights: 16.1 GB)" in card
    # the layers with a loss: the largest named
    assert "over 2 layers: mean 1.25, largest 2 (model.layers.3.self_attn.q_proj)" in card
    assert 'from_pretrained("team/llama-gptq"' in card and "vllm serve team/llama-gptq" in card
    assert "/srv/" not in card  # no server path in public


def test_a_local_models_card_cites_no_base_and_leaves_out_what_was_not_measured() -> None:
    report = {k: v for k, v in REPORT.items()
              if k not in ("perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement",
                           "evaluation", "modules")}
    card = model_card(public_report(report), "me/local-gptq", None)
    assert "base_model" not in front_matter(card)
    assert "\n\nA local llama model quantized to 3 bits" in card
    assert "What quantization lost" not in card and "GPTQ loss" not in card
    assert "nats per token" not in card
    assert "Calibrated on 128 windows of 2048 tokens from ds_1.jsonl (seed 7)." in card


def test_the_public_report_keeps_everything_but_server_paths() -> None:
    public = public_report(REPORT)
    assert "out_dir" not in public and public["model"] == "llama-local"
    assert public["calibration"]["source"] == "ds_1.jsonl"
    assert public["evaluation"]["source"] == "Salesforce/wikitext"  # a hub id stays
    assert public["modules"] == REPORT["modules"] and public["config"] == REPORT["config"]
    assert public_report(public) == public  # nothing left to hide: a hub model's is unchanged


def test_a_card_with_per_layer_rules_lists_them_and_how_to_load_it() -> None:
    rules = {r"-:model\.layers\.0\.self_attn\.o_proj$": {}, r"+:.*\.mlp\.down_proj": {"bits": 8}}
    report = {**REPORT, "config": {**REPORT["config"], "bits": 4, "group_size": 128, "dynamic": rules}}
    card = model_card(public_report(report), "team/llama-mixed", None)
    assert "quantized to 4 bits (group size 128, some layers otherwise: below)" in card
    assert r"| `+:.*\.mlp\.down_proj` | bits 8 |" in card
    assert r"| `-:model\.layers\.0\.self_attn\.o_proj$` | unquantized |" in card
    # transformers refuses such a checkpoint: the card shows GPTQModel's loader instead
    assert 'GPTQModel.load("team/llama-mixed")' in card and "from_pretrained" in card
    assert 'AutoModelForCausalLM.from_pretrained("team/llama-mixed"' not in card
    assert "vllm serve team/llama-mixed\n" in card  # 4 and 8 bits, group 128: Marlin runs them
    three = {**report, "config": {**report["config"], "dynamic": {".*(k|v)_proj": {"bits": 3}}}}
    card = model_card(three, "team/llama-mixed", None)
    assert "vllm serve team/llama-mixed --quantization gptq" in card
    assert r"| `.*(k\|v)_proj` | bits 3 |" in card  # the table's cell survives the regex's |
