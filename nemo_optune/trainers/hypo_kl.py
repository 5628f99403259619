"""HyPO's online term: k policy samples per prompt of a batch, appended to the batch's
micro-batches with their reference log-probs; the loss function turns them into the RLOO
reverse-KL term (trainers/preference_loss.py)."""

from typing import TYPE_CHECKING

import torch

from nemo_optune.data.micro_batch import PairMicroBatch
from nemo_optune.data.pool import build_sequences
from nemo_optune.generation.base import RolloutEngine, Rollouts, SamplingParams
from nemo_optune.runtime.experiment import PhaseTimer
from nemo_optune.runtime.seeds import mix_seed

if TYPE_CHECKING:  # the model module imports nothing from here (tests/test_gpu_path.py: no import cycles)
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel


class OnlineKLSamples:
    def __init__(
        self,
        *,
        model: "MegatronGPTOPTuneModel",
        engine: RolloutEngine,
        prompt_ids: list[list[int]],
        samples_per_prompt: int,
        width: int,
        pad_id: int,
        reference_micro_batch_size: int,
    ):
        self.model, self.engine, self.prompt_ids = model, engine, prompt_ids
        self.k, self.width, self.pad_id = samples_per_prompt, width, pad_id
        self.reference_micro_batch_size = reference_micro_batch_size

    def add_to(
        self,
        micro_batches: list[PairMicroBatch],
        indices: torch.Tensor,
        seed: int,
        max_new_tokens: int,
        timer: PhaseTimer,
    ) -> Rollouts:
        """Sample k responses for each prompt in `indices` (this rank's share of the batch, in
        micro-batch order) and append them to the micro-batches after their pair rows.
        Samples come from the policy itself (temperature 1, no truncation): the RLOO estimate
        is of KL(pi || ref) only for such samples. Returns the samples (for the run's counts)."""
        prompts = [self.prompt_ids[i] for i in indices.tolist()]
        with timer.phase("generation"):
            rollouts = self.engine.generate(
                prompts,
                self.k,
                SamplingParams(max_new_tokens=max_new_tokens),
                [mix_seed(seed, i) for i in indices.tolist()],
            )
        tokens, mask = build_sequences(
            [p for p in prompts for _ in range(self.k)],
            rollouts.response_tokens,
            rollouts.response_lengths,
            self.width,
            self.pad_id,
        )
        with timer.phase("reference"):
            ref = self.model.sequence_logprobs("reference", tokens, mask, self.reference_micro_batch_size)
        start = 0
        for mb in micro_batches:
            rows = slice(start * self.k, (start + len(mb["indices"])) * self.k)
            mb["tokens"] = torch.cat([mb["tokens"], tokens[rows]])
            mb["loss_mask"] = torch.cat([mb["loss_mask"], mask[rows]])
            mb["sample_ref_logps"] = ref[rows]
            start += len(mb["indices"])
        return rollouts
