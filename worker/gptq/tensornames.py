"""A GPTQ checkpoint's tensors under the names the model's own checkpoints use.

gptqd, like GPTQModel, names a checkpoint's tensors after the modules transformers 5 builds in
memory. For most families those are the names the model's own checkpoints use. Not Mixtral's:
in memory its experts are `mlp.experts.E.{gate,up,down}_proj` (split per expert) and its
router `mlp.gate`, while Mixtral checkpoints, and what transformers itself saves, say
`block_sparse_moe.experts.E.{w1,w3,w2}` and `block_sparse_moe.gate`. vLLM's Mixtral reads only
the latter, GPTQModel 7.6.0 only the former, so no one checkpoint serves both:
write_with_original_names makes a copy for vLLM (`gptqd original-names`), and our loaders read
either (in_memory_names). The table is the arch's (MoeLayout.file_names, named_in_files).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from safetensors import safe_open

from .arch import MoeLayout, get_arch
from .config import QuantizeConfig
from .errors import EngineError, InvalidCheckpoint, UnsupportedArchitecture
from .lazyload import INDEX_FILE
from .stwriter import DTYPE_OF, TensorSpec, write_safetensors

T = TypeVar("T")


def renaming(model_type: str | None) -> MoeLayout | None:
    """The layout whose file names this model type's checkpoints use, or None (its
    checkpoints use the in-memory names)."""
    try:
        moe = get_arch(model_type or "").moe
    except UnsupportedArchitecture:
        return None
    return moe if moe is not None and model_type in moe.named_in_files else None


def tensor_namer(config: QuantizeConfig, model_type: str | None) -> Callable[[str], str]:
    """How a checkpoint written with config names a tensor given its module's name."""
    moe = renaming(model_type) if config.tensor_names == "original" else None
    return _unchanged if moe is None else moe.as_in_files


def _unchanged(name: str) -> str:
    return name


def in_memory_names(tensors: Mapping[str, T], model_type: str | None) -> dict[str, T]:
    """A checkpoint's tensors by the names of the modules they belong to (either naming)."""
    moe = renaming(model_type)
    return dict(tensors) if moe is None else {moe.as_in_memory(k): v for k, v in tensors.items()}


def write_with_original_names(checkpoint: Path, out: Path) -> int:
    """Copy a GPTQ checkpoint to out (which must not exist) with its tensors named as the
    model's own checkpoints name them; returns how many names changed. Written tensor by
    tensor, into out's .partial directory first."""
    # (imported here: export and loader name tensors through this module)
    from .export import partial_dir, publish_atomically
    from .loader import weight_files

    checkpoint, out = Path(checkpoint), Path(out)
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        raise InvalidCheckpoint(f"{checkpoint} has no config.json: not a checkpoint directory")
    config = json.loads(config_file.read_text())
    if "quantization_config" not in config:
        raise InvalidCheckpoint(f"{checkpoint} is not a GPTQ checkpoint (no quantization_config)")
    moe = renaming(config.get("model_type"))
    if moe is None:
        raise EngineError(f"{config.get('model_type')!r} checkpoints use the module names gptqd "
                          "writes: nothing to rename")
    if out.exists():
        raise EngineError(f"{out} already exists; choose a new directory")
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=lambda _, names: [n for n in names if _is_weights(n)])
    try:
        renamed = 0
        for file in weight_files(checkpoint):
            renamed += _copy_renamed(file, tmp / file.name, moe.as_in_files)
        index = checkpoint / INDEX_FILE
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {moe.as_in_files(k): v for k, v in data["weight_map"].items()}
            (tmp / INDEX_FILE).write_text(json.dumps(data, indent=2) + "\n")
        publish_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written copy left behind
        raise
    return renamed


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX_FILE


def _copy_renamed(src: Path, dst: Path, rename: Callable[[str], str]) -> int:
    with safe_open(str(src), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        specs = {}
        for key in keys:
            view = f.get_slice(key)
            specs[rename(key)] = TensorSpec(DTYPE_OF[view.get_dtype()], tuple(view.get_shape()))
        write_safetensors(dst, specs, ((rename(k), f.get_tensor(k)) for k in keys),
                          metadata=f.metadata())
    return sum(rename(k) != k for k in keys)

