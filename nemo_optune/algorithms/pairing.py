"""Best-vs-worst pairing of K scored samples per prompt."""

import torch


def best_worst_pairs(
    rewards: torch.Tensor, drop_non_finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards [N, K] -> (chosen index [N], rejected index [N], valid [N]).

    Ties resolve to the first occurrence. A row whose K rewards are all equal carries no
    preference signal: valid is False there and the caller leaves it out of the loss.
    Non-finite rewards raise, or with `drop_non_finite` those samples are left out."""
    finite = torch.isfinite(rewards)
    bad = (~finite).any(dim=1)
    if bad.any() and not drop_non_finite:
        raise ValueError(f"{int(bad.sum())} of {rewards.shape[0]} prompts have non-finite rewards")
    best = torch.where(finite, rewards, float("-inf")).max(dim=1, keepdim=True).values
    worst = torch.where(finite, rewards, float("inf")).min(dim=1, keepdim=True).values
    # argmax of a boolean row returns its first True: deterministic first-occurrence ties.
    chosen = ((rewards == best) & finite).int().argmax(dim=1)
    rejected = ((rewards == worst) & finite).int().argmax(dim=1)
    return chosen, rejected, (best > worst).squeeze(1) & (finite.sum(dim=1) >= 2)
