"""Process-group set-up: single process by default, torchrun/Slurm environment when present."""

import dataclasses
import datetime
import os
import random
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from nemo_optune.runtime.cpu_shim import apply_cpu_shim
from nemo_optune.runtime.launcher_watchdog import watch_launcher
from nemo_optune.runtime.lost_ranks import start_heartbeat, stop_heartbeat


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def as_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": self.world_size}


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun or Slurm (srun one task per GPU)."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    return rank, local_rank, world


_megatron_groups: tuple | None = None  # (tp, pp, timeout) of the groups megatron holds


def initialize(tp: int, pp: int, seed: int, collective_timeout_seconds: float = 600.0) -> Layout:
    """Initialise torch.distributed and megatron's parallel state; idempotent per process. A
    collective that waits longer than the timeout on a peer fails (gloo and NCCL; NCCL's
    watchdog then aborts the communicator) rather than hanging the job."""
    global _megatron_groups
    watch_launcher()  # a rank whose torchrun/srun died stops instead of finishing the run
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    on_cpu = apply_cpu_shim()
    rank, local_rank, world = world_from_env()
    new_world = not dist.is_initialized()
    if new_world:
        if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A rendezvous with nobody: a fresh local port, never one inherited from a parent
            # job. (Under torchrun, even with one process, its agent's store is at MASTER_PORT.)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        elif "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_PORT is not set: launch multi-process runs with torchrun or srun")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if not on_cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=collective_timeout_seconds),
        )
    groups = (tp, pp, collective_timeout_seconds)
    if new_world or not (mpu.model_parallel_is_initialized() and _megatron_groups == groups):
        # Re-creating the same groups would leak them (megatron's destroy forgets its groups
        # without destroying them: every gloo group keeps its threads); runs in one process
        # with the same layout, such as a test session's, reuse them.
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        # megatron's groups take the same timeout (its argument is in minutes; a float works: timedelta).
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=collective_timeout_seconds / 60,
        )
        _megatron_groups = groups
    start_heartbeat()  # names a lost rank if a collective fails (runtime/lost_ranks.py)
    seed_everything(seed)
    # The inference tracker avoids forking CUDA RNG state, which does not exist on CPU.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu)
    return Layout(
        world_size=world,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
    )


EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"


def free_port() -> int:
    """A free local port for a rendezvous store, drawn below the OS's ephemeral range. A port the
    OS picks (bind to 0) is an ephemeral one: between its release and the store's bind, gloo's
    own outgoing connections (or another run's) may be handed it, and the store fails with
    EADDRINUSE."""
    try:
        with open(EPHEMERAL_PORTS) as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    draw = random.Random(os.getpid() ^ time.time_ns())  # not the seeded global generator
    for _ in range(64):
        port = draw.randrange(10000, max(ephemeral_low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # nothing free below the range: what the OS gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as mpu

    stop_heartbeat()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where a tensor handed to a collective must be: NCCL (the GPU path's backend, which
    megatron's groups inherit) takes tensors on the current CUDA device only, gloo CPU tensors.
    The one rule for values kept on the CPU (rewards, pool rows, metrics, stop flags): each
    collective moves them here and hands the result back on the caller's device."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows_over_dp(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate each DP rank's rows in rank order; rank r holds counts[r] rows (on `local`'s
    device).

    Rows are padded to max(counts) because all_gather needs equal shapes."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group()
    if len(counts) == 1:
        return local
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=comm_device())
    padded[: local.shape[0]] = local.to(padded.device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(local.device)


def all_to_all_over_dp(send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """All-to-all over the DP group: this rank's `send` rows, send_counts[r] of them to DP rank r
    in rank order; returns the rows received, recv_counts[r] from DP rank r, in rank order."""
    from megatron.core import parallel_state as mpu

    if len(send_counts) == 1:
        return send
    received = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=comm_device())
    dist.all_to_all_single(
        received, send.to(comm_device()), recv_counts, send_counts, group=mpu.get_data_parallel_group()
    )
    return received.to(send.device)


def dp_share(indices: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, list[int]]:
    """This DP rank's balanced part of `indices`, and every DP rank's part size (for
    gather_rows_over_dp)."""
    from nemo_optune.algorithms import balanced_shard

    return (
        balanced_shard(indices, layout.dp_rank, layout.dp),
        [len(balanced_shard(indices, r, layout.dp)) for r in range(layout.dp)],
    )


def sum_over_dp(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as mpu

    if mpu.get_data_parallel_world_size() == 1:
        return values.clone()
    summed = values.to(comm_device(), copy=True)
    dist.all_reduce(summed, group=mpu.get_data_parallel_group())
    return summed.to(values.device)


def first_failure(error: BaseException | str | None) -> tuple[int, type, str] | None:
    """Collective: (rank, error type, message) of the lowest rank that failed, or None if no
    rank did, the same on every rank (so all ranks act together and none is left waiting in a
    collective the failed one will never join)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None if error is None else (0, type(error), str(error))
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
    return next(((rank, *e) for rank, e in enumerate(errors) if e is not None), None)


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Collective: if any rank failed, raise the first failed rank's error on every rank."""
    first = first_failure(error)
    if first is not None:
        failed_rank, kind, message = first
        if failed_rank == (dist.get_rank() if dist.is_initialized() else 0):
            raise error  # this rank's own error, with its traceback
        raise kind(message)
