"""From pool records to the loss: a global batch's weights, its micro-batches (pair
sequences), and the per-micro-batch loss function the model's schedule calls.

Pure torch, no megatron: the trainer, the tests and the parallel harness all go through
these functions, so what is tested is what trains."""

import torch

from nemo_optune import algorithms as alg
from nemo_optune.data.batching import micro_batch_size_for, token_budget_groups
from nemo_optune.data.micro_batch import MicroBatchLoss, PairMicroBatch, SequenceMicroBatch
from nemo_optune.data.packing import packed_pair_sequences
from nemo_optune.data.pool import PromptPool, build_sequences


def global_batch_weights(
    pool: PromptPool, batch: torch.Tensor, weighting: str, weight_beta: float, weight_cap: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(raw weights [B], valid [B] as float, sum of valid weights) over the WHOLE global batch.

    The sum is the normaliser every micro-batch on every DP rank divides by, so the loss is
    the global weighted mean whatever the micro-batch split (every rank holds the pool's scalars)."""
    weights = alg.reward_gap_weights(
        pool.chosen_rewards[batch], pool.rejected_rewards[batch], weighting, weight_beta, weight_cap
    )
    valid = pool.valid[batch].float()
    return weights, valid, float((weights * valid).sum())


def pair_sequences(prompts: list[list[int]], rows: dict, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows, then rejected rows: tokens [2B, width] and loss mask [2B, width]."""
    c_tok, c_mask = build_sequences(prompts, rows["chosen_tokens"], rows["chosen_lengths"], width, pad_id)
    r_tok, r_mask = build_sequences(prompts, rows["rejected_tokens"], rows["rejected_lengths"], width, pad_id)
    return torch.cat([c_tok, r_tok]), torch.cat([c_mask, r_mask])


def preference_micro_batches(
    pool: PromptPool,
    prompt_ids: list[list[int]],
    indices: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    weight_total: float,
    micro_batch_size: int,
    width: int,
    pad_id: int,
    token_budget: int | None = None,
    pack: bool = False,
) -> list[PairMicroBatch]:
    """This rank's share of a global batch (`indices` with their weights) as micro-batches of at
    most `micro_batch_size` pairs; each carries the global normaliser `weight_total`, so the
    grouping changes no gradient. token_budget None: equal parts in batch order. Else pairs
    sorted by length and grouped while the micro-batch's padded tokens (rows x longest row)
    stay within token_budget. pack: one row per pair (packed_pair_sequences), else a chosen
    row and a rejected row per pair."""
    if token_budget is None:
        size = micro_batch_size_for(len(indices), micro_batch_size)
        groups = list(torch.arange(len(indices)).split(size))
    else:
        prompt_lengths = torch.tensor([len(prompt_ids[i]) for i in indices.tolist()], dtype=torch.long)
        chosen, rejected = pool.chosen_lengths[indices].long(), pool.rejected_lengths[indices].long()
        if pack:
            groups = token_budget_groups(prompt_lengths + chosen + 1 + rejected, micro_batch_size, token_budget)
        else:
            groups = token_budget_groups(
                prompt_lengths + torch.maximum(chosen, rejected), micro_batch_size, token_budget, rows_per_item=2
            )
    out: list[PairMicroBatch] = []
    for group in groups:
        idx = indices[group]
        rows = pool.rows(idx)
        prompts = [prompt_ids[i] for i in idx.tolist()]
        if pack:
            sequences = packed_pair_sequences(prompts, rows, 2 * width, pad_id)  # 2 x (prompt + response) >= packed
        else:
            tokens, mask = pair_sequences(prompts, rows, width, pad_id)
            sequences = SequenceMicroBatch(tokens=tokens, loss_mask=mask)
        out.append(
            PairMicroBatch(
                indices=idx,
                **sequences,
                ref_chosen_logps=rows["ref_chosen_logps"],
                ref_rejected_logps=rows["ref_rejected_logps"],
                chosen_lengths=rows["chosen_lengths"].float(),
                weights=weights[group],
                valid=valid[group],
                weight_total=weight_total,
            )
        )
    return out


def preference_loss_fn(
    beta: float, loss_type: str, sft_weight: float, kl_weight: float, kl_prompts_total: int
) -> MicroBatchLoss[PairMicroBatch]:
    """The loss of one micro-batch from its per-sequence policy log-probs (rows: chosen,
    rejected, then HyPO's k samples per prompt when the micro-batch has them):
    weighted DPO/IPO (+ sft_weight * NLL of the chosen) + kl_weight * RLOO reverse KL.
    Every term is pre-scaled by a global normaliser, so micro-batches and DP ranks add up."""

    def loss_fn(mb: PairMicroBatch, sequence_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The pool's values (reference log-probs, weights, flags, lengths) live on the CPU; the
        # log-probs on the model's device: everything is combined there.
        device = sequence_logps.device
        ref_chosen, ref_rejected, lengths, weights, valid = (
            t.to(device)
            for t in (
                mb["ref_chosen_logps"],
                mb["ref_rejected_logps"],
                mb["chosen_lengths"],
                mb["weights"],
                mb["valid"],
            )
        )
        n = weights.shape[0]
        policy_chosen, policy_rejected = sequence_logps[:n], sequence_logps[n : 2 * n]
        margin = alg.dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        per_pair = alg.preference_loss(margin, beta, loss_type)
        if sft_weight > 0:
            per_pair = per_pair + sft_weight * alg.sft_nll(policy_chosen, lengths)
        loss = alg.weighted_mean(per_pair, weights, valid, mb["weight_total"])
        kl = torch.zeros((), device=device)
        if "sample_ref_logps" in mb:
            k = mb["sample_ref_logps"].shape[0] // n
            kl_loss, kl = alg.rloo_kl_loss_sum(
                sequence_logps[2 * n :].view(n, k), mb["sample_ref_logps"].to(device).view(n, k), kl_prompts_total
            )
            loss = loss + kl_weight * kl_loss
        chosen, rejected = policy_chosen.detach(), policy_rejected.detach()
        return loss, {
            "loss": loss.detach(),
            "pairs": valid.sum(),
            "correct": ((margin.detach() > 0).float() * valid).sum(),
            "margin": (margin.detach() * valid).sum(),
            "kl": kl.detach(),
            # DPO's implicit rewards beta * (log pi - log ref) and the policy's log-probs, as sums
            # over valid pairs (divided by the pairs once summed over micro-batches and ranks)
            "reward_chosen": (beta * (chosen - ref_chosen) * valid).sum(),
            "reward_rejected": (beta * (rejected - ref_rejected) * valid).sum(),
            "logp_chosen": (chosen * valid).sum(),
            "logp_rejected": (rejected * valid).sum(),
        }

    return loss_fn


# What loss_fn's metrics hold, in this order (sums over a micro-batch; "loss" and "kl" are
# pre-normalised, the rest are divided by "pairs" for a mean).
METRICS = (
    "loss",
    "pairs",
    "correct",
    "margin",
    "kl",
    "reward_chosen",
    "reward_rejected",
    "logp_chosen",
    "logp_rejected",
)


def metric_sums(metrics: list[dict], device: torch.device) -> torch.Tensor:
    """[len(METRICS)] sums over micro-batches' metrics, on the device the loss ran on (where
    they are: a CPU total would mix devices)."""
    totals = torch.zeros(len(METRICS), device=device)
    for m in metrics:
        totals += torch.stack([m[key] for key in METRICS]).float()
    return totals
