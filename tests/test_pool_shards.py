"""The sharded prompt pool (data/pool.py) against a replicated one at DP 1, 2 and 4: token rows
routed to their owners, a global batch's rows fetched by its trainers, checkpoint shards
reloaded at another DP size, and the bytes a rank keeps. The ranks are threads here, with
an in-process all-to-all; tests/test_parallel.py runs the trainer over gloo."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nemo_optune.algorithms import balanced_shard
from nemo_optune.data.pool import (
    TOKEN_FIELDS,
    PromptPool,
    exchange_rows,
    owned_prompts,
    owner_of,
    pool_bytes_per_rank,
)

N, R = 23, 5  # a pool size no DP size divides


def on_ranks(dp: int, fn) -> list:
    """fn(rank, transport) on `dp` threads joined by an all-to-all like all_to_all_over_dp."""
    barrier, outbox = threading.Barrier(dp, timeout=30), {}

    def transport_of(rank: int):
        def transport(send, send_counts, recv_counts):
            outbox[rank] = send.split(send_counts)
            barrier.wait()
            received = [outbox[source][rank] for source in range(dp)]
            barrier.wait()  # all have read before a next exchange overwrites the outbox
            assert [len(r) for r in received] == recv_counts
            return torch.cat(received)

        return transport

    with ThreadPoolExecutor(dp) as pool:
        return [f.result() for f in [pool.submit(fn, r, transport_of(r)) for r in range(dp)]]


def replicated_pool(seed: int = 0) -> PromptPool:
    g = torch.Generator().manual_seed(seed)
    pool = PromptPool.empty(N, R)
    pool.update(
        torch.arange(N),
        {
            "chosen_tokens": torch.randint(1, 100, (N, R), generator=g),
            "rejected_tokens": torch.randint(1, 100, (N, R), generator=g),
            "chosen_lengths": torch.randint(1, R, (N,), generator=g),
            "chosen_rewards": torch.rand(N, generator=g),
            "refreshed_at": torch.randint(0, 3, (N,), generator=g),
        },
    )
    return pool


def shard_of(full: PromptPool, rank: int, dp: int) -> PromptPool:
    shard = PromptPool.empty(N, R, rank, dp)
    shard.load_state_dict(full.state_dict())
    return shard


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_rank_keeps_only_its_block_and_fewer_bytes(dp):
    full = replicated_pool()
    shards = [shard_of(full, r, dp) for r in range(dp)]
    assert torch.equal(torch.cat([s.held for s in shards]), torch.arange(N))
    for r, shard in enumerate(shards):
        assert torch.equal(owner_of(shard.held, N, dp), torch.full((len(shard.held),), r))
        for name, value in shard.rows(shard.held).items():
            assert torch.equal(value, full.rows(shard.held)[name]), name
        if dp > 1:
            with pytest.raises(KeyError, match="another data-parallel rank"):
                shard.rows(torch.arange(N))
    # The estimate the dry run prints is the real tensors' bytes (rank 0 holds the largest block).
    assert pool_bytes_per_rank(N, R, dp) == shards[0].nbytes() == max(s.nbytes() for s in shards)
    if dp > 1:
        assert pool_bytes_per_rank(N, R, dp) < pool_bytes_per_rank(N, R, dp // 2)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_new_pairs_reach_their_owners_and_a_batch_reaches_its_trainers(dp):
    """Regeneration: each rank generates its dp_share of the selected prompts; after the
    exchange every owner's rows equal the replicated pool's. Training: each rank gets its
    slice of a global batch, in batch order, from whichever ranks own the rows."""
    full, fresh = replicated_pool(0), replicated_pool(1)
    selected = torch.tensor([0, 3, 4, 5, 11, 12, 13, 14, 21, 22])
    full.update(selected, {name: fresh.rows(selected)[name] for name in TOKEN_FIELDS})
    before = replicated_pool(0)
    batch = torch.randperm(N, generator=torch.Generator().manual_seed(3))[: 4 * 4]

    def rank_fn(rank, transport):
        shard = shard_of(before, rank, dp)
        generated = balanced_shard(selected, rank, dp)  # dp_share
        new = [fresh.rows(generated)[name] for name in TOKEN_FIELDS]
        owned = [selected[owner_of(selected, N, dp) == r] for r in range(dp)]
        rows = exchange_rows(new, selected, owned, rank, transport)
        shard.update(owned[rank], dict(zip(TOKEN_FIELDS, rows)))
        shares = list(batch.tensor_split(dp))
        fetched = exchange_rows([getattr(shard, n) for n in TOKEN_FIELDS], torch.arange(N), shares, rank, transport)
        return shard, shares[rank], fetched

    for shard, share, fetched in on_ranks(dp, rank_fn):
        for name, value in zip(TOKEN_FIELDS, fetched):
            assert torch.equal(value, full.rows(share)[name]), name
        view = shard.with_tokens(share, dict(zip(TOKEN_FIELDS, fetched)))
        for name, value in view.rows(share).items():
            assert torch.equal(value, full.rows(share)[name]), name
        assert torch.equal(shard.rows(shard.held)["chosen_tokens"], full.rows(shard.held)["chosen_tokens"])


@pytest.mark.parametrize("saved_dp,loaded_dp", [(4, 2), (2, 4), (3, 1)])
def test_checkpoint_shards_load_at_another_dp_size(saved_dp, loaded_dp):
    full = replicated_pool()
    files = [shard_of(full, r, saved_dp).state_dict() for r in range(saved_dp)]
    scalars = PromptPool.empty(N, R, 0, saved_dp).state_dict(tokens=False)
    assert not set(TOKEN_FIELDS) & set(scalars)
    for rank in range(loaded_dp):
        pool = PromptPool.empty(N, R, rank, loaded_dp)
        pool.load_state_dict(files[0])  # scalars (every file has them) and the rows it shares
        for shard in files[1:]:
            pool.load_tokens(shard)
        assert torch.equal(pool.held, owned_prompts(N, rank, loaded_dp))
        for name, value in pool.rows(pool.held).items():
            assert torch.equal(value, full.rows(pool.held)[name]), name
