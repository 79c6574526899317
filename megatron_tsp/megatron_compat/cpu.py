"""Run Megatron's real training loop on CPU ranks over gloo.

Written against megatron-core 0.19.2 and torch 2.11. Megatron's runtime allocates on ``"cuda"`` /
``torch.cuda.current_device()`` in about 60 places (grad buffers, optimizer scalars, pipeline buffers,
timers, logging reductions) and calls ``torch.cuda`` streams, events, RNG and memory statistics. Instead of
patching each call site, :class:`CudaToCpuMode` (a ``TorchFunctionMode``) rewrites CUDA devices to the CPU
for every torch call made while it is active, and :func:`install_cuda_stand_ins` gives the ``torch.cuda``
functions Megatron calls CPU meanings. ``torch.cuda.is_available()`` and ``device_count()`` are left
truthful (False / 0): faking them would turn on pinned memory, NCCL and other CUDA-only paths.

The Megatron-specific patches that go with this live in :mod:`megatron_tsp.megatron_compat.patches`, the one
list of every patch this plugin applies to Megatron.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

_CPU = torch.device("cpu")

# Megatron flags every CPU run needs: gloo instead of NCCL; no gradient-accumulation fusion, persistent
# layer norm, RoPE fusion or fused masked softmax (CUDA/Apex/Transformer Engine kernels; the softmax one is
# tried for fp16/bf16 and fails to import).
CPU_MEGATRON_FLAGS = ("--distributed-backend", "gloo", "--no-gradient-accumulation-fusion",
                      "--no-persist-layer-norm", "--no-rope-fusion", "--no-masked-softmax-fusion")


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")`` or an int) to the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # torch.cuda.current_device() returns an int that Megatron passes as ``device=``
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Every torch call made under this mode sees CPU wherever Megatron asked for CUDA.

    Also answers ``Tensor.type()`` with the CUDA type name, because Megatron's grad clipping and optimizers
    assert ``param.type() == 'torch.cuda.FloatTensor'`` to select fp32 parameters.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.to:
            args = (args[0],) + tuple(_to_cpu_device(a) for a in args[1:])
            kwargs.pop("non_blocking", None)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: CPU work is synchronous, so every method is a no-op
    that returns another stand-in (``stream.record_event()`` must give something with ``synchronize()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: _NullStream()

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _returning(value: Any) -> Any:
    """A fresh function object returning ``value`` (torch._dynamo rejects one object under two torch names)."""

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return value() if callable(value) else value

    return stand_in


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(state.cpu())


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse into a stand-in.
    torch.default_generator.manual_seed(int(seed))


_STAND_INS: dict[str, Any] = {
    "current_device": _returning(0),
    "synchronize": _returning(None),
    "set_device": _returning(None),
    "empty_cache": _returning(None),
    "set_stream": _returning(None),
    "Stream": _NullStream,
    "Event": _NullStream,
    "current_stream": _returning(_NullStream),
    "default_stream": _returning(_NullStream),
    "stream": _returning(_NullStream),
    "get_rng_state": _cpu_get_rng_state,
    "set_rng_state": _cpu_set_rng_state,
    "manual_seed": _cpu_manual_seed,
    "memory_stats": _returning(dict),
    "memory_allocated": _returning(0),
    "max_memory_allocated": _returning(0),
    "memory_reserved": _returning(0),
    "max_memory_reserved": _returning(0),
    "reset_peak_memory_stats": _returning(None),
    "is_current_stream_capturing": _returning(False),
    # Megatron's argument validation reads the architecture to decide whether it needs
    # CUDA_DEVICE_MAX_CONNECTIONS=1 (pre-Blackwell); answer like a Hopper part.
    "get_device_properties": _returning(SimpleNamespace(name="cpu", major=9, minor=0, total_memory=0,
                                                        multi_processor_count=1)),
    "get_device_capability": _returning((9, 0)),
}
_INSTALLED = False


def _no_compile(model: Callable | None = None, **options: Any) -> Callable:
    """``torch.compile`` on CPU ranks: the function (or module) itself, as ``torch.compile(fn, ...)`` and as
    ``torch.compile(...)(fn)``."""
    return model if model is not None else _no_compile


def install_cuda_stand_ins() -> None:
    """Give the ``torch.cuda`` functions Megatron calls a CPU meaning (idempotent, process-wide).

    Also turns ``torch.compile`` into a no-op: Megatron's ``jit_fuser`` wraps ~15 fused functions with it
    at import (``megatron.core`` imports some of them itself, so patching ``jit_fuser`` comes too late),
    which would cost ~30 s of compilation per CPU rank for no gain. Installed before Megatron is imported,
    ``torch.compile`` returns the function itself, so the import skips loading torch's compiler (inductor:
    ~1.5 s of every CPU rank's start-up); dynamo is disabled too, for anything compiled before.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    torch._dynamo.config.disable = True
    torch.compile = _no_compile
    for name, stand_in in _STAND_INS.items():
        setattr(torch.cuda, name, stand_in)
    torch.cuda.random.get_rng_state = _STAND_INS["get_rng_state"]
    _INSTALLED = True


_MODE_ACTIVE = False


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Run the body with CUDA requests mapped to the CPU, including inside custom autograd backwards.

    A ``TorchFunctionMode`` is not active inside a custom ``autograd.Function.backward`` that autograd's
    engine runs for ``loss.backward()``; re-entering the mode in ``BackwardCFunction.apply`` covers every
    such backward (Megatron's sequence-parallel linears allocate on the current CUDA device there).
    """
    global _MODE_ACTIVE
    install_cuda_stand_ins()
    _wrap_custom_backward()
    previous, _MODE_ACTIVE = _MODE_ACTIVE, True
    try:
        with CudaToCpuMode():
            yield
    finally:
        _MODE_ACTIVE = previous


_ORIGINAL_BACKWARD_APPLY = torch.autograd.function.BackwardCFunction.apply


def _backward_apply_on_cpu(self, *args: Any) -> Any:
    if not _MODE_ACTIVE:
        return _ORIGINAL_BACKWARD_APPLY(self, *args)
    with CudaToCpuMode():
        return _ORIGINAL_BACKWARD_APPLY(self, *args)


def _wrap_custom_backward() -> None:
    torch.autograd.function.BackwardCFunction.apply = _backward_apply_on_cpu


def peak_allocated_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes of tensor memory allocated on the CPU while ``fn()`` runs, above what was allocated before
    (kernel scratch included): the CPU's counterpart of ``torch.cuda.max_memory_allocated``, from the torch
    profiler's allocator events, for benchmarks and tests."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
    current = peak = 0
    for event in allocations:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
