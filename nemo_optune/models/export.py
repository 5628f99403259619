"""Full (unsharded) tensors from a TP/PP-sharded megatron model.

Uses the model's dist-checkpointing metadata (each ShardedTensor knows its global shape and
offset), so it is layout-agnostic by construction. It is the common core of weight export
for external rollout engines, of Hugging Face import/export (models/hf_io.py) and of the
cross-layout equivalence tests.
"""

import dataclasses

import torch
import torch.distributed as dist

from nemo_optune.runtime.distributed import comm_device


def is_main_replica(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(i == 0 for i in ids)


def local_shards(module, of: str = "param"):
    """(ShardedTensor, local value) for this rank's shards of every parameter: the parameter
    itself (of="param", writable in place) or its gradient (of="grad")."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = {id(p): p for p in module.parameters()}
    for sh in nested_values(module.sharded_state_dict()):
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)) or id(sh.data) not in params:
            continue  # buffers and extra state are not parameters
        value = sh.data if of == "param" else params[id(sh.data)].grad
        if value is None:
            continue
        if isinstance(sh, ShardedTensorFactory):
            # A fused SwiGLU fc1 holds [gate; up] rows of this TP rank: the factory splits it
            # into its two global halves (views of `value`).
            for part in nested_values(dataclasses.replace(sh, data=value).build()):
                yield part, part.data
        else:
            yield sh, value


def shard_region(sh) -> tuple[slice, ...]:
    """Where a local shard sits in its global tensor (prepended layer axes included)."""
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(slice(o, o + s) for o, s in zip(sh.global_offset, shape))


def gather_full_tensors(module, of: str = "param") -> dict[str, torch.Tensor]:
    """{global key: full tensor} of the parameters (of="param") or their gradients
    (of="grad"), assembled on every rank. Collective: every rank must call it."""
    local = {}
    for sh, value in local_shards(module, of):
        # Layers of one stage share a key (stacked along a prepended axis): fill, don't replace.
        full = local.setdefault(sh.key, torch.zeros(sh.global_shape, dtype=torch.float32))
        if is_main_replica(sh.replica_id):  # count replicated shards (TP-duplicate, DP) once
            region = shard_region(sh)
            full[region] = value.detach().float().cpu().reshape(full[region].shape)
    # Every rank needs the same key set for the sum: agree on the union first.
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, {k: tuple(v.shape) for k, v in local.items()})
    union = {}
    for part in keys:
        union.update(part)
    out = {}
    for key in sorted(union):
        tensor = local.get(key, torch.zeros(union[key])).to(comm_device())
        dist.all_reduce(tensor)
        out[key] = tensor.cpu()
    return out
