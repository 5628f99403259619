"""Model checkpoints through megatron dist_checkpointing (reshardable across TP/PP).

Writes go to a temporary sibling directory that is renamed into place only once every rank
has finished, so a crash mid-save never leaves a half-written checkpoint under the final name.
"""

import os
import shutil

import torch.distributed as dist


def save_model(module, directory: str) -> None:
    from megatron.core import dist_checkpointing

    tmp = directory.rstrip("/") + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(module.sharded_state_dict(), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    dist.barrier()


def load_model(module, directory: str) -> None:
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model checkpoint directory {directory} does not exist")
    state = dist_checkpointing.load(module.sharded_state_dict(), directory)
    module.load_state_dict(state)
