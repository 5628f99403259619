"""The rollout-engine interface. Engines: in-process on the policy's megatron-core module
(megatron_engine.py, the default), vLLM (vllm_engine.py) and TensorRT-LLM (trtllm_engine.py),
the last two behind factory.ExternalEngine, refitted from the policy's exported weights."""

import dataclasses
from typing import Protocol

import torch

from nemo_optune.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16


@dataclasses.dataclass
class Rollouts:
    """`num_samples` responses for each prompt, prompt-major: row p*K + k is sample k of prompt p."""

    response_tokens: torch.Tensor  # [B, max_new_tokens] long, padded with pad_id after the stop token
    response_lengths: torch.Tensor  # [B] tokens up to and including the stop token
    logprobs: torch.Tensor  # [B, max_new_tokens] policy log-prob (temperature 1) of each token, 0 past the end

    @classmethod
    def empty(cls, rows: int, max_new_tokens: int, pad_id: int) -> "Rollouts":
        """`rows` responses of no tokens yet, for an engine to fill in."""
        return cls(
            torch.full((rows, max_new_tokens), pad_id, dtype=torch.long),
            torch.zeros(rows, dtype=torch.long),
            torch.zeros(rows, max_new_tokens),
        )


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]
    ) -> Rollouts:
        """Sample `num_samples` responses per prompt (token ids). `seeds[p]` fixes prompt p's
        randomness, so a prompt's samples do not depend on which rank or batch it lands in."""

    def refit(self, weights) -> None:
        """Load the policy's current weights (an iterable of (name, tensor))."""

    def release(self) -> None:
        """Free generation memory (KV cache, engine weights) for the training phase."""

    def resume(self) -> None:
        """Re-acquire what `release` freed."""


def completion_counts(rollouts: Rollouts, tokenizer: Tokenizer) -> torch.Tensor:
    """[max_new_tokens + 2] float64: how many responses have each length 0..max_new_tokens, then
    how many ended on a stop token (ended_on_stop); the others were cut at max_new_tokens. Counts add up over batches and ranks
    (sum_over_dp), and completion_stats reads the totals."""
    lengths = rollouts.response_lengths.long().cpu()
    width = rollouts.response_tokens.shape[1]
    ended = ended_on_stop(rollouts, tokenizer)
    return torch.cat([torch.bincount(lengths, minlength=width + 1).double(), ended.sum().double().reshape(1)])


def ended_on_stop(rollouts: Rollouts, tokenizer) -> torch.Tensor:
    """[B] bool: the response ended on a stop token (any of the tokenizer's end-of-sequence ids,
    or padding, as the engines stop); False: it was cut at max_new_tokens."""
    lengths = rollouts.response_lengths.long().cpu()
    last = rollouts.response_tokens.cpu().gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    stops = torch.tensor(sorted(tokenizer.eos_ids | {tokenizer.pad_id}), dtype=torch.long)
    return (lengths > 0) & torch.isin(last, stops)


def completion_stats(counts: torch.Tensor) -> dict:
    """Responses, their tokens, mean / min / max length (stop token included) and the fraction
    that ended on a stop token, from completion_counts' totals ({} for no response)."""
    per_length, ended = counts[:-1], float(counts[-1])
    responses = float(per_length.sum())
    if responses == 0:
        return {}
    lengths = torch.arange(len(per_length), dtype=torch.float64)
    seen = torch.nonzero(per_length).squeeze(1)
    tokens = float((per_length * lengths).sum())
    return {
        "responses": int(responses),
        "tokens": int(tokens),
        "mean_length": tokens / responses,
        "min_length": int(seen[0]),
        "max_length": int(seen[-1]),
        "eos_rate": ended / responses,
    }
