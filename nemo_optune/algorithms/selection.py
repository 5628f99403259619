"""Which prompts to regenerate: OPTune's lowest-key top-rho and the baselines."""

import math

import torch


def selection_keys(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, key: str) -> torch.Tensor:
    """chosen -> r_w, mean -> (r_w + r_l) / 2, gap -> r_w - r_l."""
    if key == "chosen":
        return chosen_rewards
    if key == "mean":
        return (chosen_rewards + rejected_rewards) / 2
    if key == "gap":
        return chosen_rewards - rejected_rewards
    raise ValueError(f"unknown selection key {key!r} (chosen | mean | gap)")


def first_in_line(keys: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """Keys with the entries marked in `first` set to -inf, so the lowest-key selection takes
    them before any other (among themselves: the lower index first); None: keys unchanged."""
    return keys if first is None else keys.masked_fill(first, float("-inf"))


def regenerate_first(
    valid: torch.Tensor, ages: torch.Tensor, ties_first: bool, max_age: int | None
) -> torch.Tensor | None:
    """Which stored pairs go first in OPTune's selection (ours, beyond the paper): with
    `ties_first` a pair without a preference (valid False: its K rewards tied), which trains
    nothing while it stays; with `max_age` a pair sampled more than max_age iterations ago
    (`ages`), whose margin the policy has long separated. None when neither applies."""
    first = ~valid if ties_first else torch.zeros_like(valid)
    if max_age is not None:
        first = first | (ages > max_age)
    return first if (ties_first or max_age is not None) else None


def num_selected(num_prompts: int, rho: float) -> int:
    """ceil(rho * N) in [1, N]; the epsilon keeps 0.5 * 256 at 128, not 129, under float noise."""
    return max(1, min(num_prompts, math.ceil(rho * num_prompts - 1e-9)))


def select_lowest(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` smallest keys, ascending; ties go to the lower index."""
    order = torch.sort(keys, stable=True).indices
    return order[:count].sort().values


def select_random(num_prompts: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform random subset of `count` indices, ascending; reproducible through `generator`."""
    return torch.randperm(num_prompts, generator=generator)[:count].sort().values


def select_prompts(
    strategy: str,
    count: int,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    key: str,
    generator: torch.Generator,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """lowest: OPTune (worst data first); smallest_gap: least informative pairs first;
    random: uniform; all: every prompt (online DPO). lowest and smallest_gap take the entries
    marked in `first` before the others (first_in_line)."""
    n = chosen_rewards.shape[0]
    if strategy in ("lowest", "smallest_gap"):
        keys = selection_keys(chosen_rewards, rejected_rewards, key if strategy == "lowest" else "gap")
        return select_lowest(first_in_line(keys, first), count)
    if strategy == "random":
        return select_random(n, count, generator)
    if strategy == "all":
        return torch.arange(n)
    raise ValueError(f"unknown selection strategy {strategy!r} (lowest | random | smallest_gap | all)")


def balanced_shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous part of `indices`; part sizes differ by at most one."""
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]
