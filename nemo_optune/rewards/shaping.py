"""Reward shaping, applied once by the trainer to the weighted total of the reward sources
(docs/data_sources.md): reward.missing_eos_penalty is subtracted from a response cut at
generation.max_new_tokens (TRL's missing_eos_penalty), reward.length_penalty from each response
token beyond reward.target_length (the stop token counts, as in rollout/completions/*)."""

import torch

from nemo_optune.config import RewardConfig


def shape_rewards(
    rewards: torch.Tensor,
    truncated: torch.Tensor,
    lengths: torch.Tensor,
    missing_eos_penalty: float | None,
    length_penalty: float,
    target_length: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(shaped rewards [n], each enabled penalty [n] by name, as subtracted). A NaN reward stays NaN."""
    penalties = {}
    if missing_eos_penalty:
        penalties["missing_eos_penalty"] = missing_eos_penalty * truncated.to(rewards.dtype)
    if length_penalty and target_length is not None:
        penalties["length_penalty"] = length_penalty * (lengths.to(rewards.dtype) - target_length).clamp(min=0)
    return rewards - sum(penalties.values(), torch.zeros_like(rewards)), penalties


def shaping_names(cfg: RewardConfig) -> list[str]:
    """The penalties shape_rewards applies under this config, in its order."""
    on = {"missing_eos_penalty": bool(cfg.missing_eos_penalty), "length_penalty": bool(cfg.length_penalty)}
    return [name for name, enabled in on.items() if enabled]
