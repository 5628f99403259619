"""Best-vs-worst pairing of K scored samples per prompt."""

import torch


def best_worst_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards [N, K] -> (chosen index [N], rejected index [N], valid [N]).

    Ties resolve to the first occurrence. A row whose K rewards are all equal carries no
    preference signal: valid is False there and the caller leaves it out of the loss."""
    bad = (~torch.isfinite(rewards)).any(dim=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {rewards.shape[0]} prompts have non-finite rewards")
    best = rewards.max(dim=1, keepdim=True).values
    worst = rewards.min(dim=1, keepdim=True).values
    # argmax of a boolean row returns its first True: deterministic first-occurrence ties.
    chosen = (rewards == best).int().argmax(dim=1)
    rejected = (rewards == worst).int().argmax(dim=1)
    return chosen, rejected, best.squeeze(1) > worst.squeeze(1)
