"""A CUDA device simulated on the CPU: the engine's CUDA paths run here, tensor for tensor.

Nothing in the CPU tests otherwise takes the branches that `device.type == "cuda"` guards
(fp16 compute, TF32 Hessian sums, 8192-token forward batches, mem_get_info in the
whole-or-stream choice, packing on the device, read-ahead, the peak-memory report), and a
tensor left on the host among device tensors fails only on a card ("Expected all tensors to be
on the same device"). Inside `simulated_cuda()`:

  * a tensor put on "cuda" (a factory's device=, `.to`, `.cuda()`, a module's `.to`) is a
    `SimCudaTensor`: a wrapper that reports device cuda:0 and computes with a CPU tensor;
  * every aten op with such an argument checks what a card checks: no host (CPU or meta)
    tensor beside a device one, except a 0-dim one read as a scalar, and except where CUDA
    takes them (copies, the indices of advanced indexing); a mix raises RuntimeError at once,
    naming the op;
  * copies from the device to the host (`.cpu()`, `.item()`, `.tolist()`, ...) are counted;
  * live device bytes are tracked, so torch.cuda.memory_allocated / max_memory_allocated /
    mem_get_info answer with the simulated figures; the rest of torch.cuda that the project
    calls answers as a one-GPU machine does.

What it cannot show: kernels, streams, speed, the caching allocator's reserve, and the Triton
column kernel as a card runs it (with TRITON_INTERPRET=1, as in the tests, the interpreter runs
it on the wrapped host tensors).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_CPP_DEVICE = torch.device("lazy")
TOTAL_BYTES = 24 * 2**30  # the simulated card: a 24 GB one
# ops that take host tensors beside device ones on a real card
MIXING_ALLOWED = {
    "aten::copy_", "aten::_to_copy", "aten::index.Tensor", "aten::index_put_",
    "aten::_index_put_impl_", "aten::index_put", "aten::lift_fresh", "aten::set_",
}
# matrix products computed as a card does in half precision (_half_matmul)
HALF_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_HALVES = (torch.float16, torch.bfloat16)
# aten ops whose result the host waits for (also counted by tests/unit/test_solver_syncs.py)
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique"}


class SimCudaTensor(torch.Tensor):
    """A tensor on the simulated card: cuda:0 to Python, a "lazy" device tensor to torch's C++
    side (a device type that a CPU build can describe, and that nothing else here uses: a
    tensor that C++ makes "like" this one, inside a composite op, is known to be on the card)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> SimCudaTensor:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=_CPP_DEVICE, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner
        _STATE.track(inner)

    device = property(lambda self: CUDA)  # type: ignore[assignment]
    is_cuda = property(lambda self: True)  # type: ignore[assignment]
    is_cpu = property(lambda self: False)  # type: ignore[assignment]

    def get_device(self) -> int:
        return 0

    def __repr__(self, **_: Any) -> str:
        return f"SimCudaTensor({self.inner!r})"

    def numpy(self, *_: Any, **__: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to "
                        "copy the tensor to host memory first.")

    def data_ptr(self) -> int:
        return self.inner.data_ptr()

    def untyped_storage(self) -> torch.UntypedStorage:
        return self.inner.untyped_storage()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # outside simulated_cuda()'s modes (another thread): the moves still work
        moved = _move(func, args, kwargs or {})
        if moved is not NotImplemented:
            return moved
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run(func, args, kwargs or {})


class _State:
    """Device bytes in use and at peak, and what the host read back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        # releases of tensors made under an earlier simulated_cuda() are ignored
        self.generation = getattr(self, "generation", 0) + 1
        self.live: dict[int, int] = {}  # storage data_ptr -> bytes, while a wrapper holds it
        self.holders: Counter = Counter()
        self.allocated = 0
        self.peak = 0
        self.reads: Counter = Counter()

    def track(self, inner: torch.Tensor) -> None:
        storage = inner.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        with self.lock:
            if self.holders[key] == 0:
                self.live[key] = size
                self.allocated += size
                self.peak = max(self.peak, self.allocated)
            self.holders[key] += 1
        weakref.finalize(inner, self.release, key, self.generation)

    def release(self, key: int, generation: int) -> None:
        with self.lock:
            if generation != self.generation:
                return
            self.holders[key] -= 1
            if self.holders[key] == 0:
                self.allocated -= self.live.pop(key)
                del self.holders[key]


_STATE = _State()


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type in ("cuda", _CPP_DEVICE.type)


def _unwrap(value: Any) -> Any:
    return value.inner if isinstance(value, SimCudaTensor) else value


def _wrap_new(value: Any) -> Any:
    """A factory's result, made on the host for the card: wrapped."""
    return SimCudaTensor(value) if isinstance(value, torch.Tensor) else value


def _move(func: Any, args: tuple, kwargs: dict) -> Any:
    """Tensor.to / .cuda / .cpu and factories with device=cuda; NotImplemented for other calls."""
    name = getattr(func, "__name__", "")
    if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
        self, rest = args[0], args[1:]
        if func is torch.Tensor.cuda:
            device, dtype, non_blocking, fmt = CUDA, None, kwargs.get("non_blocking", False), None
        elif func is torch.Tensor.cpu:
            device, dtype, non_blocking, fmt = torch.device("cpu"), None, False, None
        else:
            if rest and isinstance(rest[0], torch.Tensor):  # .to(other): its device and dtype
                rest = (rest[0].device, rest[0].dtype, *rest[1:])
            device, dtype, non_blocking, fmt = torch._C._nn._parse_to(
                *rest, **{k: v for k, v in kwargs.items() if k != "copy"})
        on_card = isinstance(self, SimCudaTensor)
        if device is None:
            return NotImplemented  # a dtype change: aten's own _to_copy
        source = _unwrap(self)
        options = {k: v for k, v in (("dtype", dtype), ("memory_format", fmt)) if v is not None}
        if _is_cuda(device) and on_card:  # already there: itself, or a dtype change
            changed = source.to(**options, copy=kwargs.get("copy", False))
            return self if changed is source else SimCudaTensor(changed)
        if _is_cuda(device):
            moved = source.to("cpu", copy=True, **options)  # a transfer is always a copy
            return SimCudaTensor(moved)
        if on_card:  # to the host: the host waits for the card (unless non_blocking)
            _STATE.reads["to host" + (" (non_blocking)" if non_blocking else "")] += 1
            return source.to(device, copy=True, **options)
        return NotImplemented
    if func is torch.nn.functional.scaled_dot_product_attention and any(
            isinstance(t, SimCudaTensor) for t in tree_flatten((args, kwargs))[0]):
        return _fused_attention(func, args, kwargs)
    if func is torch.Tensor.tolist and isinstance(args[0], SimCudaTensor):
        _STATE.reads["tolist"] += 1
        return args[0].inner.tolist()
    if func == _SET_DATA and isinstance(args[1], SimCudaTensor) != isinstance(args[0], SimCudaTensor):
        return _set_data(*args)
    device = kwargs.get("device")
    if _is_cuda(device) and name not in ("to", "cuda", "cpu"):
        kwargs = {**kwargs, "device": torch.device("cpu")}
        if "pin_memory" in kwargs:
            kwargs.pop("pin_memory")
        return tree_map(_wrap_new, func(*args, **kwargs))
    return NotImplemented


def _fused_attention(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """Attention as a card's fused kernels compute it, without the [heads, n, n] scores in
    device memory: the host's own fused kernel on the unwrapped tensors. (Left to aten, a
    wrapper's attention would decompose into the math path and count the scores: 1.3 GiB for 16
    windows of 512 tokens, where flash attention on a card allocates the output only.)"""
    _refuse_host_tensors("attention", tree_flatten((args, kwargs))[0], [])
    return SimCudaTensor(func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs)))


_SET_DATA = torch.Tensor.data.__set__  # type: ignore[attr-defined]


def _set_data(current: torch.Tensor, value: torch.Tensor) -> None:
    """`param.data = tensor` across devices. A card's tensors and the host's share a C++ type,
    a wrapper does not: the Python objects trade places instead, so the Parameter object (tied
    weights share it) is the one that moved."""
    is_param = isinstance(current, torch.nn.Parameter)
    if isinstance(value, SimCudaTensor):
        new: torch.Tensor = SimCudaTensor(value.inner)
        if is_param:
            new._is_param = True  # type: ignore[attr-defined]  # what Parameter's isinstance reads
    else:
        new = torch.nn.Parameter(value, requires_grad=False) if is_param else value.detach()
    torch.utils.swap_tensors(current, new)


def _half_matmul(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """An fp16/bf16 matrix product as a card computes it (products summed in fp32, the result
    rounded once): here in fp32, hundreds of times faster than the CPU's own fp16 kernels."""
    dtype = args[0].dtype
    wide = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == dtype else t, args)
    return func(*wide, **kwargs).to(dtype)


def _check_devices(func: Any, name: str, args: tuple, kwargs: dict, flat: list) -> None:
    """A card's rule: every tensor on the card, but a host tensor of no dimensions may come in
    as a scalar; what an op writes (its self when in place, out=) must be on the card."""
    written = [kwargs.get("out")] if "out" in kwargs else []
    if func._schema.is_mutable and args:
        written.append(args[0])
    _refuse_host_tensors(name, flat, written)


def _refuse_host_tensors(name: str, flat: list, written: list) -> None:
    for t in flat:
        if not isinstance(t, torch.Tensor) or isinstance(t, SimCudaTensor):
            continue
        if t.dim() > 0 or any(t is w for w in written):
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two "
                f"devices, cuda:0 and {t.device}! (simulated CUDA: {name} got a {t.device} "
                f"tensor of shape {tuple(t.shape)} beside a cuda one)")


def _run(func: Any, args: tuple, kwargs: dict) -> Any:
    """One aten op with simulated-card arguments: checked, computed on the host, wrapped."""
    name = func._schema.name
    flat, _ = tree_flatten((args, kwargs))
    on_card = [t for t in flat if isinstance(t, SimCudaTensor)]
    made_on_card = _is_cuda(kwargs.get("device"))
    if not on_card and not made_on_card:
        return func(*args, **kwargs)
    if name not in MIXING_ALLOWED and on_card:
        _check_devices(func, name, args, kwargs, flat)
    if func.overloadpacket.__name__ in SYNCING_OPS:
        _STATE.reads[name] += 1
    to_host = name == "aten::_to_copy" and kwargs.get("device") is not None \
        and not _is_cuda(kwargs.get("device"))
    if made_on_card:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    inners = {id(t.inner): t for t in on_card}
    if name in HALF_MATMULS and not func._schema.is_mutable and on_card[0].dtype in _HALVES:
        result = _half_matmul(func, tree_map(_unwrap, args), tree_map(_unwrap, kwargs))
    else:
        result = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if to_host:
        _STATE.reads["to host"] += 1
        return result

    def rewrap(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in inners:  # in place or out=: the caller's own tensor
            return inners[id(value)]
        return SimCudaTensor(value)

    return tree_map(rewrap, result)


class _DispatchMode(TorchDispatchMode):
    """Ops made on the card without a card argument (aten factories called from C++)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run(func, args, kwargs or {})


class _FunctionMode(TorchFunctionMode):
    """Moves and factories, seen before a CPU build's C++ refuses device='cuda'."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        moved = _move(func, args, kwargs or {})
        if moved is not NotImplemented:
            return moved
        return func(*args, **(kwargs or {}))


def _cuda_api() -> dict[str, Any]:
    """The torch.cuda functions the project calls, answering as a one-GPU machine."""

    def allocated(*_: Any) -> int:
        return _STATE.allocated

    def reset_peak(*_: Any) -> None:
        _STATE.peak = _STATE.allocated

    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_name": lambda *_: "Simulated CUDA (CPU)",
        "get_device_capability": lambda *_: (9, 0),
        "get_device_properties": lambda *_: SimpleNamespace(
            name="Simulated CUDA (CPU)", major=9, minor=0, total_memory=TOTAL_BYTES,
            multi_processor_count=132, gcnArchName="", warp_size=32),
        "is_bf16_supported": lambda *_, **__: True,
        "synchronize": lambda *_: None,
        "empty_cache": lambda: None,
        "memory_allocated": allocated,
        "memory_reserved": allocated,
        "max_memory_allocated": lambda *_: _STATE.peak,
        "max_memory_reserved": lambda *_: _STATE.peak,
        "reset_peak_memory_stats": reset_peak,
        "mem_get_info": lambda *_: (TOTAL_BYTES - _STATE.allocated, TOTAL_BYTES),
        "is_initialized": lambda: True,
    }


_HOST_COMPATIBLE = torch._has_compatible_shallow_copy_type


# torch's own parameter names: dynamo compares the signature with its polyfill's
def _compatible(input: torch.Tensor, from_: torch.Tensor) -> bool:
    return isinstance(input, SimCudaTensor) or isinstance(from_, SimCudaTensor) or _HOST_COMPATIBLE(input, from_)


@contextmanager
def simulated_cuda() -> Iterator[_State]:
    """Run the body as on a one-GPU machine; yields the device's figures (allocated, peak, reads)."""
    _STATE.reset()
    with ExitStack() as stack:
        for name, fake in _cuda_api().items():
            stack.enter_context(mock.patch.object(torch.cuda, name, fake))
        # Module.to keeps each Parameter object (param.data = moved) when the two tensors'
        # C++ types match, as a card's and the host's do; say so for the wrapper too
        stack.enter_context(mock.patch.object(torch, "_has_compatible_shallow_copy_type", _compatible))
        stack.enter_context(_FunctionMode())
        stack.enter_context(_DispatchMode())
        yield _STATE


_HELD: list[Any] = []


def hold_simulated_cuda() -> None:
    """Enter simulated_cuda() for the rest of the process (tests/simcard/sitecustomize.py)."""
    context = simulated_cuda()
    context.__enter__()
    _HELD.append(context)
