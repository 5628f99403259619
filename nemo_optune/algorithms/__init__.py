"""The math of OPTune, online DPO and HyPO: pure functions on tensors, no megatron import."""

from nemo_optune.algorithms.adaptive import adaptive_rho
from nemo_optune.algorithms.losses import (
    dpo_loss,
    dpo_margin,
    ipo_loss,
    preference_loss,
    reward_gap_weights,
    sft_nll,
    weighted_mean,
)
from nemo_optune.algorithms.pairing import best_worst_pairs
from nemo_optune.algorithms.rloo_kl import rloo_kl_loss, rloo_kl_loss_sum
from nemo_optune.algorithms.selection import (
    balanced_shard,
    first_in_line,
    num_selected,
    regenerate_first,
    select_lowest,
    select_prompts,
    select_random,
    selection_keys,
)

__all__ = [
    "adaptive_rho",
    "balanced_shard",
    "best_worst_pairs",
    "dpo_loss",
    "dpo_margin",
    "first_in_line",
    "ipo_loss",
    "num_selected",
    "preference_loss",
    "regenerate_first",
    "reward_gap_weights",
    "rloo_kl_loss",
    "rloo_kl_loss_sum",
    "select_lowest",
    "select_prompts",
    "select_random",
    "selection_keys",
    "sft_nll",
    "weighted_mean",
]
