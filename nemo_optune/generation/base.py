"""The rollout-engine interface. Engines: in-process on the policy's megatron-core module
(megatron_engine.py, the default), vLLM (vllm_engine.py) and TensorRT-LLM (trtllm_engine.py),
the last two behind factory.ExternalEngine, refitted from the policy's exported weights."""

import dataclasses
from typing import Protocol

import torch


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
