"""Adaptive rho (ours, beyond the paper)."""

import torch


def adaptive_rho(keys: torch.Tensor, target: float, rho_min: float, rho_max: float) -> float:
    """rho = clamp(share of prompts whose key is below `target`, rho_min, rho_max).

    Regenerate as many prompts as still fall short of the target: early on most do and the
    rule behaves like online DPO; as the pool improves it regenerates less, down to rho_min
    (kept above 0 so the pool keeps tracking the moving policy)."""
    below = float((keys < target).float().mean())
    return min(rho_max, max(rho_min, below))
