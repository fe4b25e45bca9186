"""A run's work directory: finished blocks on disk, so memory holds one block and a killed run
resumes where it stopped.

After each block (all writes atomic: a temporary file, then a rename):
  block-00003.safetensors  the block's checkpoint tensors, exactly as the checkpoint stores them
  hidden-00004.pt          the next block's input hidden states (computed with quantized weights)
  state.json               the commit point: fingerprint of the run, blocks finished, per-module
                           results (loss, damp, shapes...)
A rerun with the same fingerprint restarts at the first unfinished block from those inputs, so
it computes exactly what the uninterrupted run would have. The final checkpoint copies the
finished blocks' tensors from here (export.save_checkpoint(stored=...)).

A block's files are written by a thread while the next block is worked on (on a GPU the next
block's inputs, 268 MB per TinyLlama block at 128 x 512 tokens, go to the host and the disk
behind its solve): one block in flight at a time, committed in order; a write's error is raised
by the next call that needs the files. A run killed meanwhile resumes after the last committed
block, one block earlier at most.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from worker.gptq.arch import ArchSpec, set_weight
from worker.gptq.compactblock import CompactLinears
from worker.gptq.config import QuantizeConfig
from worker.gptq.gptq import LayerQuantResult
from worker.gptq.lazyload import LazyModel, release
from worker.gptq.memory import trim
from worker.gptq.packing import unpack_qweight, unpack_qzeros
from worker.gptq.pipeline import ModuleReport, Resumed

log = logging.getLogger("gptqd.blockstore")

STATE = "state.json"
_OWN_FILES = (STATE, "block-*.safetensors", "hidden-*.pt", "*.tmp")
_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(LayerQuantResult)
                       if f.type in ("torch.Tensor", torch.Tensor))


class BlockStore:
    """The pipeline's BlockHooks backed by a work directory (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        fingerprint: dict[str, Any],
        model: nn.Module,
        arch: ArchSpec,
        config: QuantizeConfig,
        lazy: LazyModel | None = None,
        compact: bool = False,
    ) -> None:
        """compact: hold the streamed blocks' linears small (worker/gptq/compactblock.py);
        for lazy runs on the CPU, whose forward passes run in fp32."""
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk
        self.model, self.arch, self.config, self.lazy = model, arch, config, lazy
        self.compact = compact and lazy is not None
        self._compact: CompactLinears | None = None
        self._packed: dict[str, torch.Tensor] = {}  # this block's layers, packed when solved
        self.discarded = ""  # why an existing work dir was not resumed from, if it was not
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state = self._read_state()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptqd-blockstore")
        self._writing: Future[None] | None = None

    # --- BlockHooks ------------------------------------------------------------------------

    def captured(self) -> None:
        if self.lazy is not None:
            self.lazy.release_outside_blocks()
            trim()

    def resume(self, num_blocks: int, device: torch.device) -> Resumed | None:
        done = self.state["finished"]
        if done == 0:
            return None
        if done >= num_blocks and not self._hidden_path(done).is_file():
            hidden: list[torch.Tensor] = []  # finished; nothing feeds a block after the last
        else:  # (after the last: what the pipeline's passengers carry on to the head)
            hidden = torch.load(self._hidden_path(done), map_location=device, weights_only=True)
        layers = {name: _stub(meta) for name, meta in self.state["layers"].items()}
        modules = [ModuleReport(**m) for m in self.state["modules"]]
        if self.lazy is None:  # the in-memory model must hold the quantized weights too
            for index in range(done):
                self._restore_weights(index, layers)
        return Resumed(done, hidden, layers, modules)

    def load(self, index: int, block: nn.Module) -> None:
        if self.lazy is None:
            return
        if not self.compact:
            self.lazy.load_block(index, block)
            return
        linears = self.arch.block_linears(block, index)
        self.lazy.load_block(index, block, as_stored=[f"{name}.weight" for name in linears])
        self._compact = CompactLinears(linears, self.lazy.dtype)

    def pass_done(self) -> None:
        if self._compact is not None:
            self._compact.pass_done()

    def solved(self, name: str, module: nn.Module, layer: LayerQuantResult) -> LayerQuantResult:
        """Pack the layer now (a fraction of its int32 codes and fp32 weight) and keep a stub."""
        from worker.gptq.export import layer_tensors

        self._packed.update(layer_tensors(self.model, name, layer, self.config))
        if self._compact is not None:
            self._compact.solved(module, layer)
        trim()  # the solver's K x K temporaries are freed by now: give their pages back
        return _stub(_meta_of(layer))

    def finished(
        self,
        index: int,
        block: nn.Module,
        layers: dict[str, LayerQuantResult],
        modules: list[ModuleReport],
        next_hidden: list[torch.Tensor] | None,
    ) -> dict[str, LayerQuantResult]:
        from worker.gptq.export import checkpoint_tensors

        prefix = self.arch.block_prefix(index) + "."
        tensors = checkpoint_tensors(self.model, layers, self.config, prefix, stored=self._packed)
        self._packed = {}
        self.state["finished"] = index + 1
        self.state["layers"].update({name: _meta_of(layer) for name, layer in layers.items()})
        self.state["modules"].extend(m.to_dict() for m in modules)
        state = json.dumps(self.state, indent=1)  # as of now: the next block changes it
        self.wait()  # the previous block's commit first (and its error, if it failed)
        self._writing = self._writer.submit(self._commit, index, tensors, next_hidden, state)
        if self._compact is not None:
            self._compact.remove()
            self._compact = None
        if self.lazy is not None:
            release(block)
        trim()
        return {name: _stub(self.state["layers"][name]) for name in layers}

    def _commit(self, index: int, tensors: dict[str, torch.Tensor],
                next_hidden: list[torch.Tensor] | None, state: str) -> None:
        """The block's tensors, the next block's inputs, then the state that names them."""
        _atomic(self._block_path(index), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        if next_hidden is not None:
            _atomic(self._hidden_path(index + 1), lambda tmp: torch.save(next_hidden, tmp))
        _atomic(self.directory / STATE, lambda tmp: Path(tmp).write_text(state))
        self._hidden_path(index).unlink(missing_ok=True)  # inputs of a block now done

    def wait(self) -> None:
        """Until the block being written is committed; raises its write's error."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def settle(self) -> None:
        """wait(), for a run that ends anyway: a write's error is logged, not raised (the run
        already failed, or stored() raised it)."""
        try:
            self.wait()
        except Exception:
            log.warning("writing a finished block to %s failed", self.directory, exc_info=True)

    def close(self) -> None:
        """settle(), and the writing thread ends: the store writes no more blocks."""
        self.settle()
        self._writer.shutdown(wait=True)

    # --- the checkpoint --------------------------------------------------------------------

    def stored(self, dtype: torch.dtype = torch.float16) -> Mapping[str, torch.Tensor]:
        """Every finished block's checkpoint tensors, read from disk when asked for; with lazy
        loading also the tensors outside the blocks, from the model's files, floats in dtype
        (the checkpoint's)."""
        self.wait()
        outside = self.lazy.outside_tensors(dtype) if self.lazy is not None else {}
        return _StoredTensors([self._block_path(i) for i in range(self.state["finished"])], outside)

    def clear(self) -> None:
        """Our files, and the directory itself if that leaves it empty."""
        self.settle()  # no write may land after the wipe
        if self.directory.is_dir():
            self._wipe()
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    # --- files -----------------------------------------------------------------------------

    def _block_path(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def _hidden_path(self, index: int) -> Path:
        return self.directory / f"hidden-{index:05d}.pt"

    def _read_state(self) -> dict[str, Any]:
        fresh = {"fingerprint": self.fingerprint, "finished": 0, "layers": {}, "modules": []}
        path = self.directory / STATE
        if not path.is_file():
            self._wipe()
            return fresh
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = None
        if state is None or state.get("fingerprint") != self.fingerprint:
            self.discarded = "the work dir holds another run (different model, settings or calibration)"
            self._wipe()
            return fresh
        return state

    def _wipe(self) -> None:
        """Remove our own files only: a work dir given by mistake keeps everything else."""
        for pattern in _OWN_FILES:
            for path in self.directory.glob(pattern):
                path.unlink()

    def _restore_weights(self, index: int, layers: dict[str, LayerQuantResult]) -> None:
        """Write a finished block's dequantized weights into the in-memory model."""
        prefix = self.arch.block_prefix(index)
        block = self.arch.blocks(self.model)[index]
        stored = self.stored()
        for rel, module in self.arch.block_linears(block, index).items():
            name = f"{prefix}.{rel}"
            if name in layers:
                set_weight(module, dequantize_stored(stored, name, self.config, layers[name]))


def dequantize_stored(
    stored: Mapping[str, torch.Tensor], name: str, config: QuantizeConfig, layer: LayerQuantResult
) -> torch.Tensor:
    """W'[n,k] = scales[g_idx[k], n] * (codes[n,k] - zeros[g_idx[k], n]) from packed tensors."""
    N, K = layer.codes.shape
    config = config.quantized_with(name)
    codes = unpack_qweight(stored[f"{name}.qweight"], config.bits, K).float()
    zeros = unpack_qzeros(stored[f"{name}.qzeros"], config.bits, N, config.checkpoint_format).float()
    scales = stored[f"{name}.scales"].float()
    g_idx = stored[f"{name}.g_idx"].long()
    return scales[g_idx].t() * (codes - zeros[g_idx].t())


class _StoredTensors(Mapping[str, torch.Tensor]):
    """Tensors in safetensors files, plus tensors made by readers, each read when asked for."""

    def __init__(self, paths: list[Path], readers: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        self.where: dict[str, Path] = {}
        for path in paths:
            with safe_open(path, framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), path))
        self.readers = readers

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.readers:
            return self.readers[key]()
        with safe_open(self.where[key], framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self.where or key in self.readers

    def __iter__(self) -> Iterator[str]:
        yield from self.where
        yield from (key for key in self.readers if key not in self.where)

    def __len__(self) -> int:
        return len(self.where.keys() | self.readers.keys())


def _meta_of(layer: LayerQuantResult) -> dict[str, Any]:
    """A LayerQuantResult as JSON: its numbers, and only the shapes of its tensors."""
    data = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.name not in _TENSOR_FIELDS}
    data["shapes"] = {name: list(getattr(layer, name).shape) for name in _TENSOR_FIELDS}
    return data


def _stub(meta: dict[str, Any]) -> LayerQuantResult:
    """A LayerQuantResult whose tensors are on the meta device: shapes and numbers, no memory."""
    tensors = {
        name: torch.empty(shape, device="meta", dtype=torch.float32 if name in ("weight", "scales") else torch.int32)
        for name, shape in meta["shapes"].items()
    }
    numbers = {k: v for k, v in meta.items() if k != "shapes"}
    return LayerQuantResult(**tensors, **numbers)


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
