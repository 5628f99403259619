"""Which pool records form each global batch: an endless stream of shuffled epochs.

Iteration `it` trains `epochs_per_iteration` epochs' worth of records as whole global
batches; a remainder that does not fill a batch is carried into the next iteration's first
batch, so no record is left out for good (a 40-record set with batches of 32 trains records
0-31 of epoch 0, then 32-39 of epoch 0 with 24 of epoch 1, ...). Pure function of the seed
and the iteration: a resumed run draws the same batches."""

import torch

from nemo_optune.runtime.seeds import mix_seed


def iteration_batches(
    num_records: int, global_batch_size: int, epochs_per_iteration: int, iteration: int, seed: int
) -> list[torch.Tensor]:
    """The global batches (pool indices) of one iteration: the batches whose last record falls
    in this iteration's share of the stream."""
    per_iteration = epochs_per_iteration * num_records
    first = iteration * per_iteration // global_batch_size
    stop = (iteration + 1) * per_iteration // global_batch_size
    epochs = {}

    def order(epoch: int) -> torch.Tensor:
        if epoch not in epochs:
            epochs[epoch] = torch.randperm(
                num_records, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 7))
            )
        return epochs[epoch]

    batches = []
    for b in range(first, stop):
        positions = torch.arange(b * global_batch_size, (b + 1) * global_batch_size)
        batches.append(torch.stack([order(int(p) // num_records)[int(p) % num_records] for p in positions]))
    return batches


def records_left_untrained(num_records: int, global_batch_size: int, epochs_per_iteration: int, iterations: int) -> int:
    """How many records of the run's last pass no batch reaches: each iteration's remainder
    carries into the next one (iteration_batches), the run's last one has no next."""
    return iterations * epochs_per_iteration * num_records % global_batch_size


def iteration_window(num_prompts: int, per_iteration: int | None, iteration: int, seed: int) -> torch.Tensor:
    """The pool indices iteration `iteration` works on: all of them, or window `iteration` of a
    stream of shuffled passes over the pool, each pass cut into num_prompts // per_iteration
    windows (the pass's remaining prompts wait for a later pass). Pure function of the seed."""
    if per_iteration is None:
        return torch.arange(num_prompts)
    windows = num_prompts // per_iteration
    order = torch.randperm(
        num_prompts, generator=torch.Generator().manual_seed(mix_seed(seed, iteration // windows, 11))
    )
    start = (iteration % windows) * per_iteration
    return order[start : start + per_iteration]


def micro_batch_size_for(share: int, cap: int) -> int:
    """The largest micro-batch size <= `cap` that splits a rank's `share` into equal parts
    (equal shapes keep pipeline-parallel sends uniform): 32 pairs at cap 64 -> 32, 64 at 16 -> 16,
    48 at 32 -> 24. Makes trainer.micro_batch_size a cap that fits any DP size."""
    return max(size for size in range(1, min(share, cap) + 1) if share % size == 0)


def pairs_to_train(valid: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Positions (ascending) of a rank's share of a global batch to train: every pair with a
    training signal (`valid` > 0), topped up with pairs without one (tied rewards) to whole
    micro-batches of `micro_batch_size`, at least one so that every rank takes part in the step.
    A pair without signal adds exactly 0 to the loss and the gradient; late in training most
    pairs are tied, and leaving out whole micro-batches of them saves their forward and backward."""
    with_signal = valid > 0
    count = max(1, -(-int(with_signal.sum()) // micro_batch_size)) * micro_batch_size
    signal_first = torch.argsort((~with_signal).to(torch.int8), stable=True)
    return signal_first[: min(count, len(valid))].sort().values


def token_budget_groups(
    lengths: torch.Tensor, max_rows: int, token_budget: int, rows_per_item: int = 1
) -> list[torch.Tensor]:
    """Positions of `lengths` (one item each, `rows_per_item` sequences of that length) in
    micro-batches bounded by padded tokens: items sorted by length (stable), consecutive ones
    grouped while items <= max_rows and rows x longest <= token_budget. An item longer than
    the budget goes alone. Similar lengths share a micro-batch, so trimming each micro-batch to
    its longest sequence leaves little padding."""
    order = torch.argsort(lengths, stable=True)
    groups, start = [], 0
    for end in range(1, len(order) + 1):
        longest = int(lengths[order[end - 1]])
        if end - start > max_rows or (end - start) * rows_per_item * longest > token_budget:
            if end - 1 > start:
                groups.append(order[start : end - 1])
                start = end - 1
    if len(order):
        groups.append(order[start:])
    return groups
