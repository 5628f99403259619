"""The pool a preference trainer trains on, and how OPTune keeps it fresh: select the worst
prompts, regenerate them, score, pair, cache their reference log-probs, and replace them in
every rank's pool copy. Online DPO selects every prompt every iteration; offline pools are
never regenerated, only given their reference log-probs."""

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from nemo_optune import algorithms as alg
from nemo_optune.config import RootConfig
from nemo_optune.data.pool import PromptPool
from nemo_optune.data.prompts import Prompt
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.generation.base import RolloutEngine, SamplingParams, completion_counts, ended_on_stop
from nemo_optune.rewards.resilient import RewardSourceError
from nemo_optune.rewards.sources import RewardSources
from nemo_optune.runtime.distributed import Layout, dp_share, gather_rows_over_dp
from nemo_optune.runtime.experiment import PhaseTimer
from nemo_optune.runtime.seeds import mix_seed
from nemo_optune.trainers.preference_loss import pair_sequences

if TYPE_CHECKING:  # the model module imports nothing from here (tests/test_gpu_path.py: no import cycles)
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel


@dataclasses.dataclass
class RefreshStats:
    regenerated: int = 0  # prompts regenerated
    ties_dropped: int = 0  # of them, prompts whose K rewards all tied (no pair, left out of the loss)
    non_finite_rewards: int = 0  # samples left out for a NaN/inf reward (reward.non_finite=drop)
    responses: int = 0  # responses generated, all ranks
    reward_by_source: dict = dataclasses.field(default_factory=dict)  # mean of each source over the new samples


class PreferencePool:
    """The pool's entries (`store`, replicated on every rank), the prompts they are for, and
    how to refresh them."""

    def __init__(
        self,
        store: PromptPool,
        prompt_ids: list[list[int]],
        prompt_texts: Sequence[Prompt],
        prompt_columns: dict[str, list],
        *,
        model: "MegatronGPTOPTuneModel",
        engine: RolloutEngine,
        reward: RewardSources,
        tokenizer: Tokenizer,
        layout: Layout,
        cfg: RootConfig,
        width: int,
    ):
        self.store, self.prompt_ids, self.prompt_texts = store, prompt_ids, prompt_texts
        self.prompt_columns = prompt_columns  # the prompts' other columns, for the reward sources
        self.model, self.engine, self.reward, self.tokenizer = model, engine, reward, tokenizer
        self.layout, self.cfg, self.width = layout, cfg, width
        self.opt = cfg.model.optune

    # ---------------------------------------------------------------- select
    def select(self, it: int, window: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(pool indices to regenerate, ascending; the rho used) among the iteration's `window` of
        the pool; identical on every rank (replicated pool). A window with entries never
        generated (the first iteration, or the first pass of windows) is generated whole."""
        if (self.store.refreshed_at[window] < 0).any():
            return window.sort().values, 1.0
        # Equal keys go to the stalest pair, then the lower pool index: late in training most
        # chosen rewards sit at the maximum, and index order would refresh the same prompts always.
        window = window.sort().values
        window = window[torch.sort(self.store.refreshed_at[window], stable=True).indices]
        chosen, rejected = self.store.chosen_rewards[window], self.store.rejected_rewards[window]
        rho, a = self.opt.rho, self.opt.adaptive_rho
        if a.enabled:
            rho = alg.adaptive_rho(
                alg.selection_keys(chosen, rejected, self.opt.selection_key), a.target, a.rho_min, a.rho_max
            )
        generator = torch.Generator().manual_seed(mix_seed(self.cfg.trainer.seed, it, 0xC0FFEE))
        selected = alg.select_prompts(
            self.opt.selection, alg.num_selected(len(window), rho), chosen, rejected, self.opt.selection_key, generator
        )
        return window[selected].sort().values, rho

    # ------------------------------------------- generate, score, pair, replace
    def regenerate_chunk(
        self, it: int, chunk: torch.Tensor, sampling: SamplingParams, timer: PhaseTimer, generated: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """K samples per prompt of `chunk` (part of the selection, balanced over DP ranks),
        scored, paired best vs worst, reference log-probs cached, then exchanged: (every new
        row, on every rank; this rank's per-source reward columns). The pool is not written
        (`apply` does, once every chunk is done): a failure leaves it as it was. This rank's
        samples are counted into `generated` (completion_counts)."""
        mine, counts = dp_share(chunk, self.layout)
        K = self.opt.samples_per_prompt
        prompts = [self.prompt_ids[i] for i in mine.tolist()]
        with timer.phase("generation"):
            rollouts = self.engine.generate(
                prompts, K, sampling, [mix_seed(self.cfg.trainer.seed, it, i) for i in mine.tolist()]
            )
        generated += completion_counts(rollouts, self.tokenizer)
        with timer.phase("scoring"):
            texts = [self.tokenizer.decode(r) for r in rollouts.response_tokens]
            of = [i for i in mine.tolist() for _ in range(K)]  # each response's prompt
            rewards, by_source = self.reward.score_once_per_model_parallel_group(
                [self.prompt_texts[i] for i in of],
                texts,
                {name: [values[i] for i in of] for name, values in self.prompt_columns.items()},
                ~ended_on_stop(rollouts, self.tokenizer),
                rollouts.response_lengths,
            )
            rewards = rewards.view(-1, K)
        chosen, rejected, valid = alg.best_worst_pairs(rewards, drop_non_finite=True)
        rows = torch.arange(len(prompts)) * K
        new = {
            "chosen_tokens": rollouts.response_tokens[rows + chosen],
            "chosen_lengths": rollouts.response_lengths[rows + chosen],
            "rejected_tokens": rollouts.response_tokens[rows + rejected],
            "rejected_lengths": rollouts.response_lengths[rows + rejected],
            # A prompt with no finite reward at all gets key 0: it is regenerated first next time.
            "chosen_rewards": torch.nan_to_num(rewards.gather(1, chosen[:, None]).squeeze(1), 0.0, 0.0, 0.0).float(),
            "rejected_rewards": torch.nan_to_num(
                rewards.gather(1, rejected[:, None]).squeeze(1), 0.0, 0.0, 0.0
            ).float(),
            "valid": valid,
            "refreshed_at": torch.full((len(prompts),), it, dtype=torch.long),
            "ref_chosen_logps": torch.zeros(len(prompts)),
            "ref_rejected_logps": torch.zeros(len(prompts)),
            "non_finite": (~torch.isfinite(rewards)).sum(dim=1),
        }
        if self.opt.cache_reference_logprobs:
            with timer.phase("reference"):
                new["ref_chosen_logps"], new["ref_rejected_logps"] = self.reference_logprobs(prompts, new)
        with timer.phase("exchange"):
            gathered = {name: gather_rows_over_dp(value, counts) for name, value in new.items()}
        dropped = int(gathered["non_finite"].sum())
        if dropped and self.cfg.reward.non_finite == "error":
            raise RewardSourceError(
                f"the reward source returned {dropped} non-finite rewards at iteration {it + 1} "
                f"(reward.non_finite=error; =drop leaves them out); the prompt pool was not updated"
            )
        return gathered, by_source

    def apply(self, selected: torch.Tensor, rows: dict[str, torch.Tensor], by_source: torch.Tensor) -> RefreshStats:
        """Every rank's pool copy gets the new `rows` of `selected` (regenerate_chunk's, joined);
        `by_source`: this rank's reward columns of them. Collective."""
        rows = dict(rows)
        dropped = int(rows.pop("non_finite").sum())
        self.store.update(selected, rows)
        return RefreshStats(
            regenerated=len(selected),
            ties_dropped=int(len(selected) - rows["valid"].sum()),
            non_finite_rewards=dropped,
            responses=len(selected) * self.opt.samples_per_prompt,
            reward_by_source=self.reward.means_over_dp(by_source),
        )

    # -------------------------------------------------------------- reference
    def reference_logprobs(self, prompts: list[list[int]], rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = pair_sequences(prompts, rows, self.width, self.tokenizer.pad_id)
        logps = self.model.sequence_logprobs("reference", tokens, mask, self.cfg.generation.micro_batch_size)
        return logps[: len(prompts)], logps[len(prompts) :]

    def refresh_all_reference_logprobs(self) -> None:
        """Recompute every entry's reference log-probs (offline pools once; every iteration
        when caching is off), balanced over DP ranks."""
        mine, counts = dp_share(torch.arange(len(self.store)), self.layout)
        ref_c, ref_r = self.reference_logprobs([self.prompt_ids[i] for i in mine.tolist()], self.store.rows(mine))
        self.store.ref_chosen_logps.copy_(gather_rows_over_dp(ref_c, counts))
        self.store.ref_rejected_logps.copy_(gather_rows_over_dp(ref_r, counts))
