"""A fixed prompt pool from an offline preference data set (offline DPO, HyPO).

Checked record by record before any model is built; every problem names FILE:LINE."""

import dataclasses

import torch

from nemo_optune.data.pool import PromptPool
from nemo_optune.data.preferences import read_preferences
from nemo_optune.data.prompts import encode_prompt, fit_prompt
from nemo_optune.data.records import DataError
from nemo_optune.data.tokenizer import Tokenizer


@dataclasses.dataclass
class OfflinePool:
    prompts: list[str]  # as text (a chat rendered by the tokenizer), for reward sources
    prompt_ids: list[list[int]]
    pool: PromptPool
    long_prompts: int  # prompts over the length limit (skipped or truncated per data.long_prompts)
    identical_pairs: int  # records whose chosen and rejected responses are the same: kept out of the loss


def build_offline_pool(
    path: str,
    tokenizer: Tokenizer,
    max_prompt_tokens: int,
    max_new_tokens: int,
    long_prompts: str,
    min_records: int,
    apply_chat_template: bool = False,
    dp_rank: int = 0,
    dp: int = 1,
) -> OfflinePool:
    """Pairs (and rewards, when the file gives them; else 1 / 0) from a preference file.

    Prompts over `max_prompt_tokens` follow `long_prompts` (error | skip | truncate, keeping
    the end, where the question is). A pair with identical responses carries no preference:
    it is counted and marked invalid. Fewer than `min_records` usable records (one global
    batch) is an error: nothing could be trained. The pool keeps the token rows of DP rank
    `dp_rank`'s prompts only (data/pool.py)."""
    prompt_ids, pairs, records, too_long, identical = [], [], [], 0, 0
    for r in read_preferences(path):
        prompt = encode_prompt(r.prompt, tokenizer, apply_chat_template, r.where)
        try:
            pair = [tokenizer.encode(text) + [tokenizer.eos_id] for text in (r.chosen, r.rejected)]
        except ValueError as err:  # e.g. a character outside a character tokenizer's alphabet
            raise DataError(f"{r.where}: {err}") from None
        for side, ids in zip(("chosen", "rejected"), pair):
            if len(ids) > max_new_tokens:
                raise DataError(
                    f"{r.where}: {side} response has {len(ids)} tokens with EOS, more than "
                    f"generation.max_new_tokens={max_new_tokens}"
                )
        fitted = fit_prompt(prompt, max_prompt_tokens, long_prompts, r.where)
        too_long += fitted is not prompt
        if fitted is None:
            continue
        identical += r.chosen == r.rejected
        prompt_ids.append(fitted)
        pairs.append(pair)
        records.append(r)
    usable = len(records) - identical
    if usable < min_records:
        raise DataError(
            f"{path}: {usable} usable preference records ({too_long} over the length limit, "
            f"{identical} with identical responses), fewer than one global batch "
            f"(trainer.global_batch_size={min_records})"
        )
    pool = PromptPool.empty(len(records), max_new_tokens, dp_rank, dp)
    for row, i in enumerate(pool.held.tolist()):
        chosen, rejected = pairs[i]
        pool.chosen_tokens[row, : len(chosen)] = torch.tensor(chosen)
        pool.rejected_tokens[row, : len(rejected)] = torch.tensor(rejected)
    for i, ((chosen, rejected), r) in enumerate(zip(pairs, records)):
        pool.chosen_lengths[i] = len(chosen)
        pool.rejected_lengths[i] = len(rejected)
        pool.chosen_rewards[i] = 1.0 if r.chosen_reward is None else r.chosen_reward
        pool.rejected_rewards[i] = 0.0 if r.rejected_reward is None else r.rejected_reward
        pool.valid[i] = r.chosen != r.rejected
    pool.refreshed_at[:] = 0
    prompts = [tokenizer.decode(ids) for ids in prompt_ids]
    return OfflinePool(prompts, prompt_ids, pool, too_long, identical)
