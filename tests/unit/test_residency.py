"""Whether a run holds the whole model or streams it (worker/gptq/residency.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from worker.gptq import residency
from worker.gptq.evaluate import EvalSpec
from worker.gptq.modelio import skeleton

CPU = torch.device("cpu")
PERPLEXITY_ONLY = EvalSpec("builtin", prompts=())
SAMPLES = EvalSpec("builtin", prompts=("Once",), max_new_tokens=8)


@pytest.fixture
def shape() -> torch.nn.Module:
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128, dtype="float16")
    return skeleton(config)


def test_whole_model_bytes_in_the_dtype_it_runs_in(shape) -> None:
    params = sum(p.numel() for p in shape.parameters())
    assert residency.whole_model_bytes(shape, CPU) == 4 * params  # fp32 on the CPU
    assert residency.whole_model_bytes(shape, torch.device("cuda")) == 2 * params  # as stored


def test_only_samples_on_a_model_that_fits_keep_it_whole(shape, monkeypatch) -> None:
    need = residency.whole_model_bytes(shape, CPU)
    monkeypatch.setattr(residency, "available_memory", lambda compute: 2 * need)
    assert residency.choose(None, None, shape, CPU) == residency.Residency(True)
    assert residency.choose(None, PERPLEXITY_ONLY, shape, CPU) == residency.Residency(True)
    assert residency.choose(None, SAMPLES, shape, CPU) == residency.Residency(False)
    no_tokens = EvalSpec("builtin", prompts=("Once",), max_new_tokens=0)
    assert residency.choose(None, no_tokens, shape, CPU).stream
    assert residency.choose(False, PERPLEXITY_ONLY, shape, CPU) == residency.Residency(False)
    assert residency.choose(True, SAMPLES, shape, CPU) == residency.Residency(True, "lazy loading was asked for")

    monkeypatch.setattr(residency, "available_memory", lambda compute: 2 * need - 1)
    tight = residency.choose(None, SAMPLES, shape, CPU)
    assert tight.stream and "more than 50% of the" in tight.why


def _available(monkeypatch, size: int) -> None:
    """What psutil says the system has available."""
    monkeypatch.setattr(residency.psutil, "virtual_memory", lambda: SimpleNamespace(available=size))


@pytest.mark.parametrize(("limit", "current", "expected"), [
    (None, None, 8 << 30),               # no cgroup files: what psutil says
    ("max", str(1 << 30), 8 << 30),      # no limit set
    (str(3 << 30), str(1 << 30), 2 << 30),  # the container's limit leaves less
    (str(1 << 30), str(2 << 30), 0),     # over its limit: nothing
])
def test_host_memory_is_the_less_of_what_is_available_and_the_cgroup_limit(tmp_path, monkeypatch, limit, current, expected) -> None:
    _available(monkeypatch, 8 << 30)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    if limit is not None:
        (cgroup / "memory.max").write_text(limit + "\n")
        (cgroup / "memory.current").write_text(current + "\n")
    monkeypatch.setattr(residency, "CGROUP", cgroup)
    assert residency.host_available() == expected


def test_an_address_space_limit_leaves_what_is_not_mapped_yet(tmp_path, monkeypatch) -> None:
    """A worker's GPTQD_JOB_MEMORY_LIMIT_MB is an RLIMIT_AS on its job processes: what is
    already mapped counts against it."""
    import os
    import resource

    _available(monkeypatch, 8 << 30)
    monkeypatch.setattr(residency, "CGROUP", tmp_path / "no-cgroup")
    statm = tmp_path / "statm"
    pages = (1 << 30) // os.sysconf("SC_PAGE_SIZE")
    statm.write_text(f"{pages} 100 50 1 0 90 0\n")
    monkeypatch.setattr(residency, "STATM", statm)
    monkeypatch.setattr(residency.resource, "getrlimit",
                        lambda which: (3 << 30, resource.RLIM_INFINITY) if which == resource.RLIMIT_AS else (0, 0))
    assert residency.host_available() == 2 << 30
    monkeypatch.setattr(residency.resource, "getrlimit",
                        lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert residency.host_available() == 8 << 30
