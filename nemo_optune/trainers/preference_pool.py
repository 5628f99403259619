"""The pool a preference trainer trains on, and how OPTune keeps it fresh: select the worst
prompts, regenerate them, score, pair, cache their reference log-probs, and replace them in
the pool (scalars on every rank, token rows at their owner: data/pool.py). Online DPO
selects every prompt every iteration; offline pools are never regenerated, only given their
reference log-probs."""

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from nemo_optune import algorithms as alg
from nemo_optune.config import RootConfig
from nemo_optune.data.pool import TOKEN_FIELDS, PromptPool, exchange_rows, owner_of
from nemo_optune.data.prompts import Prompt
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.generation.base import RolloutEngine, SamplingParams, completion_counts, ended_on_stop
from nemo_optune.rewards.resilient import RewardSourceError
from nemo_optune.rewards.sources import RewardSources
from nemo_optune.runtime.distributed import Layout, all_to_all_over_dp, dp_share, gather_rows_over_dp
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


POOL_TOKEN_FILES = "pool_tokens_dp*.pt"  # a training checkpoint's token rows, one file per DP rank


class PreferencePool:
    """The pool's entries (`store`: this DP rank's shard), the prompts they are for, and how to
    refresh them."""

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
        the pool; identical on every rank (it reads only the scalars, which every rank has). A
        window with entries never generated (the first iteration, or the first pass of windows)
        is generated whole."""
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
        first = alg.regenerate_first(
            self.store.valid[window], it - self.store.refreshed_at[window], self.opt.ties_first, self.opt.max_pair_age
        )
        selected = alg.select_prompts(
            self.opt.selection,
            alg.num_selected(len(window), rho),
            chosen,
            rejected,
            self.opt.selection_key,
            generator,
            first,
        )
        return window[selected].sort().values, rho

    # ------------------------------------------- generate, score, pair, replace
    def regenerate_chunk(
        self, it: int, chunk: torch.Tensor, sampling: SamplingParams, timer: PhaseTimer, generated: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """K samples per prompt of `chunk` (part of the selection, balanced over DP ranks),
        scored, paired best vs worst, reference log-probs cached, then exchanged: (every new
        pair's scalars, on every rank; the new token rows of the prompts this rank owns, with
        their "ids"; this rank's per-source reward columns). The pool is not written (`apply`
        does, once every chunk is done): a failure leaves it as it was. This rank's samples are
        counted into `generated` (completion_counts)."""
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
            tokens = [new.pop(name) for name in TOKEN_FIELDS]
            gathered = {name: gather_rows_over_dp(value, counts) for name, value in new.items()}
            owners = owner_of(chunk, len(self.store), self.layout.dp)
            owned = [chunk[owners == r] for r in range(self.layout.dp)]
            tokens = exchange_rows(tokens, chunk, owned, self.layout.dp_rank, all_to_all_over_dp)
        dropped = int(gathered["non_finite"].sum())
        if dropped and self.cfg.reward.non_finite == "error":
            raise RewardSourceError(
                f"the reward source returned {dropped} non-finite rewards at iteration {it + 1} "
                f"(reward.non_finite=error; =drop leaves them out); the prompt pool was not updated"
            )
        return gathered, {"ids": owned[self.layout.dp_rank], **dict(zip(TOKEN_FIELDS, tokens))}, by_source

    def apply(
        self, selected: torch.Tensor, rows: dict[str, torch.Tensor], owned: dict[str, torch.Tensor], by_source
    ) -> RefreshStats:
        """The pool gets the new pairs of `selected` (regenerate_chunk's, joined): their `rows`
        of scalars on every rank, the `owned` token rows on their owner; `by_source`: this
        rank's reward columns of them. Collective."""
        rows, owned = dict(rows), dict(owned)
        dropped = int(rows.pop("non_finite").sum())
        self.store.update(selected, rows)
        self.store.update(owned.pop("ids"), owned)
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

    # ------------------------------------------------ token rows across ranks
    def fetch(self, want: list[torch.Tensor]) -> PromptPool:
        """Collective over DP: a view of the pool holding the token rows of want[dp_rank] (ids
        for every DP rank, the same list on all), fetched from their owners."""
        rows = exchange_rows(
            [getattr(self.store, name) for name in TOKEN_FIELDS],
            torch.arange(len(self.store)),
            want,
            self.layout.dp_rank,
            all_to_all_over_dp,
        )
        return self.store.with_tokens(want[self.layout.dp_rank], dict(zip(TOKEN_FIELDS, rows)))

    def checkpoint_files(self) -> dict[str, dict]:
        """This rank's files in a training checkpoint: its token rows with their prompt ids,
        written by the first rank of each DP rank's model-parallel group (the scalars go into
        trainer_state.pt). Loadable at any DP size: load_checkpoint_files."""
        if self.layout.tp_rank or self.layout.pp_rank:
            return {}
        name = POOL_TOKEN_FILES.replace("*", f"{self.layout.dp_rank:05d}")
        return {name: {"held": self.store.held, **{k: getattr(self.store, k) for k in TOKEN_FIELDS}}}

    def load_checkpoint_files(self, directory: str) -> None:
        """The token rows this rank owns, from every DP rank's file of a checkpoint; memory-mapped,
        so only those rows are read into memory."""
        for path in sorted(glob.glob(os.path.join(directory, POOL_TOKEN_FILES))):
            self.store.load_tokens(torch.load(path, mmap=True, weights_only=True))
