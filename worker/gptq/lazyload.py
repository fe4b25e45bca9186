"""A model whose weights are read from its safetensors files one block at a time.

The model is built with every parameter on the meta device (buffers such as rotary tables are
real: they are computed, not stored). Embeddings, final norm and head are read once; a decoder
block is read just before it is quantized and returned to meta once its checkpoint tensors are
on disk. Each read opens the file, copies the tensors out and closes it again, so the
memory-mapped pages of blocks already done do not stay mapped (and counted in the RSS).

With read_ahead (on a GPU), the next block's tensors are read by a thread while the current
block is solved: the card does not wait on the disk between blocks, for the price of one more
block's stored weights in host memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from worker.gptq.arch import ArchSpec
from worker.gptq.experts import unfuse_experts

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightFiles:
    """Which safetensors file of a checkpoint directory holds each tensor."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {key: self.directory / name for key, name in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            path = self.directory / SINGLE_FILE
            with safe_open(path, framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), path)
        else:
            raise FileNotFoundError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}")

    @staticmethod
    def present(directory: Path) -> bool:
        directory = Path(directory)
        return (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors, each file opened once and closed (unmapped) before returning."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        return out


class ReadAhead:
    """One read of a block's tensors at a time, in a thread; take() waits for it."""

    def __init__(self, files: WeightFiles) -> None:
        self.files = files
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[dict[str, torch.Tensor]]] | None = None

    def start(self, index: int, keys: list[str]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptqd-readahead")
        self.drop()
        self._pending = (index, self._pool.submit(self.files.read, keys))

    def take(self, index: int) -> dict[str, torch.Tensor] | None:
        """Block index's tensors if they are the ones read ahead (the read's error, if it
        failed), else None."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != index:
            return None
        return pending[1].result()

    def drop(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()  # a read under way finishes; its tensors are let go

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class LazyModel:
    """The model skeleton plus where its weights live; materialises parts on demand."""

    def __init__(
        self, model: nn.Module, files: WeightFiles, arch: ArchSpec, dtype: torch.dtype,
        read_ahead: bool = False,
    ) -> None:
        self.model, self.files, self.arch, self.dtype = model, files, arch, dtype
        self.ahead = ReadAhead(files) if read_ahead else None
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._strip = prefix + "." if prefix else None
        self._tied = tied_keys(model)

    def key_of(self, name: str) -> str | None:
        """The file key of a parameter: its own name, or without the base model prefix; for
        experts, also as the family's files name them (MoeLayout.file_names)."""
        for candidate in dict.fromkeys((name, self._as_in_files(name))):  # once if the same
            if candidate in self.files.where:
                return candidate
            if self._strip and candidate.startswith(self._strip) and candidate[len(self._strip):] in self.files.where:
                return candidate[len(self._strip):]
        return None

    def _as_in_files(self, name: str) -> str:
        return self.arch.moe.as_in_files(name) if self.arch.moe is not None else name

    def missing(self) -> list[str]:
        """Parameters neither in the files nor tied to one that is (lazy loading cannot work)."""
        return [
            name for name, _ in self.model.named_parameters(remove_duplicate=False)
            if self.key_of(name) is None and name not in self._tied
        ]

    def load_outside_blocks(self, head: bool = False) -> None:
        """What the capture of block 0's inputs runs: everything not in a decoder block except
        the output head (capture stops at the last block; the head is read again at export),
        unless the head is tied to the embeddings or asked for (to score the last block's
        outputs); then re-tie weights."""
        prefix = self.arch.blocks_path + "."
        skipped = None if head else self._untied_head()
        self._load(self.model, "", skip=lambda name: name.startswith(prefix)
                   or (skipped is not None and name.startswith(skipped + ".")))
        if self._tied:
            self.model.tie_weights()

    def _untied_head(self) -> str | None:
        """The output head's module name, if it has a weight of its own in the files."""
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if head is None:
            return None
        name = next((n for n, m in self.model.named_modules() if m is head), None)
        return name if name is not None and f"{name}.weight" not in self._tied else None

    def release_outside_blocks(self) -> None:
        """Embeddings, norms, head back to meta (the checkpoint reads them from the files)."""
        inside = {id(p) for block in self.arch.blocks(self.model) for p in block.parameters()}
        release(self.model, keep=inside)

    def outside_tensors(self, dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
        """Readers of the stored tensors outside the blocks, by state-dict name, floats in dtype
        (the same values the loaded model would give: fp16/bf16 -> fp32 -> dtype is exact)."""
        prefix = self.arch.blocks_path + "."
        readers: dict[str, Callable[[], torch.Tensor]] = {}
        for name in self.model.state_dict():
            key = self.key_of(name)
            if name.startswith(prefix) or key is None or name in self._tied:
                continue

            def read(key: str = key) -> torch.Tensor:
                tensor = self.files.read([key])[key]
                return tensor.to(dtype) if tensor.is_floating_point() else tensor

            readers[name] = read
        return readers

    def block_keys(self, index: int, block: nn.Module) -> list[str]:
        """The file keys of a block's stored tensors (what load_block reads)."""
        return [key for _, _, key, _ in self._slots(block, self.arch.block_prefix(index) + ".")]

    def load_block(
        self, index: int, block: nn.Module, as_stored: Collection[str] = (),
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """as_stored: parameter names (relative to the block) kept in the files' dtype.
        tensors: the block's tensors as files.read(block_keys()) gave them, if read already."""
        prefix = self.arch.block_prefix(index) + "."
        if tensors is None and self.ahead is not None:
            tensors = self.ahead.take(index)
        self._load(block, prefix, keep={prefix + name for name in as_stored}, tensors=tensors)
        blocks = self.arch.blocks(self.model)
        if self.ahead is not None and index + 1 < len(blocks):
            self.ahead.start(index + 1, self.block_keys(index + 1, blocks[index + 1]))

    def close(self) -> None:
        """No read left under way (the run ended, finished or not)."""
        if self.ahead is not None:
            self.ahead.close()

    def _load(
        self, root: nn.Module, prefix: str, skip: Any = None, keep: Collection[str] = (),
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        slots = self._slots(root, prefix, skip)
        if tensors is None:
            tensors = self.files.read([key for _, _, key, _ in slots])
        for store, attr, key, name in slots:
            tensor = tensors.pop(key)
            if tensor.is_floating_point() and name not in keep:
                tensor = tensor.to(self.dtype)
            is_param = isinstance(store[attr], nn.Parameter)
            store[attr] = nn.Parameter(tensor, requires_grad=False) if is_param else tensor

    def _slots(self, root: nn.Module, prefix: str, skip: Any = None) -> list[tuple[dict, str, str, str]]:
        """(store, attribute, file key, name) of each tensor under root the files hold."""
        slots = []
        for module_name, module in root.named_modules(prefix=prefix.rstrip(".")):
            # parameters, and buffers the checkpoint stores (computed ones are already real)
            for store in (module._parameters, module._buffers):
                for attr, tensor in store.items():
                    name = f"{module_name}.{attr}" if module_name else attr
                    if tensor is None or (skip is not None and skip(name)):
                        continue
                    key = self.key_of(name)
                    if key is None:
                        continue  # a tied weight (set by tie_weights()) or a computed buffer
                    slots.append((store, attr, key, name))
        return slots


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is another's (lm_head.weight tied to the embeddings)."""
    tied = getattr(model, "get_expanded_tied_weights_keys", None)
    return set(tied(all_submodels=True)) if tied is not None else set()


def release(module: nn.Module, keep: Collection[int] = ()) -> None:
    """Return a module's parameters to the meta device (their memory is freed), except those
    whose id() is in keep; a parameter shared by several modules (tied) stays one parameter."""
    on_meta: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for attr, param in sub._parameters.items():
            if param is None or param.device.type == "meta" or id(param) in keep:
                continue
            if id(param) not in on_meta:
                on_meta[id(param)] = nn.Parameter(param.data.to("meta"), requires_grad=False)
            sub._parameters[attr] = on_meta[id(param)]


def meta_model(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The model built with every parameter on the meta device (buffers real), in eval mode,
    a mixture's experts one linear per expert as checkpoints store them (transformers fuses
    them in memory)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    unfuse_experts(model)  # (none in a dense model)
    return model.eval()


def open_lazy(
    directory: Path, config: Any, arch: ArchSpec, dtype: torch.dtype, *,
    trust_remote_code: bool = False, read_ahead: bool = False,
) -> tuple[LazyModel | None, str]:
    """A LazyModel for a local checkpoint directory, or None and the reason it cannot be one."""
    from transformers import GenerationConfig

    directory = Path(directory)
    if not directory.is_dir():
        return None, "the model is not a local directory"
    if not WeightFiles.present(directory):
        return None, "the model directory has no safetensors weights"
    model = meta_model(config, trust_remote_code=trust_remote_code)
    lazy = LazyModel(model, WeightFiles(directory), arch, dtype, read_ahead=read_ahead)
    missing = lazy.missing()
    if missing:
        return None, f"weights not found in the safetensors files: {', '.join(missing[:3])}"
    if (directory / "generation_config.json").is_file():
        # what from_pretrained does: the directory's generation config, not one from the config
        model.generation_config = GenerationConfig.from_pretrained(directory)
    lazy.load_outside_blocks()
    return lazy, ""
