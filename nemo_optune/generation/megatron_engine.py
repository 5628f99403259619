"""In-process rollout engines on the policy's own megatron-core model (no weight copy).

`MegatronInProcessEngine` (the default) keeps a KV cache (models/kv_cache.py, at megatron's
attention layers). The prompts of a pass are left-padded to one length and prefilled once per
distinct prompt; then each step feeds one token per active row and every attention layer
appends its keys/values to the cache and attends over it. Under PP every stage caches its own layers;
under TP every rank its own heads.

`MegatronRecomputeEngine` recomputes the whole prefix every step (quadratic in length). It is
kept as the reference the cached engine is tested against.

Both engines take one uniform per row and step from `counter_uniform`, a pure function of
(prompt seed, sample index, step), and sample by inverse CDF (generation/sampling.py), so a
prompt's samples depend neither on its batch nor on the engine: switching engines changes
nothing but speed.
"""

import abc
import contextlib
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from nemo_optune.generation.base import Rollouts, SamplingParams
from nemo_optune.generation.sampling import counter_uniform, sample_tokens

if TYPE_CHECKING:  # the model module imports nothing from here (tests/test_gpu_path.py: no import cycles)
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel

State = TypeVar("State")  # an engine's per-pass decoding state


class _Engine(abc.ABC, Generic[State]):
    """The decoding loop; subclasses give the logits of the active rows at each step."""

    def __init__(self, model: "MegatronGPTOPTuneModel", stop_ids, pad_id: int, micro_batch_size: int, progress=None):
        """progress: None, or a callable (rows to generate) -> context manager yielding an object
        with update(rows), told as rows finish (e.g. runtime/progress.PhaseProgress.rows)."""
        self.model = model
        self.stop_ids = torch.tensor(sorted(set(stop_ids) | {pad_id}))  # any end-of-sequence id, or padding
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size
        self.progress = progress

    def refit(self, weights=None) -> None:
        """Nothing to do: the engine runs the policy module itself."""

    def release(self) -> None:
        """Nothing is held between calls (a KV cache lives for one pass of `generate`)."""

    def resume(self) -> None:
        """Nothing to re-acquire."""

    def _passes(self, prompt_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Row sets decoded together (default: all rows in one pass)."""
        return [torch.arange(len(prompt_lengths))]

    @abc.abstractmethod
    def _begin(self, prompts: list[list[int]], new: int) -> State:
        """The state of a pass over these prompts, with room for `new` tokens per row."""

    @abc.abstractmethod
    def _logits(self, state: State, active: torch.Tensor) -> torch.Tensor:
        """The next-token logits of the active rows (indices into the pass's rows)."""

    @abc.abstractmethod
    def _advance(self, state: State, active: torch.Tensor, chosen: torch.Tensor) -> None:
        """Append the chosen tokens to the active rows."""

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]
    ) -> Rollouts:
        new = params.max_new_tokens
        rows = len(prompts) * num_samples
        rollouts = Rollouts.empty(rows, new, self.pad_id)
        if rows == 0 or new == 0:
            return rollouts
        response, response_lengths, logprobs = rollouts.response_tokens, rollouts.response_lengths, rollouts.logprobs
        row_prompts = [list(p) for p in prompts for _ in range(num_samples)]
        row_seeds = torch.tensor([int(s) for s in seeds], dtype=torch.long).repeat_interleave(num_samples)
        row_samples = torch.arange(num_samples).repeat(len(prompts))
        prompt_lengths = torch.tensor([len(p) for p in row_prompts])
        uniforms = counter_uniform(row_seeds, row_samples, new)  # [rows, steps]

        self.model.prepare_for_inference()
        bars = contextlib.ExitStack()
        try:
            bar = bars.enter_context(self.progress(rows)) if self.progress is not None else None
            for rows_of_pass in self._passes(prompt_lengths):
                state = self._begin([row_prompts[r] for r in rows_of_pass.tolist()], new)
                finished = torch.zeros(len(rows_of_pass), dtype=torch.bool)
                reported = 0  # rows of this pass the bar has been told of
                for step in range(new):
                    active = (~finished).nonzero().squeeze(-1)
                    if active.numel() == 0:
                        break
                    # [active, vocabulary] on the model's device: only the drawn tokens and their
                    # log-probs come back to the CPU.
                    logits = self._logits(state, active)
                    out = rows_of_pass[active]
                    u = uniforms[out, step].to(logits.device)
                    drawn = sample_tokens(logits, u, params.temperature, params.top_k, params.top_p)
                    logp = logits.gather(-1, drawn[:, None]).squeeze(-1) - logits.logsumexp(-1)
                    chosen = drawn.cpu()
                    self._advance(state, active, chosen)
                    response[out, step] = chosen
                    logprobs[out, step] = logp.cpu()
                    response_lengths[out] += 1
                    finished[active] = torch.isin(chosen, self.stop_ids)
                    if bar is not None and int(finished.sum()) > reported:
                        bar.update(int(finished.sum()) - reported)
                        reported = int(finished.sum())
                if bar is not None:  # rows that ran to max_new_tokens
                    bar.update(len(rows_of_pass) - reported)
                del state
        finally:
            bars.close()
            self.model.finish_inference()
        return rollouts


class MegatronRecomputeEngine(_Engine[dict]):
    """Every step runs each active row's whole prefix (right-padded) through the pipeline."""

    def _begin(self, prompts: list[list[int]], new: int) -> dict:
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.full((len(prompts), int(lengths.max()) + new), self.pad_id, dtype=torch.long)
        for r, ids in enumerate(prompts):
            tokens[r, : len(ids)] = torch.tensor(ids)
        return {"tokens": tokens, "lengths": lengths}

    def _logits(self, state: dict, active: torch.Tensor) -> torch.Tensor:
        lengths = state["lengths"][active]
        prefix = state["tokens"][active, : int(lengths.max())]
        return self.model.next_token_logits(prefix, lengths - 1, self.micro_batch_size)

    def _advance(self, state: dict, active: torch.Tensor, chosen: torch.Tensor) -> None:
        state["tokens"][active, state["lengths"][active]] = chosen
        state["lengths"][active] += 1


class _CachePass:
    """One pass's KV cache and its row bookkeeping.

    Prompts are left-padded to the pass's longest, so the last prompt token of every row sits
    at the same cache slot and all rows then advance one slot per step. Row r's padding slots
    (the first pad[r]) are masked out of attention for good (a padding query sees only its
    own slot, so no query is fully masked), and its positions count from its first real token.
    Rows with the same prompt (a prompt's samples) are prefilled once, then their cache rows
    copied (the prefill is a quarter of 16 new tokens' time on a 20M Llama).
    """

    def __init__(
        self, model: "MegatronGPTOPTuneModel", prompts: list[list[int]], new: int, pad_id: int, micro_batch_size: int
    ):
        from nemo_optune.models.kv_cache import KVCache

        self.model, self.micro_batch_size = model, micro_batch_size
        distinct: dict[tuple, int] = {}
        self.prefill_row = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts])
        self.width = max(len(p) for p in prompts)
        self.prefill_pad = torch.tensor([self.width - len(p) for p in distinct])
        self.pad = self.prefill_pad[self.prefill_row]  # per row
        self.tokens = torch.full((len(distinct), self.width), pad_id, dtype=torch.long)  # the prefill's rows
        for r, ids in enumerate(distinct):
            self.tokens[r, self.prefill_pad[r] :] = torch.tensor(ids)
        self.cached_rows = self._padded(len(distinct))  # rows the cache holds now
        self.cache = KVCache(self.cached_rows, self.width + new)
        self.cache_row = torch.arange(len(prompts))  # row r's row in the cache (after the prefill)
        self.next_tokens: torch.Tensor | None = None  # [rows], the tokens chosen at the last step; None before

    def _padded(self, rows: int) -> int:
        """The row count after split_micro_batches pads the last micro-batch."""
        size = min(self.micro_batch_size, rows)
        return -(-rows // size) * size

    def prefill_logits(self) -> torch.Tensor:
        slots = torch.arange(self.width)
        positions = (slots[None, :] - self.prefill_pad[:, None]).clamp(min=0)
        causal = slots[None, :] > slots[:, None]  # [query, key]
        padding = slots[None, :] < self.prefill_pad[:, None]  # [row, key]
        own = torch.eye(self.width, dtype=torch.bool)  # a padding query sees its own slot only
        mask = ((causal[None] | padding[:, None, :]) & ~own)[:, None]  # [rows, 1, width, width], True = masked
        logits = self.model.next_token_logits_cached(self.cache, self.tokens, positions, mask, self.micro_batch_size)
        rows = len(self.prefill_row)
        if rows > len(self.tokens):  # every row gets a copy of its prompt's cache row
            padded = self._padded(rows)
            self.cache.keep_rows(torch.cat([self.prefill_row, self.prefill_row[:1].expand(padded - rows)]))
            self.cached_rows = padded
        return logits[self.prefill_row]

    def decode_logits(self, active: torch.Tensor) -> torch.Tensor:
        self._compact(active)
        step = self.cache.sequence_len_offset  # the slot this step's token goes to
        keys = torch.arange(step + 1)
        mask = (keys[None, :] < self.pad[active, None])[:, None, None, :]  # [active, 1, 1, step + 1]
        positions = (step - self.pad[active])[:, None]
        # The cache rows hold the active rows in order (after _compact), plus rows that are no
        # longer needed: fed padding, their outputs dropped.
        n = len(active)
        tokens = torch.zeros(self.cached_rows, 1, dtype=torch.long)
        assert self.next_tokens is not None, "decode_logits before the prefill's tokens were chosen"
        tokens[:n, 0] = self.next_tokens[active]
        full_positions = torch.zeros(self.cached_rows, 1, dtype=torch.long)
        full_positions[:n] = positions
        full_mask = torch.zeros(self.cached_rows, 1, 1, step + 1, dtype=torch.bool)
        full_mask[:n] = mask
        return self.model.next_token_logits_cached(
            self.cache, tokens, full_positions, full_mask, self.micro_batch_size
        )[:n]

    def _compact(self, active: torch.Tensor) -> None:
        """Move the active rows to the front of the cache; shrink it when the micro-batch-padded
        active count is smaller. Rows past the active ones keep stale entries, never read."""
        n, padded = len(active), self._padded(len(active))
        order = self.cache_row[active]
        if padded == self.cached_rows and torch.equal(order, torch.arange(n)):
            return
        self.cache.keep_rows(torch.cat([order, order[:1].expand(padded - n)]))
        self.cache_row[active] = torch.arange(n)
        self.cached_rows = padded


class MegatronInProcessEngine(_Engine[_CachePass]):
    """The KV-cached engine (the default). See _CachePass."""

    def __init__(
        self,
        model: "MegatronGPTOPTuneModel",
        stop_ids,
        pad_id: int,
        micro_batch_size: int,
        rows_per_pass: int | None = None,
        progress=None,
    ):
        """rows_per_pass bounds the KV cache (rows x (prompt + new tokens) per layer): None, all
        rows in one pass. A row's tokens do not depend on its pass. progress: see _Engine."""
        super().__init__(model, stop_ids, pad_id, micro_batch_size, progress)
        self.rows_per_pass = rows_per_pass

    def _passes(self, prompt_lengths: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.arange(len(prompt_lengths)).split(self.rows_per_pass or len(prompt_lengths)))

    def _begin(self, prompts: list[list[int]], new: int) -> _CachePass:
        return _CachePass(self.model, prompts, new, self.pad_id, self.micro_batch_size)

    def _logits(self, state: _CachePass, active: torch.Tensor) -> torch.Tensor:
        if state.next_tokens is None:
            return state.prefill_logits()
        return state.decode_logits(active)

    def _advance(self, state: _CachePass, active: torch.Tensor, chosen: torch.Tensor) -> None:
        if state.next_tokens is None:
            state.next_tokens = torch.zeros(len(state.pad), dtype=torch.long)
        state.next_tokens[active] = chosen
