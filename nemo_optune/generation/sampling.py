"""Token sampling as a pure function of logits and pre-drawn uniform noise."""

import torch


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Draw one token per row of `logits` [B, V] using `uniform` [B, V] noise in (0, 1).

    Gumbel-max: argmax(logits / T + Gumbel) is an exact sample of softmax(logits / T). Taking
    the noise as an input makes each row's draw depend only on its own seed."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    return (scores + gumbel).argmax(dim=-1)
