"""In-process rollout engine on the policy's own megatron-core model (no weight copy).

Each step runs the whole prefix through megatron's pipeline schedule (no KV cache): at the
tiny scale this costs less than a cache's bookkeeping and it runs unchanged under TP and PP.
A KV-cached engine (megatron's inference engine, TensorRT-LLM, vLLM) slots in behind the
same interface for real model sizes.
"""

import torch

from nemo_optune.generation.base import Rollouts, SamplingParams
from nemo_optune.generation.sampling import sample_tokens


class MegatronInProcessEngine:
    def __init__(self, model, stop_ids, pad_id: int, micro_batch_size: int):
        self.model = model
        self.stop_ids = torch.tensor(sorted(set(stop_ids) | {pad_id}))  # any end-of-sequence id, or padding
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size

    def refit(self, weights=None) -> None:
        """Nothing to do: the engine runs the policy module itself."""

    def release(self) -> None:
        """Nothing is held between calls."""

    def resume(self) -> None:
        """Nothing to re-acquire."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]) -> Rollouts:
        vocab, new = self.model.vocab_size, params.max_new_tokens
        rows = len(prompts) * num_samples
        if rows == 0:
            empty = torch.zeros(0, new, dtype=torch.long)
            return Rollouts(empty, torch.zeros(0, dtype=torch.long), empty.float())
        # Per-prompt noise for every (sample, step): the draw is independent of batching.
        uniform = torch.cat([
            torch.rand(num_samples, new, vocab, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ])
        prompt_lengths = torch.tensor([len(p) for p in prompts]).repeat_interleave(num_samples)
        width = int(prompt_lengths.max()) + new
        tokens = torch.full((rows, width), self.pad_id, dtype=torch.long)
        for p, ids in enumerate(prompts):
            tokens[p * num_samples:(p + 1) * num_samples, :len(ids)] = torch.tensor(ids)
        lengths = prompt_lengths.clone()
        finished = torch.zeros(rows, dtype=torch.bool)
        response = torch.full((rows, new), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(rows, new)
        response_lengths = torch.zeros(rows, dtype=torch.long)

        self.model.prepare_for_inference()
        try:
            for step in range(new):
                active = (~finished).nonzero().squeeze(-1)
                if active.numel() == 0:
                    break
                prefix = tokens[active, :int(lengths[active].max())]
                logits = self.model.next_token_logits(prefix, lengths[active] - 1, self.micro_batch_size)
                chosen = sample_tokens(logits, uniform[active, step], params.temperature, params.top_k, params.top_p)
                response[active, step] = chosen
                logprobs[active, step] = logits.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1)
                tokens[active, lengths[active]] = chosen
                lengths[active] += 1
                response_lengths[active] += 1
                finished[active] = torch.isin(chosen, self.stop_ids)
        finally:
            self.model.finish_inference()
        return Rollouts(response, response_lengths, logprobs)
