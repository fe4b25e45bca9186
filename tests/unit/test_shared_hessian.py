"""Layers fed the same input tensor (q/k/v, gate/up) share one XᵀX: fewer accumulations,
bit-identical checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.checkpoints import assert_same_checkpoint, tiny_llama
from worker.gptq import pipeline
from worker.gptq.api import quantize
from worker.gptq.config import CalibrationSpec, QuantizeConfig
from worker.gptq.gptq import GPTQ

CALIBRATION = CalibrationSpec("builtin", num_samples=8, seq_length=64)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_shared_hessians_change_nothing_but_the_work(tmp_path: Path, monkeypatch, true_sequential) -> None:
    model = tiny_llama(tmp_path / "m", layers=2)
    config = QuantizeConfig(bits=4, group_size=32, true_sequential=true_sequential)
    calls: list[int] = []
    add_batch = GPTQ.add_batch

    def counting(self, inp):
        calls.append(1)
        add_batch(self, inp)

    monkeypatch.setattr(GPTQ, "add_batch", counting)
    quantize(str(model), tmp_path / "shared", config, CALIBRATION, device="cpu")
    shared = len(calls)
    calls.clear()
    def separate(self, name, solver, x):  # every layer accumulates its own XᵀX, every batch
        solver.add_batch(x)
        return [name]

    monkeypatch.setattr(pipeline._SharedInputs, "add", separate)
    quantize(str(model), tmp_path / "separate", config, CALIBRATION, device="cpu")

    # per block and batch: q,k,v -> 1, o -> 1, gate,up -> 1, down -> 1 accumulations instead of 7
    assert shared * 7 == len(calls) * 4
    assert_same_checkpoint(tmp_path / "shared", tmp_path / "separate")


def test_the_tracker_keeps_no_input_alive() -> None:
    """Between batches the last input would otherwise stay in memory (a whole MLP
    intermediate during the down_proj pass); it is only compared by identity."""
    import gc
    import weakref

    import torch

    shared = pipeline._SharedInputs()
    q, k = GPTQ(torch.zeros(3, 4)), GPTQ(torch.zeros(5, 4))
    x = torch.randn(2, 4)
    assert shared.add("q", q, x) == ["q"]
    assert shared.add("k", k, x) == ["k"]  # the same tensor: k shares q's XᵀX
    assert k.xtx is q.xtx
    seen = weakref.ref(x)
    del x
    gc.collect()
    assert seen() is None
    assert shared.add("q", q, torch.randn(2, 4)) == ["q"]  # a new batch: counted afresh


@pytest.mark.parametrize("true_sequential", [True, False])
def test_layers_sharing_a_hessian_are_solved_as_one_stack(tmp_path: Path, monkeypatch, true_sequential) -> None:
    """One factorisation for q,k,v and one for gate,up: 4 per Llama block instead of 7; the
    report still has one entry per linear, in the order they were solved before."""
    from worker.gptq import gptq

    model = tiny_llama(tmp_path / "m", layers=2)
    config = QuantizeConfig(bits=4, group_size=32, true_sequential=true_sequential)
    factorisations: list[int] = []
    factor = gptq.inverse_hessian_factor

    def counting(*args, **kwargs):
        factorisations.append(1)
        return factor(*args, **kwargs)

    monkeypatch.setattr(gptq, "inverse_hessian_factor", counting)
    report = quantize(str(model), tmp_path / "out", config, CALIBRATION, device="cpu")
    assert len(factorisations) == 2 * 4
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [(m["block"], m["module"]) for m in report.modules] == [(b, n) for b in (1, 2) for n in names]
    q, k = report.modules[0], report.modules[1]
    assert q["damp_percent"] == k["damp_percent"] and q["nsamples"] == k["nsamples"]
    assert q["out_features"] == 64 and k["out_features"] == 32 and q["loss"] != k["loss"]
