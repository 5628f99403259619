"""The preference-tuning loop: OPTune, online DPO, offline DPO and HyPO in one trainer.

One OPTune iteration (`PreferenceTrainer.iteration`), top to bottom:
  1. select    - the rho*N pool prompts with the lowest key, globally (every rank has the keys)
  2. refresh   - K samples per selected prompt (balanced over DP), scored, paired best vs
                 worst, reference log-probs cached, the pool updated (tokens at their owner)
  3. train     - weighted DPO over the whole pool, weights normalised over each global batch
  4. evaluate  - held-out reward and reverse KL, same noise at every evaluation
  5. checkpoint - when due, or when a stop request ends the run (fit)
Safe points (`safe_point`) follow every generation chunk of 2., the reference pass and every
optimizer step of 3., and the iteration: all ranks agree there whether a stop request ends the
run or a checkpoint is due; a checkpoint inside an iteration holds its `Position`, so a resumed
run goes on bit-identical to one never stopped (docs/checkpoints.md).
Online DPO is the same loop with rho = 1 and no weighting. Offline DPO skips 1-2 (the pool is
a fixed data set); HyPO is offline DPO plus, per global batch, k policy samples per prompt
for the RLOO reverse-KL term. The pieces: trainers/preference_pool.py (select, refresh),
trainers/preference_loss.py (batches and loss), trainers/hypo_kl.py (online KL samples).
"""

import dataclasses
import os
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist

from nemo_optune.config import ONLINE_METHODS, RootConfig, as_dict
from nemo_optune.data.batching import (
    iteration_batches,
    iteration_window,
    micro_batch_size_for,
    pairs_to_train,
    records_left_untrained,
)
from nemo_optune.data.micro_batch import PairMicroBatch
from nemo_optune.data.offline_pool import build_offline_pool
from nemo_optune.data.pool import PromptPool, build_sequences
from nemo_optune.data.prompts import Prompt
from nemo_optune.data.task_data import TaskData
from nemo_optune.generation.base import SamplingParams, completion_counts, completion_stats, ended_on_stop
from nemo_optune.generation.factory import build_engine, refit_engine
from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
from nemo_optune.rewards.resilient import RewardSourceError
from nemo_optune.rewards.sources import RewardSources, is_scoring_rank
from nemo_optune.runtime.checkpoint import (
    CheckpointError,
    checkpoint_part,
    load_training_checkpoint,
    save_training_checkpoint,
)
from nemo_optune.runtime.distributed import Layout, dp_share, sum_over_dp
from nemo_optune.runtime.exp_dir import require_iterations_cover
from nemo_optune.runtime.experiment import ExperimentLog, PhaseTimer, peak_gpu_memory_mb, peak_rss_mb
from nemo_optune.runtime.lost_ranks import note_phase
from nemo_optune.runtime.lr_schedule import learning_rate
from nemo_optune.runtime.preemption import EXIT_STOPPED, StopRequests
from nemo_optune.runtime.progress import PhaseProgress
from nemo_optune.runtime.seeds import mix_seed
from nemo_optune.trainers.common import (
    max_prompt_tokens,
    model_and_tokenizer,
    read_prompts,
    rows_width,
    sampling_params,
)
from nemo_optune.trainers.hypo_kl import OnlineKLSamples
from nemo_optune.trainers.preference_loss import (
    METRICS,
    global_batch_weights,
    metric_sums,
    preference_loss_fn,
    preference_micro_batches,
)
from nemo_optune.trainers.preference_pool import PreferencePool, RefreshStats

TIMED_PHASES = ("selection", "generation", "scoring", "reference", "exchange", "training")
HELD_OUT_SEED = 0xE7A1
SAMPLES_PER_EVALUATION = 3  # held-out prompts whose first response goes to samples.jsonl


@dataclasses.dataclass
class Position:
    """How far an iteration has got: what a checkpoint inside it saves besides the model,
    optimizer, RNG and pool. Fields in PER_RANK differ between ranks (saved for each rank);
    the others are the same on every rank."""

    iteration: int
    generated: torch.Tensor  # completion_counts of this rank's new responses
    seconds: defaultdict  # the iteration's PhaseTimer seconds so far, this rank's
    selected: torch.Tensor | None = None  # the prompts to regenerate (online methods)
    rho: float | None = None
    chunks_done: int = 0  # generation chunks generated, scored, reference-scored and exchanged
    rows: dict | None = None  # their new pairs' scalars (every rank has all), not yet in the pool
    owned: dict | None = None  # their token rows of the prompts this rank owns, with their "ids"
    by_source: torch.Tensor | None = None  # this rank's per-source rewards of them
    refresh: RefreshStats | None = None  # set once the new rows are in the pool
    reference_done: bool = False  # the whole pool's reference pass, when this iteration has one
    batches_done: int = 0  # training batches done (trained, or skipped without signal)
    totals: torch.Tensor | None = None  # this rank's metric sums of those batches
    grad_norms: list = dataclasses.field(default_factory=list)
    skipped: int = 0
    tokens: int = 0  # this rank's trained tokens


PER_RANK = ("generated", "seconds", "by_source", "totals", "tokens")
# Position.owned, the bulk (new token rows), stays sharded: one file per DP rank, as the pool's.
POSITION_TOKEN_FILE = "position_tokens_dp{:05d}.pt"


class Stopped(Exception):
    """Raised at a safe point once a stop request's checkpoint is written; fit ends the run."""

    def __init__(self, reason: str, checkpoint: str):
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


class PreferenceTrainer:
    def __init__(self, cfg: RootConfig, layout: Layout, data: TaskData, log: ExperimentLog):
        self.cfg, self.layout, self.data, self.log = cfg, layout, data, log
        self.online = cfg.method in ONLINE_METHODS
        t, g = cfg.trainer, cfg.generation
        spec, tok, self.width = model_and_tokenizer(cfg, data.task, layout.tp)
        self.tokenizer = tok
        limit = max_prompt_tokens(cfg, data.task, spec)
        # Read and check every data set before building any model.
        prompts: Sequence[Prompt]
        prompt_columns: dict[str, list] = {}  # the training prompts' other columns (reward keywords)
        if self.online:
            prompts, prompt_ids, long_prompts, prompt_columns = read_prompts(
                cfg, "train", data.train_prompts, tok, limit
            )
            pool = PromptPool.empty(len(prompt_ids), g.max_new_tokens, layout.dp_rank, layout.dp)
            self.data_stats = {"long_prompts": long_prompts}
        else:
            assert cfg.data.offline_path, "config.validate requires data.offline_path for offline methods"
            offline = build_offline_pool(
                cfg.data.offline_path,
                tok,
                limit,
                g.max_new_tokens,
                cfg.data.long_prompts,
                min_records=t.global_batch_size,
                apply_chat_template=cfg.data.apply_chat_template,
                dp_rank=layout.dp_rank,
                dp=layout.dp,
            )
            prompts, prompt_ids, pool = offline.prompts, offline.prompt_ids, offline.pool
            self.data_stats = {"long_prompts": offline.long_prompts, "identical_pairs": offline.identical_pairs}
        self.heldout_prompts, self.heldout_ids, _, self.heldout_columns = read_prompts(
            cfg, "heldout", data.heldout_prompts, tok, limit
        )
        self.width = rows_width(self.width, prompt_ids + self.heldout_ids, g.max_new_tokens)
        # Built before any policy model: a bad function or reward model directory fails fast.
        # Only the rank that scores for its model-parallel group loads a reward model.
        self.reward = RewardSources(cfg.reward, data.task, load=is_scoring_rank())
        # A python reward's required keywords must be columns of every prompt set it scores
        # (an offline pool is never scored).
        scored = [self.heldout_columns, prompt_columns] if self.online else [self.heldout_columns]
        self.reward.check_columns(set.intersection(*(set(c) for c in scored)))
        # The LR schedule's horizon is fixed when the run starts; a resumed run keeps it (see resume).
        per_iteration = t.prompts_per_iteration or len(pool)
        if per_iteration > len(pool):
            raise ValueError(
                f"trainer.prompts_per_iteration={per_iteration} is more than the {len(pool)} training prompts"
            )
        self.lr_total_steps = t.iterations * t.epochs_per_iteration * per_iteration // t.global_batch_size
        # Windows are whole batches; a whole pool that batches do not divide leaves its last
        # pass's remainder untrained: said at the start, counted in summary.json.
        left = (
            0
            if t.prompts_per_iteration
            else records_left_untrained(len(pool), t.global_batch_size, t.epochs_per_iteration, t.iterations)
        )
        if left:
            key = "data.train_prompts_path" if self.online else "data.offline_path"
            log.print(
                f"[data] warning: {key}: {len(pool)} records x {t.iterations} iterations x {t.epochs_per_iteration} "
                f"epochs leave the last {left} records of the final pass untrained "
                f"(trainer.global_batch_size={t.global_batch_size} does not divide the run's records; "
                f"earlier iterations' remainders carry into the next)"
            )
        self.data_stats["records_left_untrained"] = left
        self.model = MegatronGPTOPTuneModel(
            cfg.model,
            spec,
            layout,
            seed=t.seed,
            lr=t.lr,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            lr_schedule=self.lr_at_step,
            tokenizer=tok,
            initialize=False,
        )  # run.py loads the SFT policy
        self.progress = PhaseProgress(t.progress_bar and layout.is_logging_rank)  # bars only on a terminal
        self.engine = build_engine(cfg, self.model, tok, progress=self.progress.rows)  # generation.engine
        self.pool = PreferencePool(
            pool,
            prompt_ids,
            prompts,
            prompt_columns,
            model=self.model,
            engine=self.engine,
            reward=self.reward,
            tokenizer=tok,
            layout=layout,
            cfg=cfg,
            width=self.width,
        )
        self.online_kl = None
        if cfg.method == "hypo":
            self.online_kl = OnlineKLSamples(
                model=self.model,
                engine=self.engine,
                prompt_ids=prompt_ids,
                samples_per_prompt=cfg.model.hypo.samples_per_prompt,
                width=self.width,
                pad_id=tok.pad_id,
                reference_micro_batch_size=g.micro_batch_size,
            )
        o = cfg.model.optune
        self.loss_fn = preference_loss_fn(
            o.beta, o.loss_type, o.sft_weight, cfg.model.hypo.kl_weight, t.global_batch_size
        )
        self.history: list[dict] = []
        self.responses_generated = 0
        self.initial: tuple[float, float] | None = None  # held-out (reward, KL) of the SFT start
        # The last evaluation's by-products, beside its (reward, KL): per-source means, response
        # counts (completion_stats) and a few samples for samples.jsonl.
        self.heldout_by_source: dict = {}
        self.heldout_completions: dict = {}
        self.heldout_samples: list[dict] = []
        self.checkpoint_seconds: list[float] = []
        self.position: Position | None = None  # the running iteration's (None between iterations)
        # Safe-point bookkeeping (set by fit): stop requests, the longest stretch between two safe
        # points (trainer.max_time's estimate), when and at which optimizer step the last save was.
        self.stop = StopRequests([], None, time.perf_counter())
        self.last_safe_point = self.last_save = 0.0
        self.longest_gap = 0.0
        self.steps_at_save = 0

    def lr_at_step(self, step: int) -> float:
        t = self.cfg.trainer
        return learning_rate(
            step,
            base_lr=t.lr,
            warmup_steps=t.lr_warmup_steps,
            total_steps=self.lr_total_steps,
            decay=t.lr_decay,
            min_lr=t.min_lr,
        )

    # ------------------------------------------------------------------ loop
    def fit(self, stop: StopRequests | None = None) -> dict:
        """The iterations; at every safe point (safe_point) all ranks agree whether a stop signal
        or trainer.max_time ends the run early, with a checkpoint."""
        start = time.perf_counter()
        if stop is not None:
            self.stop = stop
        if self.initial is None:
            self.initial = self.evaluate()
            self.log.samples(0, self.heldout_samples)
        initial, _ = self.initial
        self.log.print(f"[{self.cfg.method}] layout={self.layout.as_dict()} held-out reward at start {initial:.4f}")
        self.last_safe_point = self.last_save = time.perf_counter()
        self.steps_at_save = self.model.optimizer_steps
        iterations, stopped_by = self.cfg.trainer.iterations, None
        try:
            for it in range(len(self.history), iterations):
                record = self.iteration(it)
                self.history.append(record)
                self.log.print(iteration_line(record, iterations))
                self.log.scalars(it + 1, record)
                self.safe_point(None, due=self.checkpoint_due(it + 1), check_stop=it + 1 < iterations)  # 5.
        except Stopped as stopped:
            stopped_by = stopped.reason
            self.log.print(
                f"[stop] {stopped_by}: checkpoint {os.path.basename(stopped.checkpoint)} written "
                f"({stopped_point(stopped.checkpoint, len(self.history))}); exiting with status {EXIT_STOPPED}, "
                f"the same command resumes"
            )
        last = [r for r in self.history if r["heldout_reward"] is not None][-1:] or [
            {"heldout_reward": initial, "heldout_kl": 0.0}
        ]
        return {
            "stopped_by": stopped_by,
            "heldout_reward_initial": initial,
            "heldout_reward_final": last[0]["heldout_reward"],  # the last evaluated iteration's
            "heldout_kl_final": last[0]["heldout_kl"],
            "loop_seconds": time.perf_counter() - start,
            "responses_generated": self.responses_generated,
            **self.data_stats,
            "reward_source_failures": self.reward.failures,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_memory_mb": peak_gpu_memory_mb(),
            "checkpoint_save_seconds": self.checkpoint_seconds,
            "iterations": self.history,
        }

    def iteration(self, it: int) -> dict:
        """One iteration, phase by phase, from where `position` says it stands (a resumed run);
        a safe point follows each generation chunk, the reference pass and each training batch."""
        note_phase("iteration start", it + 1)
        pos = self.position
        if pos is None or pos.iteration != it:
            generated = torch.zeros(self.cfg.generation.max_new_tokens + 2, dtype=torch.float64)  # completion_counts
            pos = self.position = Position(it, generated, defaultdict(float))
        timer = PhaseTimer()
        timer.seconds = pos.seconds  # a resumed iteration's record counts the time spent before the stop
        window = iteration_window(
            len(self.pool.store), self.cfg.trainer.prompts_per_iteration, it, self.cfg.trainer.seed
        )
        refresh = RefreshStats()
        if self.online:
            if pos.selected is None:
                pos.selected, pos.rho = self.select(it, window, timer)  # 1.
            refresh = self.regenerate(it, pos, timer)  # 2.
        self.refresh_reference(it, pos, timer)  # 2. (offline pools: once)
        train = self.train(it, window, pos, timer)  # 3.
        eval_start = time.perf_counter()
        heldout = self.evaluate_iteration(it) if self.evaluation_due(it) else (None, None)  # 4.
        if pos.selected is not None:
            self.log.append_jsonl("selections.jsonl", {"iteration": it + 1, "regenerated": pos.selected.tolist()})
        record = self.iteration_record(it, timer, pos.generated, refresh, pos.rho, train, heldout, eval_start)
        self.position = None  # done: the next call starts the next iteration afresh
        return record

    # ---------------------------------------------------- 1. select, 2. refresh
    def select(self, it: int, window: torch.Tensor, timer: PhaseTimer) -> tuple[torch.Tensor, float | None]:
        """The prompts to regenerate (identical on every rank) and the iteration's rho."""
        with timer.phase("selection"):
            return self.pool.select(it, window)

    def regenerate(self, it: int, pos: Position, timer: PhaseTimer) -> RefreshStats:
        """New samples for `pos.selected`, generation.rollout_chunk_prompts prompts at a time
        (a safe point after each chunk), then scored and paired into the pool. The samples do not
        depend on the chunking: their noise is a function of (seed, iteration, prompt)."""
        if pos.refresh is None:
            assert pos.selected is not None
            chunks = pos.selected.split(self.cfg.generation.rollout_chunk_prompts)
            for c in range(pos.chunks_done, len(chunks)):
                rows, owned, by_source = self.pool.regenerate_chunk(
                    it, chunks[c], sampling_params(self.cfg), timer, pos.generated
                )
                if pos.rows is None or pos.owned is None or pos.by_source is None:
                    pos.rows, pos.owned, pos.by_source = rows, owned, by_source
                else:
                    pos.rows = {name: torch.cat([pos.rows[name], value]) for name, value in rows.items()}
                    pos.owned = {name: torch.cat([pos.owned[name], value]) for name, value in owned.items()}
                    pos.by_source = torch.cat([pos.by_source, by_source])
                pos.chunks_done = c + 1
                self.safe_point(("gen", c + 1))
            assert pos.rows is not None and pos.owned is not None and pos.by_source is not None
            with timer.phase("exchange"):
                pos.refresh = self.pool.apply(pos.selected, pos.rows, pos.owned, pos.by_source)
            pos.rows = pos.owned = pos.by_source = None
            self.responses_generated += pos.refresh.responses
        return pos.refresh

    def refresh_reference(self, it: int, pos: Position, timer: PhaseTimer) -> None:
        """Reference log-probs of the whole pool: offline pools once; without caching, every iteration."""
        due = (it == 0 and not self.online) or not self.cfg.model.optune.cache_reference_logprobs
        if due and not pos.reference_done:
            with timer.phase("reference"):
                self.pool.refresh_all_reference_logprobs()
            pos.reference_done = True
            self.safe_point(("ref", 1))

    # ------------------------------------------------------------- 3. train
    def train(self, it: int, window: torch.Tensor, pos: Position, timer: PhaseTimer) -> dict:
        """The engine steps aside, the policy trains on `window`, the engine takes the new weights."""
        self.engine.release()  # an external engine's memory, for training (in-process: nothing)
        train = self.train_on_pool(it, window, pos, timer)
        train.update(refit_engine(self.engine, self.model))  # external engines: the new weights (+ timings)
        return train

    def train_on_pool(self, it: int, window: torch.Tensor, pos: Position, timer: PhaseTimer) -> dict:
        """The iteration's optimizer steps over `window`, from batch `pos.batches_done` on, a safe
        point after each; HyPO's online samples are counted into `pos.generated` (completion_counts)."""
        t = self.cfg.trainer
        if pos.totals is None:
            pos.totals = torch.zeros(len(METRICS), device=self.model.device)
        batches = [
            window[b] for b in iteration_batches(len(window), t.global_batch_size, t.epochs_per_iteration, it, t.seed)
        ]
        todo = self.progress.iterate("training", batches[pos.batches_done :], unit="step")
        for b, batch in enumerate(todo, start=pos.batches_done):
            micro_batches, weight_total = self.micro_batches(batch)
            if weight_total == 0 and self.online_kl is None:
                pos.skipped += 1  # a batch of tied / identical pairs carries no signal
            else:
                self.train_step(it, b, micro_batches, pos, timer)
            pos.batches_done = b + 1
            self.safe_point(("step", b + 1))
        sums = dict(zip(METRICS, self.model.global_metric_sums(pos.totals).tolist()))
        grad_norms = pos.grad_norms
        steps = max(1, len(grad_norms))
        pairs = max(1.0, sums["pairs"])
        chosen, rejected = sums["reward_chosen"] / pairs, sums["reward_rejected"] / pairs
        return {
            "train_loss": sums["loss"] / steps,
            "train_accuracy": sums["correct"] / pairs,
            "train_margin": sums["margin"] / pairs,
            "hypo_kl": sums["kl"] / steps,
            # TRL's rewards/* and logps/*: means over the iteration's valid pairs
            "implicit_rewards": {"chosen": chosen, "rejected": rejected, "margins": chosen - rejected},
            "policy_logps": {"chosen": sums["logp_chosen"] / pairs, "rejected": sums["logp_rejected"] / pairs},
            "training_tokens": int(sum_over_dp(torch.tensor([pos.tokens], dtype=torch.float64))),
            "grad_norm": sum(grad_norms) / steps,
            "lr": self.lr_at_step(max(0, self.model.optimizer_steps - 1)),
            "optimizer_steps": len(grad_norms),
            "batches_without_signal": pos.skipped,
        }

    def train_step(self, it: int, b: int, micro_batches: list[PairMicroBatch], pos: Position, timer: PhaseTimer):
        """One optimizer step on global batch `b`, its metrics and tokens added to `pos`."""
        assert pos.totals is not None
        store = self.pool.store
        mine = torch.cat([mb["indices"] for mb in micro_batches])
        prompt_tokens = sum(len(self.pool.prompt_ids[i]) for i in mine.tolist())
        # this rank's trained tokens: prompt + response of every sequence, no padding
        pos.tokens += 2 * prompt_tokens + int(store.chosen_lengths[mine].sum() + store.rejected_lengths[mine].sum())
        if self.online_kl is not None:
            samples = self.online_kl.add_to(
                micro_batches, mine, mix_seed(self.cfg.trainer.seed, it, b), self.cfg.generation.max_new_tokens, timer
            )
            self.responses_generated += len(samples.response_lengths) * self.layout.dp
            pos.generated += completion_counts(samples, self.tokenizer)
            pos.tokens += self.online_kl.k * prompt_tokens + int(samples.response_lengths.sum())
        with timer.phase("training"):
            metrics, grad_norm = self.model.train_step(micro_batches, self.loss_fn)
        pos.grad_norms.append(grad_norm)
        pos.totals += metric_sums(metrics, self.model.device)

    def micro_batches(self, batch: torch.Tensor) -> tuple[list[PairMicroBatch], float]:
        """This rank's micro-batches of a global batch, and the batch's weight total (the
        normaliser every micro-batch of every rank divides by)."""
        o, t, dp = self.cfg.model.optune, self.cfg.trainer, self.layout.dp
        weights, valid, weight_total = global_batch_weights(
            self.pool.store, batch, o.weighting, o.weight_beta, o.weight_cap
        )
        per_rank = len(batch) // dp
        mine = slice(self.layout.dp_rank * per_rank, (self.layout.dp_rank + 1) * per_rank)
        # Each rank trains its slice of the batch, whoever owns the rows: the split, and so the
        # result, is that of a replicated pool; the rows come from their owners (one all-to-all).
        rows = self.pool.fetch([batch[r * per_rank : (r + 1) * per_rank] for r in range(dp)])
        share = torch.arange(per_rank)
        if self.online_kl is None:  # HyPO's KL term needs every prompt of the share
            share = pairs_to_train(valid[mine], micro_batch_size_for(per_rank, t.micro_batch_size))
        return preference_micro_batches(
            rows,
            self.pool.prompt_ids,
            batch[mine][share],
            weights[mine][share],
            valid[mine][share],
            weight_total,
            t.micro_batch_size,
            self.width,
            self.tokenizer.pad_id,
            token_budget=t.micro_batch_tokens,
            pack=t.pack_pairs,
        ), weight_total

    def batch_loss(self, batch: torch.Tensor) -> dict:
        """Forward only: the loss metrics of one global batch summed over DP (no update)."""
        micro_batches, _ = self.micro_batches(batch)
        metrics = self.model.get_loss_and_metrics(micro_batches, self.loss_fn, forward_only=True)
        loss, pairs, correct = self.model.global_metric_sums(metric_sums(metrics, self.model.device))[:3].tolist()
        return {"loss": loss, "pairs": pairs, "correct": correct}

    # ------------------------------------------------------------ 4. evaluate
    def evaluation_due(self, it: int) -> bool:
        t = self.cfg.trainer
        return (it + 1) % t.eval_every == 0 or it + 1 == t.iterations

    def evaluate_iteration(self, it: int) -> tuple[float, float]:
        """evaluate, and its samples to samples.jsonl."""
        heldout = self.evaluate()
        self.log.samples(it + 1, self.heldout_samples)
        return heldout

    def evaluate(self) -> tuple[float, float]:
        """(mean reward, reverse KL to the reference) of policy samples on the held-out prompts;
        also sets heldout_by_source, heldout_completions and heldout_samples (rank 0's first
        SAMPLES_PER_EVALUATION prompts, first response each).

        The noise is a function of the data seed and the prompt only, the same at every
        evaluation, so a change reflects the policy. Samples come from the policy itself
        (temperature 1, no truncation), which makes the mean of log pi(y) - log ref(y) an
        unbiased estimate of KL(pi || ref)."""
        note_phase("held-out evaluation")
        g = self.cfg.generation
        mine = dp_share(torch.arange(len(self.heldout_ids)), self.layout)[0].tolist()
        prompts = [self.heldout_ids[i] for i in mine]
        n = g.eval_samples_per_prompt
        with self.progress.phase("evaluation"):
            rollouts = self.engine.generate(
                prompts,
                n,
                SamplingParams(max_new_tokens=g.max_new_tokens),
                [mix_seed(self.cfg.data.seed, HELD_OUT_SEED, i) for i in mine],
            )
        texts = [self.tokenizer.decode(r) for r in rollouts.response_tokens]
        rewards, by_source = self.reward.score_once_per_model_parallel_group(
            [self.heldout_prompts[i] for i in mine for _ in range(n)],
            texts,
            {name: [values[i] for i in mine for _ in range(n)] for name, values in self.heldout_columns.items()},
            ~ended_on_stop(rollouts, self.tokenizer),
            rollouts.response_lengths,
        )
        tokens, mask = build_sequences(
            [p for p in prompts for _ in range(n)],
            rollouts.response_tokens,
            rollouts.response_lengths,
            self.width,
            self.tokenizer.pad_id,
        )
        ref = self.model.sequence_logprobs("reference", tokens, mask, g.micro_batch_size)
        policy = rollouts.logprobs.sum(dim=1)
        finite = torch.isfinite(rewards)
        sums = [float(rewards[finite].sum()), float(finite.sum()), float((policy - ref).sum()), float(len(texts))]
        total = sum_over_dp(
            torch.cat([torch.tensor(sums, dtype=torch.float64), completion_counts(rollouts, self.tokenizer)])
        )
        if total[1] < total[3] and self.cfg.reward.non_finite == "error":  # the same verdict on every rank
            raise RewardSourceError(
                f"the reward source returned {int(total[3] - total[1])} non-finite rewards on "
                f"held-out samples (reward.non_finite=error; =drop leaves them out of the mean)"
            )
        self.heldout_by_source = self.reward.means_over_dp(by_source)
        self.heldout_completions = completion_stats(total[4:])
        self.heldout_samples = [
            {
                "prompt_index": i,
                "prompt": self.heldout_prompts[i],  # text, or chat messages
                "response": texts[p * n],
                "length": int(rollouts.response_lengths[p * n]),
                "reward": float(rewards[p * n]) if finite[p * n] else None,
            }
            for p, i in enumerate(mine[:SAMPLES_PER_EVALUATION])
        ]
        return float(total[0] / total[1].clamp(min=1)), float(total[2] / total[3])

    # ------------------------------------------------------------ the record
    def iteration_record(
        self,
        it: int,
        timer: PhaseTimer,
        generated: torch.Tensor,
        refresh: RefreshStats,
        rho: float | None,
        train: dict,
        heldout: tuple[float | None, float | None],
        eval_start: float,
    ) -> dict:
        """What the iteration logs (metrics.jsonl, the console line, summary.json's history)."""
        evaluated = heldout[0] is not None
        completions = completion_stats(sum_over_dp(generated))
        pool = self.pool.store
        return {
            "iteration": it + 1,
            "heldout_reward": heldout[0],
            "heldout_kl": heldout[1],
            "pool_mean_reward": float(pool.chosen_rewards.add(pool.rejected_rewards).mean() / 2),
            "pool_chosen_reward": float(pool.chosen_rewards.mean()),
            "rho": rho,
            "regenerated": refresh.regenerated,
            "generated_tokens": completion_stats(generated).get("tokens", 0),  # by this rank (rank 0's is logged)
            "completions": completions,  # this iteration's new responses, all ranks
            "heldout_completions": self.heldout_completions if evaluated else {},
            "ties_dropped": refresh.ties_dropped,
            "non_finite_rewards": refresh.non_finite_rewards,
            "pool_valid_pairs": int(pool.valid.sum()),
            "reward_by_source": refresh.reward_by_source,  # mean over this iteration's new samples
            "heldout_reward_by_source": self.heldout_by_source if evaluated else {},
            **train,
            "throughput": {
                "generation_tokens_per_s": per_second(completions.get("tokens", 0), timer.seconds["generation"]),
                "training_tokens_per_s": per_second(train["training_tokens"], timer.seconds["training"]),
            },
            "memory": {"peak_rss_mb": peak_rss_mb(), "peak_gpu_memory_mb": peak_gpu_memory_mb()},  # rank 0's so far
            "seconds": {
                **{p: timer.seconds[p] for p in TIMED_PHASES},
                "total": sum(timer.seconds[p] for p in TIMED_PHASES),
                "eval": time.perf_counter() - eval_start,
            },
        }

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything besides model and optimizer that the rest of the run depends on: inside an
        iteration also its Position (every rank's part gathered here: a collective).
        (All sampling and data-order randomness is derived from seeds and the iteration.)"""
        return {
            "pool": self.pool.store.state_dict(tokens=False),  # the token rows: pool.checkpoint_files
            "history": self.history,
            "responses_generated": self.responses_generated,
            "initial": self.initial,
            "optimizer_steps": self.model.optimizer_steps,  # the LR schedule's position
            "lr_total_steps": self.lr_total_steps,  # and its horizon
            "config": as_dict(self.cfg),
            "position": self.position_state(),
        }

    def position_state(self) -> dict | None:
        """The running iteration's Position but its `owned` rows (position_files): shared fields
        once, PER_RANK ones of every rank (on the CPU), and the layout they belong to. Collective."""
        if self.position is None:
            return None
        fields = {f.name: getattr(self.position, f.name) for f in dataclasses.fields(self.position)}
        del fields["owned"]
        mine = {}
        for name in PER_RANK:
            value = getattr(self.position, name)
            mine[name] = value.cpu() if isinstance(value, torch.Tensor) else value
            del fields[name]
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        return {**fields, "ranks": ranks, "layout": self.layout.as_dict()}

    def position_files(self) -> dict[str, dict]:
        """The running iteration's new token rows of this DP rank (Position.owned), written by the
        first rank of its model-parallel group, like the pool's rows (pool.checkpoint_files)."""
        layout, owned = self.layout, self.position.owned if self.position else None
        if owned is None or layout.tp_rank or layout.pp_rank:
            return {}
        return {POSITION_TOKEN_FILE.format(layout.dp_rank): owned}

    def save_checkpoint(self, part: tuple[str, int] | None = None) -> str:
        """A training checkpoint after the iterations in history (and `part` of the next). Collective."""
        note_phase("checkpoint save")
        start = time.perf_counter()
        path = save_training_checkpoint(
            self.cfg.exp_manager.exp_dir,
            len(self.history),
            self.model,
            self.state_dict(),
            keep_last=self.cfg.exp_manager.keep_last,
            method=self.cfg.method,
            rank_files={**self.pool.checkpoint_files(), **self.position_files()},
            part=part,
        )
        self.checkpoint_seconds.append(time.perf_counter() - start)
        self.last_save, self.steps_at_save = time.perf_counter(), self.model.optimizer_steps
        return path

    def resume(self, path: str) -> None:
        state = load_training_checkpoint(path, self.model)
        done = len(state["history"])
        require_iterations_cover(self.cfg.trainer.iterations, done, path)
        self.pool.store.load_state_dict(state["pool"])
        self.pool.load_checkpoint_files(path)
        self.history = state["history"]
        self.responses_generated = state["responses_generated"]
        self.initial = state["initial"]
        self.model.optimizer_steps = state["optimizer_steps"]
        if state["lr_total_steps"] != self.lr_total_steps and self.cfg.trainer.lr_decay != "constant":
            self.log.print(
                f"[resume] trainer.iterations changed: the {self.cfg.trainer.lr_decay} LR schedule keeps "
                f"its horizon of {state['lr_total_steps']} optimizer steps (later steps use trainer.min_lr)"
            )
        self.lr_total_steps = state["lr_total_steps"]
        self.position = self.load_position(state.get("position"), path)  # absent before mid-iteration checkpoints
        self.log.print(f"[resume] from {path}: {done} iterations done ({stopped_point(path, done)})")

    def load_position(self, state: dict | None, path: str) -> Position | None:
        """This rank's Position from position_state's; a checkpoint taken inside an iteration
        resumes only under the layout that wrote it (its per-rank parts are per DP rank)."""
        if state is None:
            return None
        state = dict(state)
        ranks, layout = state.pop("ranks"), state.pop("layout")
        if layout != self.layout.as_dict():
            raise CheckpointError(
                f"{path}: written inside iteration {state['iteration'] + 1} under layout {layout}; resume it "
                f"under that layout (this run: {self.layout.as_dict()}), or from an iteration's checkpoint "
                f"(iter_NNNNNN) via exp_manager.resume_from"
            )
        mine = ranks[dist.get_rank()]
        if mine["totals"] is not None:
            mine["totals"] = mine["totals"].to(self.model.device)
        owned = os.path.join(path, POSITION_TOKEN_FILE.format(self.layout.dp_rank))
        if "owned" not in mine:  # in trainer_state.pt in checkpoints of before position_files
            mine["owned"] = torch.load(owned, weights_only=True) if os.path.exists(owned) else None
        return Position(**state, **mine)

    def next_safe_point_estimate(self) -> float:
        """Seconds up to the next safe point and its checkpoint: the longest stretch between
        two safe points so far and the longest save (for trainer.max_time, which must not be overrun)."""
        return self.longest_gap + max(self.checkpoint_seconds, default=0.0)

    def safe_point(self, part: tuple[str, int] | None, due: bool = False, check_stop: bool = True) -> None:
        """After a generation chunk, the reference pass or a training batch (`part`: the
        checkpoint's name, checkpoint_path), or an iteration (None). All ranks agree in one
        collective whether a stop request ends the run and whether exp_manager.checkpoint_every_seconds
        has passed; a checkpoint is written when so, when `due`, or every
        exp_manager.checkpoint_every_steps optimizer steps. On a stop, raises Stopped after the save."""
        e, now = self.cfg.exp_manager, time.perf_counter()
        self.longest_gap = max(self.longest_gap, now - self.last_safe_point)
        steps = self.model.optimizer_steps
        every_steps = e.checkpoint_every_steps
        by_steps = every_steps > 0 and steps != self.steps_at_save and steps % every_steps == 0
        by_time = e.checkpoint_every_seconds > 0 and now - self.last_save >= e.checkpoint_every_seconds
        stopped_by = None
        if check_stop:
            note_phase("stop check")
            stopped_by, by_time = self.stop.agree(self.next_safe_point_estimate(), by_time)
        else:
            by_time = False  # no agreement (the run's last checkpoint follows anyway)
        path = self.save_checkpoint(part) if due or by_steps or by_time or stopped_by else ""
        self.last_safe_point = time.perf_counter()
        if stopped_by:
            raise Stopped(stopped_by, path)

    def checkpoint_due(self, iterations_done: int) -> bool:
        every = self.cfg.exp_manager.checkpoint_every
        return iterations_done == self.cfg.trainer.iterations or (every > 0 and iterations_done % every == 0)

    def summary(self, result: dict) -> dict:
        return {"method": self.cfg.method, "config": as_dict(self.cfg), "layout": self.layout.as_dict(), **result}


def stopped_point(checkpoint: str, iterations_done: int) -> str:
    """Where a checkpoint stands, in words: 'after iteration 3', 'inside iteration 4, after training batch 12'."""
    part = checkpoint_part(checkpoint)
    if part is None:
        return f"after iteration {iterations_done}"
    kind, count = part
    what = {"gen": f"generation chunk {count}", "ref": "its reference pass", "step": f"training batch {count}"}
    return f"inside iteration {iterations_done + 1}, after {what[kind]}"


def per_second(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def iteration_line(record: dict, iterations: int) -> str:
    """The console line: held-out and pool rewards, the loss with TRL's implicit rewards
    (chosen/rejected), response lengths (mean/max, EOS rate), peak memory, then timings."""
    s, rw, c, m = record["seconds"], record["implicit_rewards"], record["completions"], record["memory"]
    heldout = "  -   " if record["heldout_reward"] is None else f"{record['heldout_reward']:.4f}"
    kl = "  -  " if record["heldout_kl"] is None else f"{record['heldout_kl']:.3f}"
    lengths = f"len {c['mean_length']:.1f}/{c['max_length']} eos {c['eos_rate']:.2f}  " if c else ""
    memory = m["peak_gpu_memory_mb"] if m["peak_gpu_memory_mb"] is not None else m["peak_rss_mb"]

    def rate(name: str) -> str:
        value = record["throughput"][name]
        return "" if value is None else f" {value:.0f} tok/s"

    return (
        f"[iter {record['iteration']}/{iterations}] heldout {heldout}  kl {kl}  pool {record['pool_mean_reward']:.4f}  regen {record['regenerated']:4d}  "
        f"ties {record['ties_dropped']:3d}  loss {record['train_loss']:.4f}  acc {record['train_accuracy']:.3f}  "
        f"rw {rw['chosen']:+.3f}/{rw['rejected']:+.3f}  {lengths}mem {memory:.0f}MB | "
        f"gen {s['generation']:.2f}s{rate('generation_tokens_per_s')} score {s['scoring']:.2f}s ref {s['reference']:.2f}s "
        f"train {s['training']:.2f}s{rate('training_tokens_per_s')} total {s['total']:.2f}s eval {s['eval']:.2f}s"
    )
