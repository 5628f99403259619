"""The micro-batch contracts: what the trainers build and the model's schedule
(models/gpt_optune.py) reads. Tensors live on the CPU; the schedule moves them."""

from collections.abc import Callable
from typing import TypedDict, TypeVar

import torch


class _Sequences(TypedDict):
    tokens: torch.Tensor  # [rows, width] long, right-padded
    loss_mask: torch.Tensor  # [rows, width] float: 1 at positions whose label is a response token


class SequenceMicroBatch(_Sequences, total=False):
    """Rows the model trains on (SFT) or scores. The packing keys are set by
    data/packing.packed_pair_sequences: one row per preference pair."""

    positions: torch.Tensor  # [rows, width] long: each token's position in its sequence
    rejected_mask: torch.Tensor  # [rows, width] float: the rejected response's label positions
    pack_layout: torch.Tensor  # [rows, 3] long: prompt length, bridge index, row length


class _Pairs(SequenceMicroBatch):
    indices: torch.Tensor  # [n] pool indices of the pairs
    ref_chosen_logps: torch.Tensor  # [n] the reference's summed response log-probs
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # [n] float
    weights: torch.Tensor  # [n] the pairs' weights
    valid: torch.Tensor  # [n] float: 1 for pairs that count
    weight_total: float  # the global batch's normaliser (every micro-batch on every rank)


class PairMicroBatch(_Pairs, total=False):
    """n preference pairs: rows chosen then rejected (or n packed rows), then, for HyPO,
    k policy samples per pair's prompt (trainers/hypo_kl.py)."""

    sample_ref_logps: torch.Tensor  # [n * k] the samples' reference log-probs


MB = TypeVar("MB", bound=SequenceMicroBatch)
# A loss over one micro-batch: (micro_batch, per-sequence response log-probs) -> (loss, metrics).
# The loss must already be scaled by the GLOBAL normaliser, so that summing it over
# micro-batches and DP ranks gives the global-batch loss (megatron's calculate_per_token_loss).
MicroBatchLoss = Callable[[MB, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
