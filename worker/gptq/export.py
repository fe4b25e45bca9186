"""Write a GPTQ checkpoint that transformers, GPTQModel and vLLM load (gptq-format.md).

Per quantized linear P (K inputs, N outputs, G groups): P.qweight int32 [K·b/32, N],
P.qzeros int32 [G, N·b/32], P.scales fp16 [G, N], P.g_idx int32 [K], P.bias fp16. Every other
tensor is written as an ordinary weight in fp16, tied weights once. GPT-2's Conv1D needs no
special case: the solver's result is in [out, in] orientation like nn.Linear, and the
dequantized qweight matrix [in, out] is exactly the Conv1D weight.

save_checkpoint writes into the directory it is given. Callers that must never expose half a
checkpoint write into a temporary directory (partial_dir) and then call publish_atomically.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import QuantizeConfig
from .errors import EngineError, LayerShapeError
from .gptq import LayerQuantResult
from .lazyload import INDEX_FILE as INDEX_NAME
from .lazyload import tied_keys
from .packing import pack_qweight, pack_qzeros
from .progress import StepCallback
from .stwriter import TensorSpec, write_safetensors
from .tensornames import tensor_namer

DEFAULT_MAX_SHARD_SIZE = 4 * 1024**3
WEIGHTS_NAME = "model.safetensors"
REPORT_NAME = "quant_report.json"
LOG_NAME = "quant_log.csv"
PROJECT_URI = "https://pypi.org/project/gptqd/"


def quantization_config_dict(config: QuantizeConfig) -> dict[str, Any]:
    """The dict written both as config.json's quantization_config and as quantize_config.json."""
    return {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": config.desc_act,
        "sym": config.sym,
        "lm_head": False,
        # vLLM reads checkpoint_format, GPTQModel and optimum read format: write both
        "checkpoint_format": config.checkpoint_format,
        "format": config.checkpoint_format,
        "damp_percent": config.damp_percent,
        "damp_auto_increment": config.damp_auto_increment,
        "true_sequential": config.true_sequential,
        "static_groups": config.static_groups,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"gptqd:{__version__}"],
            "uri": PROJECT_URI,
            "damp_percent": config.damp_percent,
            "damp_auto_increment": config.damp_auto_increment,
            "static_groups": config.static_groups,
            "true_sequential": config.true_sequential,
            "mse": config.mse,
            "act_group_aware": config.act_group_aware,
        },
    }


def unquantized_block_layers(
    model: torch.nn.Module, arch: Any, layers: dict[str, LayerQuantResult]
) -> list[str]:
    """Linears of the decoder blocks that were left unquantized (loaders must be told)."""
    names = []
    for index in range(len(arch.blocks(model))):
        for rel in arch.module_names:
            name = f"{arch.block_prefix(index)}.{rel}"
            if name not in layers:
                names.append(name)
    return names


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // g).to(torch.int32)


def g_idx_must_be_trivial(config: QuantizeConfig) -> bool:
    """vLLM ignores g_idx unless desc_act, so it must be i // g in every other case."""
    return not config.desc_act or config.static_groups or config.group_size == -1


def pack_layer(name: str, layer: LayerQuantResult, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (without bias) of one quantized linear, checked for consistency."""
    N, K = layer.codes.shape
    G = 1 if config.group_size == -1 else -(-K // config.group_size)
    if tuple(layer.scales.shape) != (G, N) or tuple(layer.zeros.shape) != (G, N):
        raise LayerShapeError(
            f"{name}: scales/zeros have shapes {tuple(layer.scales.shape)}/"
            f"{tuple(layer.zeros.shape)}, expected ({G}, {N}) for group_size {config.group_size}"
        )
    g_idx = layer.g_idx.to(torch.int32).cpu()
    if g_idx_must_be_trivial(config) and not torch.equal(g_idx, trivial_g_idx(K, config.group_size)):
        # a non-trivial g_idx without desc_act is silently ignored by vLLM: wrong results
        raise EngineError(f"{name}: the solver returned a non-trivial g_idx without act-order")
    try:
        # packed where the solver left the codes: only the int32 words (b/32 of the codes)
        # travel to the host, not the codes themselves
        qweight = pack_qweight(layer.codes, config.bits).cpu()
        qzeros = pack_qzeros(layer.zeros, config.bits, config.checkpoint_format).cpu()
    except ValueError as exc:
        raise LayerShapeError(f"{name} ({K} inputs, {N} outputs) cannot be packed: {exc}") from exc
    return {
        f"{name}.qweight": qweight,
        f"{name}.qzeros": qzeros,
        f"{name}.scales": layer.scales.to(torch.float16).cpu(),  # exact: fp16-representable
        f"{name}.g_idx": g_idx,
    }


@dataclass
class _Entry:
    """One or more tensors written together, materialised only when their shard is written."""

    specs: dict[str, TensorSpec]  # the names make() returns, with their dtypes and shapes
    make: Callable[[], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())


def _checkpoint_entries(
    model: torch.nn.Module,
    layers: dict[str, LayerQuantResult],
    config: QuantizeConfig,
    dtype: torch.dtype,
) -> Iterator[_Entry]:
    """Everything the checkpoint holds, in state-dict order, quantized layers in place of their weight."""
    seen_storage: set[tuple] = set()
    skip = {f"{name}.bias" for name in layers}
    tied = tied_keys(model)
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        module_name = key.removesuffix(".weight")
        if key.endswith(".weight") and module_name in layers:
            yield _quantized_entry(model, module_name, layers[module_name], config, dtype)
            continue
        # tied weights (lm_head = embeddings) share storage: write the first name only
        # (meta tensors, a streamed run's, have no storage to compare: the tie names them)
        if tensor.device.type == "meta" and key in tied:
            continue
        if tensor.device.type != "meta":
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ident in seen_storage:
                continue
            seen_storage.add(ident)
        out_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        yield _Entry(
            {key: TensorSpec(out_dtype, tuple(tensor.shape))},
            lambda key=key, tensor=tensor, out_dtype=out_dtype: {
                key: tensor.detach().to("cpu", out_dtype).contiguous()
            },
        )


def _quantized_entry(
    model: torch.nn.Module, name: str, layer: LayerQuantResult, config: QuantizeConfig, dtype: torch.dtype
) -> _Entry:
    N, K = layer.codes.shape
    G = layer.scales.shape[0]
    config = config.quantized_with(name)
    bias = getattr(model.get_submodule(name), "bias", None)
    # what pack_layer makes: b-bit values packed along K (qweight) and N (qzeros) in int32
    specs = {
        f"{name}.qweight": TensorSpec(torch.int32, (K * config.bits // 32, N)),
        f"{name}.qzeros": TensorSpec(torch.int32, (G, N * config.bits // 32)),
        f"{name}.scales": TensorSpec(torch.float16, (G, N)),
        f"{name}.g_idx": TensorSpec(torch.int32, (K,)),
    }
    if bias is not None:
        specs[f"{name}.bias"] = TensorSpec(dtype, (N,))

    def make() -> dict[str, torch.Tensor]:
        tensors = pack_layer(name, layer, config)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to("cpu", dtype).contiguous()
        return tensors

    return _Entry(specs, make)


def layer_tensors(
    model: torch.nn.Module, name: str, layer: LayerQuantResult, config: QuantizeConfig,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """One quantized linear's checkpoint tensors (packed, with its bias), as saved."""
    return _quantized_entry(model, name, layer, config, dtype).make()


def checkpoint_tensors(
    model: torch.nn.Module,
    layers: dict[str, LayerQuantResult],
    config: QuantizeConfig,
    prefix: str,
    dtype: torch.dtype = torch.float16,
    stored: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors named prefix..., exactly as save_checkpoint writes them (the
    streaming writer stores a finished block's this way; the rest of the model may be on meta).
    stored: tensors already made (e.g. layers packed as soon as they were solved)."""
    tensors: dict[str, torch.Tensor] = {}
    for entry in _checkpoint_entries(model, layers, config, dtype):
        if next(iter(entry.specs)).startswith(prefix):
            tensors.update(_from_store(entry, stored).make())
    return tensors


def _from_store(entry: _Entry, stored: Mapping[str, torch.Tensor] | None) -> _Entry:
    """The entry read from already-written tensors when the store has all of its names."""
    if stored is None or not all(key in stored for key in entry.specs):
        return entry
    return _Entry(entry.specs, lambda: {key: stored[key] for key in entry.specs})


def _plan_shards(entries: list[_Entry], max_shard_size: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _write_weights(
    entries: list[_Entry], out_dir: Path, max_shard_size: int, rename: Callable[[str], str],
    on_written: StepCallback | None = None,
) -> list[Path]:
    """The shards (and their index), each tensor under rename(its module name); on_written
    hears the bytes written of the total after each tensor."""
    shards = _plan_shards(entries, max_shard_size)
    size = sum(spec.nbytes for entry in entries for spec in entry.specs.values())
    done = 0

    def counted(pairs: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal done
        for name, tensor in pairs:
            yield name, tensor  # the writer asks for the next one once this one is written
            done += tensor.numel() * tensor.element_size()
            if on_written is not None:
                on_written(done, size)

    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    paths = []
    for fname, shard in zip(names, shards, strict=True):
        specs = {rename(key): spec for entry in shard for key, spec in entry.specs.items()}
        # one entry's tensors in memory at a time, however large the shard
        made = ((rename(key), tensor) for entry in shard for key, tensor in entry.make().items())
        write_safetensors(out_dir / fname, specs, counted(made), metadata={"format": "pt"})
        paths.append(out_dir / fname)
        weight_map.update(dict.fromkeys(specs, fname))
        total += sum(spec.nbytes for spec in specs.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        paths.append(_write_json(out_dir / INDEX_NAME, index))
    return paths


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def _model_config_dict(model: torch.nn.Module, qconfig: dict, dtype: torch.dtype) -> dict:
    config = model.config.to_diff_dict()
    for key in ("_attn_implementation", "attn_implementation", "_name_or_path"):
        config.pop(key, None)
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    config["torch_dtype"] = dtype_name  # older transformers and vLLM read this name
    config["quantization_config"] = qconfig
    return config


def _write_report(out_dir: Path, layers: dict[str, LayerQuantResult], config: QuantizeConfig,
                  report: dict | None) -> list[Path]:
    modules = [
        {
            "module": name,
            "out_features": int(layer.codes.shape[0]),
            "in_features": int(layer.codes.shape[1]),
            "loss": layer.loss,
            "damp_percent": layer.damp_percent,
            "nsamples": layer.nsamples,
            "seconds": round(layer.seconds, 4),
        }
        for name, layer in layers.items()
    ]
    data = {"quantizer": f"gptqd:{__version__}", "config": config.to_dict(), "modules": modules}
    if report:
        data.update(report_file_fields(report))
    paths = [_write_json(out_dir / REPORT_NAME, data)]
    with open(out_dir / LOG_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(modules[0]) if modules else ["module"])
        writer.writeheader()
        writer.writerows(modules)
    paths.append(out_dir / LOG_NAME)
    return paths


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    result: Any,
    config: QuantizeConfig,
    out_dir: Path,
    *,
    arch: Any = None,
    report: dict | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype = torch.float16,
    stored: Mapping[str, torch.Tensor] | None = None,
    on_written: StepCallback | None = None,
) -> list[Path]:
    """Write the checkpoint of a quantized model into out_dir; returns the files written.
    on_written hears the weights' bytes written of their total, after each tensor.

    arch (the model's ArchSpec) lets export list block linears missing from result.layers in
    the config's `dynamic` skip map, so GPTQModel and vLLM load them as plain weights.

    result is the pipeline's PipelineResult (only its .layers is read: module name ->
    LayerQuantResult); the model's own weights for those modules are not written. Ordinary
    tensors are stored in `dtype` (fp16, what GPTQ kernels expect).

    stored maps names to tensors already written elsewhere (a streamed run's finished blocks,
    whose weights are no longer in the model): those are copied from it instead.
    """
    layers: dict[str, LayerQuantResult] = dict(result.layers)
    if not layers:
        raise EngineError("no layer was quantized: nothing to export")
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    entries = [_from_store(e, stored) for e in _checkpoint_entries(model, layers, config, dtype)]
    rename = tensor_namer(config, getattr(model.config, "model_type", None))
    paths = _write_weights(entries, out_dir, max_shard_size, rename, on_written)
    qconfig = quantization_config_dict(config)
    skipped = unquantized_block_layers(model, arch, layers) if arch is not None else []
    # GPTQModel/vLLM syntax: "-:" + regex = leave this module unquantized (named as the tensors
    # are: the renaming tables match whole name parts, "x."); the run's own rules follow as
    # given: vLLM matches them against its fused layers' names (qkv_proj), not only ours
    rules = {f"-:^{re.escape(rename(name + '.')[:-1])}$": {} for name in skipped
             if config.for_module(name) is not None}
    rules.update(config.dynamic)
    if rules:
        qconfig["dynamic"] = rules
    paths.append(_write_json(out_dir / "config.json", _model_config_dict(model, qconfig, dtype)))
    paths.append(_write_json(out_dir / "quantize_config.json", qconfig))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
        paths.append(out_dir / "generation_config.json")
    if tokenizer is not None:
        paths.extend(Path(p) for p in tokenizer.save_pretrained(out_dir))
    paths.extend(_write_report(out_dir, layers, config, report))
    return paths


def report_file_fields(report: dict) -> dict:
    """What of a run report goes into the checkpoint's report file: not the per-module list
    (written from the layers), nor out_dir, where the checkpoint happened to be written (often
    a temporary directory renamed afterwards, and a server path)."""
    return {k: v for k, v in report.items() if k not in ("modules", "out_dir")}


def partial_dir(final: Path) -> Path:
    """Where a checkpoint bound for `final` is written until it is complete."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def publish_atomically(tmp: Path, final: Path, *, overwrite: bool = False) -> Path:
    """Rename the finished directory tmp to final, so readers see all of it or nothing.

    Both must be on the same filesystem. An existing final is refused unless overwrite, in
    which case it is moved aside first and removed after the new one is in place.
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        raise FileNotFoundError(f"{tmp} is not a directory")
    old = None
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    return final
