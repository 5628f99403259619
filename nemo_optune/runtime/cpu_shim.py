"""Make megatron-core 0.16.1 run on CPU with gloo.

megatron-core assumes CUDA in a handful of places that are pure bookkeeping (device
placement of scalars, stream/synchronize calls). When CUDA is absent we redirect exactly
those places to the CPU; with CUDA present this module does nothing, so GPU runs execute
unmodified megatron-core code.
"""

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

_applied = False


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` module inside one megatron module: identical except that
    `device="cuda"` tensor factories create CPU tensors."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


class _NullStream:
    """What megatron's DDP and schedules need of a CUDA stream, on CPU: nothing."""

    def wait_stream(self, _stream):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def apply_cpu_shim() -> bool:
    """Patch megatron-core for CPU when CUDA is unavailable. Returns True if patched."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    # p2p communication and tensor-parallel helpers place buffers on current_device().
    torch.cuda.current_device = lambda: "cpu"
    # Timing/pipeline code calls synchronize(); on CPU every op is already complete.
    torch.cuda.synchronize = lambda *a, **k: None
    # DDP and the pipeline schedules fetch the current stream to order communication.
    torch.cuda.current_stream = lambda *a, **k: _NullStream()

    # The schedules create their token counter with device="cuda".
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuTorch()
    _applied = True
    return True


class _CudaMovesStayOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def cuda_moves_stay_on_cpu():
    """A scope in which `tensor.cuda()` is a no-op when CUDA is absent. megatron's GPTModel
    moves a tied output weight with .cuda() at PP>1 before copying the first stage's
    embedding into it; a scope, not a global patch of torch.Tensor."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaMovesStayOnCpu()
