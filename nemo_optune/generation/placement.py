"""Where external rollout engines run at any world size: one engine per data-parallel replica.

The replica's model-parallel group (its TP x PP ranks) has one engine, run by the group's first
rank (TP rank 0 of the first stage; the rank that also scores rewards for the group). All ranks of the
group are given the same prompts (their DP rank's share, dp_share); the leader generates and
broadcasts the rollouts to the others, so the trainer is the same on every rank. The leader is
refitted from its own group's shards (models.hf_io.stream_hf_weights with the group: at TP = PP
= 1 nothing is communicated; otherwise a sum over the group's ranks only, never the world).

Engines on one node share it: on CPU the node's cores are split between them (then between each
engine's own TP workers, vllm_engine.cpu_binding); on a GPU each engine gets its group's devices
on the leader's node."""

import dataclasses
import os
import socket

import torch
import torch.distributed as dist

from nemo_optune.generation.base import Rollouts
from nemo_optune.runtime.distributed import comm_device


@dataclasses.dataclass(frozen=True)
class EnginePlacement:
    leader: int  # the global rank that runs this rank's group's engine
    replica: int  # the engine's index among all engines (its DP replica)
    engines: int  # engines in the world (the DP size)
    slot: int  # the engine's index among the engines on its node
    node_engines: int  # engines on the leader's node (they split its cores)
    devices: tuple[str, ...]  # GPUs: the physical ids of the group's devices on the leader's node (CPU: none)

    @property
    def leads(self) -> bool:
        return self.leader == (dist.get_rank() if dist.is_initialized() else 0)


def place_engines(leaders: list[int], hosts: list[str], devices: list[str | None]) -> list[EnginePlacement]:
    """Every rank's placement from every rank's group leader, host name and physical GPU id
    (None on CPU), indexed by global rank. Pure (tests: any grid)."""
    replicas = sorted(set(leaders))
    placements = []
    for leader in leaders:
        on_node = [r for r in replicas if hosts[r] == hosts[leader]]
        group_devices = [devices[r] for r in range(len(leaders)) if leaders[r] == leader and hosts[r] == hosts[leader]]
        placements.append(
            EnginePlacement(
                leader=leader,
                replica=replicas.index(leader),
                engines=len(replicas),
                slot=on_node.index(leader),
                node_engines=len(on_node),
                devices=tuple(d for d in group_devices if d is not None),
            )
        )
    return placements


def physical_device() -> str | None:
    """This rank's GPU as CUDA_VISIBLE_DEVICES names it (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


def locate_engine(group) -> EnginePlacement:
    """This rank's placement; collective over the world. group: this rank's model-parallel
    group (None: this rank alone)."""
    me = dist.get_rank() if dist.is_initialized() else 0
    leader = me if group is None else min(dist.get_process_group_ranks(group))
    mine = (leader, socket.gethostname(), physical_device())
    described: list = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        described = [None] * dist.get_world_size()
        dist.all_gather_object(described, mine)
    leaders, hosts, devices = (list(column) for column in zip(*described))
    return place_engines(leaders, hosts, devices)[me]


def broadcast_rollouts(
    rollouts: Rollouts | None, error: Exception | None, rows: int, width: int, pad_id: int, group, leader: int
) -> Rollouts:
    """The leader's rollouts (or its error, raised on every rank) on every rank of `group`
    (None: this rank alone). rows x width: their shape, known to every rank from its arguments."""
    if group is None or dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        assert rollouts is not None
        return rollouts
    status = [None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]]
    dist.broadcast_object_list(status, src=leader, group=group)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"the rollout engine on rank {leader} failed: {status[0]}")
    out = rollouts if rollouts is not None else Rollouts.empty(rows, width, pad_id)
    shared = [t.to(comm_device()) for t in (out.response_tokens, out.response_lengths, out.logprobs)]
    for t in shared:
        dist.broadcast(t, src=leader, group=group)
    return Rollouts(*(t.cpu() for t in shared))
