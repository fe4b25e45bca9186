"""The perplexity protocol, agreement and text loading of worker.gptq.evaluate."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from worker.gptq.evaluate import EvalSpec, agreement, eval_windows, load_texts, perplexity


class CharTokenizer:
    """One id per byte: enough to check windowing without a trained tokenizer."""

    def __call__(self, text, add_special_tokens=False, verbose=False, return_tensors=None):
        return {"input_ids": list(text.encode())}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_windows_join_with_blank_lines_and_drop_the_tail():
    windows = eval_windows(CharTokenizer(), ["abc", "de"], seq_length=3)
    assert windows.tolist() == [list(b"abc"), list(b"\n\nd")]  # "e" is the dropped tail
    assert eval_windows(CharTokenizer(), "x" * 100, 10, max_windows=4).shape == (4, 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(CharTokenizer(), "short", 64)


def test_perplexity_is_exp_mean_nll_of_independent_windows():
    model = tiny_llama()
    text = "The quick brown fox jumps over the lazy dog. " * 4
    windows = eval_windows(CharTokenizer(), text, 16)
    with torch.no_grad():
        nll = [
            F.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum").item()
            for w in windows
        ]
    expected = math.exp(sum(nll) / (windows.shape[0] * 15))
    assert perplexity(model, CharTokenizer(), text, 16, batch_size=3) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="context length 64"):
        perplexity(model, CharTokenizer(), text, 128)


def test_agreement_of_a_model_with_itself_and_with_another():
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    same = agreement(tiny_llama(), tiny_llama(), ids)
    assert same["top1"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    other = agreement(tiny_llama(), tiny_llama(seed=1), ids)
    assert other["top1"] < 0.5 and other["kl"] > 0.01


def test_load_texts_keeps_a_txt_file_as_it_is(tmp_path):
    raw = " = Title = \n \n Body line .\n"
    (tmp_path / "a.txt").write_text(raw)
    assert load_texts(str(tmp_path / "a.txt")) == [raw]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"t": t}) for t in ["one", "", "two"]))
    assert load_texts(str(tmp_path / "b.jsonl"), "t") == ["one", "", "two"]
    with pytest.raises(Exception, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))


def test_eval_spec_validation():
    with pytest.raises(ValueError, match="max_windows"):
        EvalSpec(source="builtin", max_windows=0)
    with pytest.raises(ValueError, match="seq_length"):
        EvalSpec(source="builtin", seq_length=1)


def test_a_large_vocabulary_scores_fewer_windows_per_forward(monkeypatch):
    """The logits of one forward stay within LOGITS_BYTES (a 128k vocabulary would otherwise
    need GBs beside the model); the perplexity does not depend on the batching."""
    from worker.gptq import evaluate

    model = tiny_llama()
    windows = torch.randint(0, 256, (7, 16), generator=torch.Generator().manual_seed(0))
    expected = evaluate.window_perplexity(model, windows, batch_size=8)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 2 * 16 * 256 * 4)  # two windows' fp32 logits
    assert evaluate.logits_batch(model, 16) == 2
    assert evaluate.window_perplexity(model, windows) == pytest.approx(expected, rel=1e-6)
    assert seen == [2, 2, 2, 1]
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 1)  # never below one window
    assert evaluate.logits_batch(model, 16) == 1
    assert evaluate.agreement(model, model, windows)["kl"] == pytest.approx(0.0, abs=1e-6)
