"""Whether a run (or a verification) holds the whole model in memory or reads it block by block.

Streaming (lazyload, lazycheckpoint) needs one block in memory whatever the model's size, and
measures perplexity on the way (streameval). Only greedy samples need the whole model: every
new token runs every block. So a run streams unless it was told not to, or it is asked for
samples and the whole model takes at most WHOLE_MODEL_SHARE of the memory it would live in (the
host's available memory; on a GPU also the card's free memory, where the evaluation runs it).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from worker.gptq.modelio import compute_dtype

WHOLE_MODEL_SHARE = 0.5
STATM = Path("/proc/self/statm")  # the process's mapped size, what RLIMIT_AS counts
CGROUP = Path("/sys/fs/cgroup")  # a container's memory limit (cgroup v2), where there is one
_GIB = 1 << 30


@dataclass(frozen=True)
class Residency:
    stream: bool
    why: str = ""  # why a run asked for samples streams (and so gives none)


def choose(lazy: bool | None, evaluate: Any, shape: nn.Module, compute: torch.device,
           share: float = WHOLE_MODEL_SHARE) -> Residency:
    """shape: the model's skeleton (meta tensors); evaluate: an EvalSpec or None; share: of
    the memory free, what a whole model may take (GPTQD_WHOLE_MODEL_SHARE in the service)."""
    if lazy is not None:
        return Residency(lazy, "lazy loading was asked for" if lazy else "")
    if evaluate is None or not wants_samples(evaluate):
        return Residency(True)
    why = _too_large("the whole model", whole_model_bytes(shape, compute), compute, share)
    return Residency(bool(why), why)


def _too_large(what: str, need: int, device: torch.device, share: float) -> str:
    """Why need bytes cannot be held on device (for samples_skipped), or "" when they fit in
    share of the memory free."""
    room = available_memory(device)
    if need <= share * room:
        return ""
    return (f"{what} ({need / _GIB:.1f} GiB as run on {device.type}) would take more than "
            f"{share:.0%} of the {room / _GIB:.1f} GiB available, so it was read block by block")


def samples_skipped(why: str) -> str:
    """What a streamed run or verification says in place of the samples it was asked for."""
    return f"greedy samples need the whole model: {why}"


def wants_samples(evaluate: Any) -> bool:
    return bool(evaluate.prompts) and evaluate.max_new_tokens > 0


def whole_model_bytes(shape: nn.Module, compute: torch.device) -> int:
    """The loaded model's parameters: fp32 on the CPU, the checkpoint's dtype on a GPU."""
    dtype = compute_dtype(shape.config, compute)
    return sum(p.numel() for p in shape.parameters()) * dtype.itemsize


def available_memory(compute: torch.device) -> int:
    """Bytes free for a whole model: the host's available memory (within the container's
    limit), and on a GPU the less of that and the card's free memory."""
    room = host_available()
    if compute.type == "cuda":
        room = min(room, torch.cuda.mem_get_info(compute)[0])
    return room


def host_available() -> int:
    """The system's available memory, or less where a cgroup v2 limit or this process's
    address-space limit (a worker's GPTQD_JOB_MEMORY_LIMIT_MB) leaves less."""
    room = psutil.virtual_memory().available  # MemAvailable on Linux
    limit, used = _read_int(CGROUP / "memory.max"), _read_int(CGROUP / "memory.current")
    if limit is not None and used is not None:
        room = min(room, max(0, limit - used))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and STATM.is_file():
        mapped = int(STATM.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        room = min(room, max(0, soft - mapped))
    return room


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


@dataclass
class HeldCheckpoint:
    """A stored checkpoint opened to be scored: whole (model) or block by block (lazy)."""

    model: nn.Module
    tokenizer: Any
    lazy: Any = None  # lazycheckpoint.LazyCheckpoint when it is read block by block
    why: str = ""  # why a checkpoint asked for samples is read block by block (so gives none)


def open_checkpoint(path: Path, device: torch.device, share: float = WHOLE_MODEL_SHARE, *,
                    samples: bool = False, trust_remote_code: bool = False) -> HeldCheckpoint:
    """Block by block (lazycheckpoint.py: one block in memory), unless samples are wanted and
    its packed weights take at most share of the memory free (or it cannot be: a quantized
    head); whole, through load_checkpoint, otherwise."""
    from worker.gptq.lazycheckpoint import open_lazy_checkpoint
    from worker.gptq.loader import checkpoint_tokenizer, weight_files

    path = Path(path)
    why = ""
    if samples:
        # packed weights as stored; on the CPU the unquantized ones (fp16) double in fp32
        need = sum(f.stat().st_size for f in weight_files(path)) * (2 if device.type == "cpu" else 1)
        why = _too_large("the checkpoint", need, device, share)
    lazy = open_lazy_checkpoint(path, device, trust_remote_code=trust_remote_code) if (
        why or not samples) else None
    if lazy is None:
        return HeldCheckpoint(*load_checkpoint(path, device, share, trust_remote_code=trust_remote_code))
    return HeldCheckpoint(lazy.model, checkpoint_tokenizer(path, trust_remote_code), lazy, why)


def load_checkpoint(path: Path, device: torch.device, share: float = WHOLE_MODEL_SHARE, *,
                    trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A stored GPTQ checkpoint to verify, (model, tokenizer), on device in the dtype a run
    computes in there: its layers keep their dequantized weights while the whole model takes
    at most share of the memory free, else they dequantize at every forward (slower; only the
    packed weights in memory)."""
    from transformers import AutoConfig

    from worker.gptq.loader import load_quantized
    from worker.gptq.modelio import skeleton

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    shape = skeleton(config, trust_remote_code=trust_remote_code)
    cache = whole_model_bytes(shape, device) <= share * available_memory(device)
    return load_quantized(path, device, compute_dtype(config, device), cache=cache,
                          trust_remote_code=trust_remote_code)
