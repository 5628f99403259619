"""Checkpoints through megatron dist_checkpointing (reshardable across TP/PP).

Layout of a training checkpoint directory `iter_000004/`:
  model + optimizer shards (dist_checkpointing), trainer_state.pt (pool, counters, history;
  written by rank 0: the pool is replicated), rng_rank{N}.pt (every rank's RNG states).
Every save goes to `<name>.tmp` and is renamed into place only after every rank finished,
so a crash mid-save leaves the previous checkpoint intact and the partial one is ignored.
"""

import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

_ITER_DIR = re.compile(r"^iter_(\d{6})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory."""


def _agree_ok(ok: bool) -> bool:
    """True only if every rank's step succeeded (so all ranks raise together, none hangs)."""
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def _atomic_save(directory: str, write) -> None:
    """Run write(tmp_dir) on every rank, then publish tmp_dir as `directory`."""
    tmp = directory.rstrip("/") + ".tmp"
    error = None
    if dist.get_rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            error = err
    if not _agree_ok(error is None):
        raise CheckpointError(f"cannot create checkpoint directory {tmp}: {error or 'failed on another rank'}")
    try:
        write(tmp)
    except Exception as err:  # disk full, permissions, a failing writer: every rank must hear of it
        error = err
    if not _agree_ok(error is None):
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {directory} failed ({error or 'on another rank'}); "
                              f"earlier checkpoints are untouched")
    if dist.get_rank() == 0:
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    dist.barrier()


def save_model(module, directory: str) -> None:
    from megatron.core import dist_checkpointing

    _atomic_save(directory, lambda tmp: dist_checkpointing.save(module.sharded_state_dict(), tmp))


def load_model(module, directory: str) -> None:
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model checkpoint directory {directory} does not exist")
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), directory))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training_checkpoint(directory: str, policy, optimizer, trainer_state: dict) -> None:
    from megatron.core import dist_checkpointing

    def write(tmp: str) -> None:
        model_sd = policy.sharded_state_dict()
        dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, tmp)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
        if dist.get_rank() == 0:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))

    _atomic_save(directory, write)


def load_training_checkpoint(directory: str, policy, optimizer) -> dict:
    """Load model and optimizer (resharded to this layout) and this rank's RNG states;
    return the trainer state."""
    from megatron.core import dist_checkpointing

    model_sd = policy.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}, directory)
    policy.load_state_dict(loaded["model"])
    optimizer.load_sharded(loaded["optimizer"])
    rng_file = os.path.join(directory, f"rng_rank{dist.get_rank()}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False)


def checkpoint_path(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:06d}")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first (`.tmp` leftovers are not complete)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _ITER_DIR.match(n))
    return [os.path.join(root, n) for n in names]


def prune_checkpoints(root: str, keep_last: int) -> None:
    if dist.get_rank() == 0 and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):
            if name.endswith(".tmp"):  # left by a crash during an earlier save
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    dist.barrier()
