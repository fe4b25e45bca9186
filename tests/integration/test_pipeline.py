"""The block-by-block GPTQ pipeline on tiny models of every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import fixture_path
from tests.tiny_models import CONFIGS, VOCAB, tiny_model
from worker.gptq.arch import get_arch, get_weight, set_weight, validate_layers
from worker.gptq.calibration import build_calibration
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.gptq import LayerQuantResult, rtn_quantize
from worker.gptq.pipeline import capture_inputs, quantize_model, run_block
from worker.gptq.progress import Cancelled, ProgressEvent


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    """32 distinct windows of real English (the built-in source, character tokenizer, ids < 105)."""
    tokenizer = AutoTokenizer.from_pretrained(fixture_path("models", "babyllama-tok105"))
    ids = build_calibration(tokenizer, CalibrationSpec("builtin", num_samples=32, seq_length=64))
    assert int(ids.max()) < VOCAB
    return ids


@pytest.fixture(scope="module")
def calib(windows: torch.Tensor) -> torch.Tensor:
    return windows[:16]


@pytest.fixture(scope="module")
def held_out(windows: torch.Tensor) -> torch.Tensor:
    return windows[16:]


@torch.no_grad()
def kl_to(reference: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    ref = torch.log_softmax(reference(ids).logits.float(), -1)
    out = torch.log_softmax(model(ids).logits.float(), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def on_grid(layer: LayerQuantResult, maxq: int) -> torch.Tensor:
    """The weight the checkpoint describes: scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])."""
    assert int(layer.codes.min()) >= 0 and int(layer.codes.max()) <= maxq
    g = layer.g_idx.long()
    return layer.scales[g].t() * (layer.codes.float() - layer.zeros[g].t().float())


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_capture_replays_what_the_model_feeds_each_block(model_type: str) -> None:
    model = tiny_model(model_type)
    arch = get_arch(model)
    ids = torch.randint(0, VOCAB, (6, 40), generator=torch.Generator().manual_seed(1))
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        block.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, []).append(out))
        for i, block in enumerate(arch.blocks(model))
    ]
    with torch.no_grad():
        model(ids)
        for hook in hooks:
            hook.remove()
        hidden, calls = capture_inputs(model, arch, ids.split(4), torch.device("cpu"))
        for index, block in enumerate(arch.blocks(model)):
            hidden = run_block(block, hidden, calls[index])
            expected = seen[index][0]
            expected = expected[0] if isinstance(expected, tuple) else expected
            torch.testing.assert_close(torch.cat(hidden), expected, rtol=0, atol=1e-6)
    assert all("forward" not in vars(block) for block in arch.blocks(model))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_block_linear_is_quantized_onto_its_grid(model_type, calib, held_out) -> None:
    original = tiny_model(model_type)
    model = copy.deepcopy(original)
    arch = get_arch(model)
    config = QuantizeConfig(bits=4, group_size=32)
    names = validate_layers(model, arch, config)
    events: list[ProgressEvent] = []

    result = quantize_model(model, calib, config, progress=events.append, batch_size=6)

    assert list(result.layers) == names  # every block linear, in true-sequential order
    assert [m.name for m in result.modules] == names
    for name, layer in result.layers.items():
        weight = get_weight(model.get_submodule(name))
        assert layer.weight.shape == weight.shape  # [out, in] even for GPT-2's Conv1D
        assert torch.equal(weight, layer.weight)
        torch.testing.assert_close(weight, on_grid(layer, config.maxq), rtol=0, atol=1e-6)
        assert not torch.equal(weight, get_weight(original.get_submodule(name)))
        assert layer.nsamples == calib.numel()
    quantized = set(names)
    for name, param in original.named_parameters():
        if not any(name.startswith(q + ".") for q in quantized):
            assert torch.equal(param, model.get_parameter(name)), name  # embeddings, norms, head

    n = result.num_blocks
    assert n == 2 and all(e.stage == "quantizing" and e.num_blocks == n for e in events)
    blocks = [e.block for e in events]
    assert blocks == sorted(blocks) and set(blocks) == {1, 2}
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert [e.message for e in events if not e.module] == [
        "block 1/2", "block 1/2 done", "block 2/2", "block 2/2 done"
    ]
    per_module = [e for e in events if e.module]
    assert [(e.block, e.module) for e in per_module] == [(m.block, m.module) for m in result.modules]
    assert all(e.loss is not None and e.loss >= 0 and e.damp == 0.01 for e in per_module)
    assert all(e.eta_seconds is not None and e.eta_seconds >= 0 for e in events[1:])
    assert events[-1].eta_seconds == 0.0
    assert set(result.stage_seconds) == {"capture", "forward", "hessian", "solve"}
    assert result.stage_seconds["solve"] > 0 and result.stage_seconds["forward"] > 0

    kl = kl_to(original, model, held_out)
    assert 0 < kl < 2e-3, kl  # 4-bit g32 stays close to the original


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_on_llama(bits: int, calib, held_out) -> None:
    original = tiny_model("llama")
    config = QuantizeConfig(bits=bits, group_size=32)
    gptq = copy.deepcopy(original)
    quantize_model(gptq, calib, config)
    rtn = copy.deepcopy(original)
    arch = get_arch(rtn)
    for index, block in enumerate(arch.blocks(rtn)):
        for module in arch.block_linears(block, index).values():
            set_weight(module, rtn_quantize(get_weight(module), config).weight)
    kl_gptq, kl_rtn = kl_to(original, gptq, held_out), kl_to(original, rtn, held_out)
    # measured: 3-bit 1.2e-4 vs 4.1e-4, 4-bit 2.9e-5 vs 8.9e-5 (about 3x)
    assert kl_gptq < 0.6 * kl_rtn, (kl_gptq, kl_rtn)


def test_act_order_asym_not_sequential_stays_on_the_grid(calib) -> None:
    model = tiny_model("llama")
    config = QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True, true_sequential=False)
    result = quantize_model(model, calib, config)
    permuted = 0
    for name, layer in result.layers.items():
        torch.testing.assert_close(
            get_weight(model.get_submodule(name)), on_grid(layer, config.maxq), rtol=0, atol=1e-6
        )
        permuted += int(not torch.equal(layer.g_idx, torch.sort(layer.g_idx).values))
    assert permuted > 0  # act-order really reordered the groups somewhere


def test_should_stop_cancels_between_modules(calib) -> None:
    model = tiny_model("gpt2")
    arch = get_arch(model)
    events: list[ProgressEvent] = []
    checks = iter(range(100))

    def should_stop() -> bool:
        return next(checks) >= 5

    with pytest.raises(Cancelled, match="cancelled at block 1/2"):
        quantize_model(model, calib, QuantizeConfig(), progress=events.append, should_stop=should_stop)
    solved = [e for e in events if e.module]
    assert 0 < len(solved) < len(arch.module_names)
    # the model is left usable: blocks are back in place with their own forward
    assert all("forward" not in vars(block) for block in arch.blocks(model))
    with torch.no_grad():
        assert model(calib[:2]).logits.shape == (2, 64, VOCAB)


def test_half_precision_model_is_solved_in_fp32_and_kept_in_its_dtype(calib, held_out) -> None:
    original = tiny_model("llama", torch.bfloat16)
    model = copy.deepcopy(original)
    result = quantize_model(model, calib, QuantizeConfig(bits=4, group_size=32))
    for name, layer in result.layers.items():
        module = model.get_submodule(name)
        assert module.weight.dtype == torch.bfloat16
        assert layer.weight.dtype == torch.float32
        torch.testing.assert_close(module.weight.float(), layer.weight.to(torch.bfloat16).float())
    assert kl_to(original, model, held_out) < 5e-3


@pytest.mark.fixtures
def test_gptq_beats_rtn_on_a_trained_llama() -> None:
    """Regression check on real weights: babyllama-tok105, 4-bit g32, TinyStories text
    (calibration and evaluation from different files), without the clipping search (on by
    default), which improves RTN as much as GPTQ, so the check stays on GPTQ's own error
    feedback. Margin on KL to the original, the finer measure: perplexity moves with float noise
    (GPTQ 2.442 with one thread, 2.478 with two; RTN 2.534, original 2.397) where the KL ratio
    stays 0.38-0.40."""
    from worker.gptq.evaluate import (
        agreement,
        eval_windows,
        load_texts,
        rtn_quantize_model,
        window_perplexity,
    )
    from worker.gptq.modelio import load_model

    loaded = load_model(str(fixture_path("models", "babyllama-tok105")))
    calibration = CalibrationSpec(
        str(fixture_path("tinystories", "tinystories_sample_cs336.txt")), num_samples=24, seq_length=128
    )
    calib_ids = build_calibration(loaded.tokenizer, calibration)
    held = load_texts(str(fixture_path("tinystories", "tinystories_valid_excerpt.txt")))
    windows = eval_windows(loaded.tokenizer, held, 128, 16)
    config = QuantizeConfig(bits=4, group_size=32, mse=False)
    original = loaded.model
    rtn, gptq = copy.deepcopy(original), copy.deepcopy(original)
    rtn_quantize_model(rtn, config)
    quantize_model(gptq, calib_ids, config)
    ppl = [window_perplexity(m, windows) for m in (original, gptq, rtn)]
    assert ppl[0] < ppl[1] < ppl[2], ppl
    kl_gptq, kl_rtn = agreement(original, gptq, windows)["kl"], agreement(original, rtn, windows)["kl"]
    assert kl_gptq < 0.6 * kl_rtn, (kl_gptq, kl_rtn)
