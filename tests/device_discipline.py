"""The GPU path's device rules, checked on a CPU (issue 27).

`gpu_path()` runs code as on one rank of an 8-GPU node, with everything on the CPU:

- `LogicalDevices`, a TorchFunctionMode, gives each tensor a logical device: "cuda" and
  "cuda:N" are accepted wherever torch takes a device (.to, .cuda, device=...), the data stays
  on the CPU, and each result carries its inputs' device. An operation that combines tensors of
  two devices raises DeviceMix, as CUDA would (a CPU 0-dim tensor may join elementwise
  arithmetic, as in CUDA, but not cat/stack). `Tensor.device` reports the logical device.
  Threads started meanwhile run under the same mode.
- `FakeCuda`: torch.cuda says a GPU is there, and the current device is per thread, as in
  CUDA: the main thread is put on cuda:1 (local rank 1), a new thread starts on cuda:0.
- `FakeNCCL`: torch.distributed and megatron's parallel state as the GPU path builds them:
  backend "nccl", 2 ranks in every group (this process is rank 0); each collective refuses a
  tensor that is not on the current CUDA device, as NCCL does, and then acts as if the other
  rank sent zeros (all_reduce: unchanged, all_gather: this rank's tensor twice).
"""

import contextlib
import threading

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

CPU = torch.device("cpu")
LOCAL_RANK = 1
# Ops that refuse a CPU 0-dim tensor beside CUDA ones (elementwise ops accept it as a scalar).
_STRICT = {torch.stack, torch.cat, torch.concat, torch.hstack, torch.vstack}
# Copies cross devices (slice assignment is a copy too); the type query computes nothing.
_ACROSS = {torch.Tensor.copy_, torch.Tensor.__setitem__, torch._has_compatible_shallow_copy_type}


class DeviceMix(RuntimeError):
    """What CUDA raises: tensors of two devices in one operation, or a CPU tensor in NCCL."""


class FakeCuda:
    def __init__(self):
        self._local = threading.local()

    def current_device(self) -> int:
        return getattr(self._local, "index", 0)

    def set_device(self, device) -> None:
        self._local.index = device if isinstance(device, int) else torch.device(device).index


class LogicalDevices(TorchFunctionMode):
    def __init__(self, cuda: FakeCuda):
        super().__init__()
        self.cuda = cuda
        self.tags = WeakTensorKeyDictionary()

    def device_of(self, tensor: torch.Tensor) -> torch.device:
        return self.tags.get(tensor, CPU)

    def resolve(self, device) -> torch.device:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.cuda.current_device())
        return device

    def _tag(self, out, device: torch.device):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if device == CPU:
                    self.tags.pop(t, None)
                else:
                    self.tags[t] = device
        return out

    def _moved(self, tensor: torch.Tensor, out, device: torch.device):
        """`out` on `device`: a new tensor when the device changes (a copy, as on a GPU)."""
        if device != self.device_of(tensor) and out is tensor:
            out = tensor.clone()
        return self._tag(out, device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # (each attribute access makes a new method-wrapper: compared with ==, not is)
        if func == torch.Tensor.device.__get__:
            return self.device_of(args[0])
        if func == torch.Tensor.is_cuda.__get__:
            return self.device_of(args[0]).type == "cuda"
        if func == torch.Tensor.data.__set__:
            self._tag(args[0], self.device_of(args[1]))
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy and self.device_of(args[0]) != CPU:
            raise DeviceMix(f"numpy() of a tensor on {self.device_of(args[0])}")
        if func is torch.Tensor.cpu:
            return self._moved(args[0], func(*args, **kwargs), CPU)
        if func is torch.Tensor.cuda:
            device = self.resolve(args[1] if len(args) > 1 else kwargs.pop("device", "cuda"))
            return self._moved(args[0], args[0], device)
        if func is torch.Tensor.to:  # to(device, dtype, non_blocking, copy), to(dtype, ...), to(tensor, ...)
            device, flags = None, []
            for a in args[1:]:
                if isinstance(a, (str, int, torch.device)) and not isinstance(a, bool):
                    device = self.resolve(a)
                elif isinstance(a, torch.dtype):
                    kwargs["dtype"] = a
                elif isinstance(a, torch.Tensor):
                    device, kwargs["dtype"] = self.device_of(a), a.dtype
                elif isinstance(a, bool):
                    flags.append(a)
            kwargs.update(zip(("non_blocking", "copy"), flags))
            if kwargs.get("device") is not None:
                device = self.resolve(kwargs["device"])
            kwargs.pop("device", None)
            kwargs["dtype"] = kwargs.get("dtype") or args[0].dtype
            out = func(args[0], **kwargs)
            return self._moved(args[0], out, self.device_of(args[0]) if device is None else device)
        if kwargs.get("device") is not None:  # factories: torch.zeros(..., device=...), x.new_zeros(...)
            device = self.resolve(kwargs.pop("device"))
            return self._tag(func(*args, **kwargs), device)
        if func in _ACROSS:
            return func(*args, **kwargs)
        checked = args[:1] if func is torch.Tensor.__getitem__ else args  # CUDA takes CPU index tensors
        tensors = [t for t in tree_flatten((checked, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {
            self.device_of(t)
            for t in tensors
            if func in _STRICT or not (t.dim() == 0 and self.device_of(t) == CPU) or len(tensors) == 1
        }
        if len(devices) > 1:
            name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
            raise DeviceMix(f"{name}: tensors on {sorted(map(str, devices))}")
        out = func(*args, **kwargs)
        device = next(iter(devices), CPU)
        if device != CPU:
            self._tag(out, device)
        return out


class FakeNCCL:
    """Collectives as NCCL takes them (see the module's docstring)."""

    def __init__(self, mode: LogicalDevices):
        self.mode = mode
        self.calls: list[str] = []

    def _check(self, name: str, tensors) -> None:
        expected = torch.device("cuda", self.mode.cuda.current_device())
        for t in tensors:
            if self.mode.device_of(t) != expected:
                raise DeviceMix(f"NCCL {name}: a tensor on {self.mode.device_of(t)}, expected {expected}")
        self.calls.append(name)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self._check("all_reduce", [tensor])

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        self._check("broadcast", [tensor])

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        self._check("all_gather", [tensor, *tensor_list])
        for out in tensor_list:
            out.copy_(tensor)

    def all_gather_object(self, object_list, obj, group=None):
        object_list[:] = [obj] * len(object_list)

    def patches(self) -> list[tuple[object, str, object]]:
        from megatron.core import parallel_state as mpu

        two = lambda *a, **k: 2  # noqa: E731
        zero = lambda *a, **k: 0  # noqa: E731
        return [
            (dist, "is_initialized", lambda: True),
            (dist, "get_backend", lambda group=None: "nccl"),
            (dist, "get_world_size", two),
            (dist, "get_rank", zero),
            (dist, "get_process_group_ranks", lambda group: [0, 1]),
            (dist, "all_reduce", self.all_reduce),
            (dist, "broadcast", self.broadcast),
            (dist, "all_gather", self.all_gather),
            (dist, "all_gather_object", self.all_gather_object),
            (mpu, "get_data_parallel_world_size", two),
            (mpu, "get_data_parallel_rank", zero),
            (mpu, "get_data_parallel_group", lambda *a, **k: "dp-group"),
            (mpu, "get_model_parallel_group", lambda *a, **k: "mp-group"),
        ]


@contextlib.contextmanager
def gpu_path(monkeypatch):
    """(LogicalDevices, FakeNCCL) active: this process is rank 0 of 2 on GPU `LOCAL_RANK`."""
    cuda = FakeCuda()
    mode = LogicalDevices(cuda)
    nccl = FakeNCCL(mode)
    for owner, name, value in [
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "is_initialized", lambda: True),
        (torch.cuda, "current_device", cuda.current_device),
        (torch.cuda, "set_device", cuda.set_device),
        (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
        *nccl.patches(),
    ]:
        monkeypatch.setattr(owner, name, value)
    run = threading.Thread.run

    def run_checked(thread):  # torch function modes are per thread: threads started here get this one
        with mode:
            run(thread)

    monkeypatch.setattr(threading.Thread, "run", run_checked)
    cuda.set_device(LOCAL_RANK)  # as runtime/distributed.initialize does
    with mode:
        yield mode, nccl
