"""HyPO's online reverse-KL regulariser, estimated with a leave-one-out (RLOO) baseline."""

import torch


def rloo_kl_loss_sum(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_prompts_total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl) summed over these prompts and divided by the GLOBAL prompt count, so
    contributions add up exactly over micro-batches and data-parallel ranks.

    policy_logps, ref_logps: [P, k] sequence log-probs of k samples y_j ~ pi per prompt.
    c_j = log pi(y_j) - log ref(y_j) (no gradient), b_j = mean of the other k-1 c's,
    loss = (1/k) sum_j (c_j - b_j) log pi(y_j): a score-function gradient of KL(pi || ref)
    whose leave-one-out baseline removes variance without adding bias."""
    k = policy_logps.shape[-1]
    if k < 2:
        raise ValueError(f"the RLOO baseline needs k >= 2 samples per prompt, got {k}")
    c = (policy_logps - ref_logps).detach()
    baseline = (c.sum(dim=-1, keepdim=True) - c) / (k - 1)
    loss = ((c - baseline) * policy_logps).mean(dim=-1).sum() / num_prompts_total
    kl = c.mean(dim=-1).sum() / num_prompts_total
    return loss, kl


def rloo_kl_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over prompts: (loss, unbiased estimate of KL(pi || ref))."""
    return rloo_kl_loss_sum(policy_logps, ref_logps, policy_logps.shape[0])
