"""Full (unsharded) tensors from a TP/PP-sharded megatron model.

Uses the model's dist-checkpointing metadata (each ShardedTensor knows its global shape and
offset), so it is layout-agnostic by construction. It is the common core of weight export
for external rollout engines and of the cross-layout equivalence tests; the HF name mapping
sits on top of it in a later issue.
"""

import torch
import torch.distributed as dist


def _is_main_replica(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(i == 0 for i in ids)


def gather_full_tensors(module, of: str = "param") -> dict[str, torch.Tensor]:
    """{global key: full tensor} of the parameters (of="param") or their gradients
    (of="grad"), assembled on every rank. Collective: every rank must call it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    sharded, _ = extract_sharded_tensors(module.sharded_state_dict())
    params = {id(p): p for p in module.parameters()}
    local = {}
    for sh in sharded.values():
        if not isinstance(sh, ShardedTensor) or id(sh.data) not in params:
            continue  # buffers and extra state are not parameters
        value = sh.data if of == "param" else params[id(sh.data)].grad
        if value is None:
            continue
        # Layers of one stage share a key (stacked along a prepended axis): fill, don't replace.
        full = local.setdefault(sh.key, torch.zeros(sh.global_shape, dtype=torch.float32))
        if _is_main_replica(sh.replica_id):  # count replicated shards (TP-duplicate, DP) once
            shape = (1,) * sh.prepend_axis_num + tuple(value.shape)
            region = tuple(slice(o, o + s) for o, s in zip(sh.global_offset, shape))
            full[region] = value.detach().float().cpu().reshape(shape)
    # Every rank needs the same key set for the sum: agree on the union first.
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, {k: tuple(v.shape) for k, v in local.items()})
    union = {}
    for part in keys:
        union.update(part)
    out = {}
    for key in sorted(union):
        tensor = local.get(key, torch.zeros(union[key]))
        dist.all_reduce(tensor)
        out[key] = tensor
    return out
