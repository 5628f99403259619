"""Preference losses and reward-gap weights on plain tensors (no megatron)."""

import torch
import torch.nn.functional as F


def dpo_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """Delta = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], per pair [B]."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * Delta), per pair."""
    return -F.logsigmoid(beta * margin)


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """(Delta - 1 / (2 beta))^2, per pair (Azar et al.; beta plays the role of tau)."""
    return (margin - 1.0 / (2.0 * beta)) ** 2


def preference_loss(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair loss of the configured type: dpo_loss or ipo_loss."""
    if loss_type == "dpo":
        return dpo_loss(margin, beta)
    if loss_type == "ipo":
        return ipo_loss(margin, beta)
    raise ValueError(f"unknown loss_type {loss_type!r} (dpo | ipo)")


def reward_gap_weights(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, scheme: str, beta_w: float, cap: float | None
) -> torch.Tensor:
    """Raw OPTune pair weights w = f(beta_w * (r_w - r_l)), capped; no gradient.

    f: none -> 1, linear -> x, exp -> e^x, sigmoid -> sigma(x). A wider reward gap marks a
    more reliable preference, so it weighs more; the cap stops one pair dominating a batch."""
    x = (beta_w * (chosen_rewards - rejected_rewards)).detach().float()
    if scheme == "none":
        w = torch.ones_like(x)
    elif scheme == "linear":
        w = x
    elif scheme == "exp":
        w = torch.exp(x)
    elif scheme == "sigmoid":
        w = torch.sigmoid(x)
    else:
        raise ValueError(f"unknown weighting {scheme!r} (none | linear | exp | sigmoid)")
    return w.clamp(max=cap) if cap is not None else w


def weighted_mean(
    per_pair_loss: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, weight_total: float
) -> torch.Tensor:
    """sum_i mask_i w_i loss_i / weight_total.

    `weight_total` is sum(mask * w) over the GLOBAL batch, so summing this over micro-batches
    and data-parallel ranks gives the global weighted mean exactly."""
    contribution = (per_pair_loss * weights * mask).sum()
    if weight_total == 0:
        return contribution * 0.0  # keeps the graph valid for backward
    return contribution / weight_total


def sft_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """-log pi(y_w | x) / |y_w|: length-normalised NLL of the chosen response, per pair."""
    return -chosen_logps / chosen_lengths.clamp(min=1)
