"""The preference-tuning loop: OPTune, online DPO, offline DPO and HyPO in one trainer.

One OPTune iteration, top to bottom (`PreferenceTrainer.iteration`):
  1. select    - the rho*N pool prompts with the lowest key, globally (the pool is replicated)
  2. generate  - K samples per selected prompt, balanced over DP ranks
  3. score     - reward of every sample
  4. pair      - best vs worst sample; all-tied prompts are counted and left out of the loss
  5. reference - reference log-probs of the new pairs (reused pairs keep their cached ones)
  6. exchange  - every rank receives every new pair and updates its pool copy
  7. train     - weighted DPO over the whole pool, weights normalised over each global batch
Online DPO is the same loop with rho = 1 and no weighting. Offline DPO skips 1-6 (the pool
is a fixed JSONL data set); HyPO is offline DPO plus, per global batch, k policy samples per
prompt for the RLOO reverse-KL term.
"""

import dataclasses
import functools
import time

import torch

from nemo_optune import algorithms as alg
from nemo_optune.config import RootConfig, as_dict
from nemo_optune.data.pool import PromptPool, build_sequences
from nemo_optune.data.preference_jsonl import DataError, read_preference_jsonl
from nemo_optune.generation.megatron_engine import MegatronInProcessEngine
from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
from nemo_optune.rewards.resilient import ResilientRewardSource, RewardSourceError
from nemo_optune.rewards.task_reward import TaskReward
from nemo_optune.runtime.checkpoint import (
    checkpoint_path,
    load_model,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)
from nemo_optune.runtime.distributed import Layout, gather_rows_over_dp, raise_if_any_rank_failed, sum_over_dp
from nemo_optune.runtime.exp_dir import checkpoints_root
from nemo_optune.runtime.experiment import ExperimentLog, PhaseTimer, peak_rss_mb
from nemo_optune.runtime.lr_schedule import learning_rate
from nemo_optune.trainers.common import TaskData, check_vocab, mix_seed, sampling_params, sequence_width

TIMED_PHASES = ("selection", "generation", "scoring", "reference", "exchange", "training")
ONLINE_METHODS = ("optune", "online_dpo")


class PreferenceTrainer:
    def __init__(self, cfg: RootConfig, layout: Layout, data: TaskData, log: ExperimentLog):
        self.cfg, self.layout, self.data, self.log = cfg, layout, data, log
        self.opt = cfg.model.optune
        self.online = cfg.method in ONLINE_METHODS
        self.long_prompts = 0  # offline prompts over the length limit (skipped or truncated)
        tok = data.tokenizer
        check_vocab(tok.vocab_size, layout.tp)
        self.tokenizer = tok
        self.width = sequence_width(cfg, data.task)
        self.heldout_ids = [tok.encode(p) for p in data.heldout_prompts]
        if self.online:
            self.train_prompts = data.train_prompts
            self.pool = PromptPool.empty(len(self.train_prompts), cfg.generation.max_new_tokens)
        else:  # read and check the data set before building any model
            self.train_prompts, self.pool, self.long_prompts = self.offline_pool(cfg.data.offline_path)
        self.train_ids = [tok.encode(p) for p in self.train_prompts]
        t = cfg.trainer
        total_steps = t.iterations * t.epochs_per_iteration * (len(self.pool) // t.global_batch_size)
        schedule = functools.partial(learning_rate, base_lr=t.lr, warmup_steps=t.lr_warmup_steps,
                                     total_steps=total_steps, decay=t.lr_decay, min_lr=t.min_lr)
        self.model = MegatronGPTOPTuneModel(cfg.model, tok.vocab_size, self.width, layout, seed=t.seed, lr=t.lr,
                                            weight_decay=t.weight_decay, grad_clip=t.grad_clip, lr_schedule=schedule)
        self.engine = MegatronInProcessEngine(self.model, tok.eos_id, tok.pad_id, cfg.generation.micro_batch_size)
        r = cfg.reward
        self.reward = ResilientRewardSource(TaskReward(data.task), r.source, r.retries, r.backoff_seconds, r.timeout_seconds)
        self.history: list[dict] = []
        self.responses_generated = 0
        self.initial: tuple[float, float] | None = None  # held-out (reward, KL) of the SFT start
        self.checkpoint_seconds: list[float] = []

    def offline_pool(self, path: str) -> tuple[list[str], PromptPool, int]:
        """A fixed pool from a NeMo-Aligner preference JSONL (pairs, rewards if given).
        Prompts over the task's length limit are handled per data.long_prompts; returns
        (prompts, pool, how many prompts were over the limit)."""
        limit, new_tokens = self.data.task.max_prompt_chars, self.cfg.generation.max_new_tokens
        prompts, rows, long_prompts = [], [], 0
        for r in read_preference_jsonl(path):
            where = f"{path}:{r.line}"
            try:
                prompt = self.tokenizer.encode(r.prompt)
                pair = [self.tokenizer.encode(text) + [self.tokenizer.eos_id] for text in (r.chosen, r.rejected)]
            except ValueError as err:
                raise DataError(f"{where}: {err}") from None
            for side, ids in zip(("chosen_response", "rejected_response"), pair):
                if len(ids) > new_tokens:
                    raise DataError(f"{where}: {side} has {len(ids)} tokens with EOS, more than "
                                    f"generation.max_new_tokens={new_tokens}")
            if len(prompt) > limit:
                long_prompts += 1
                if self.cfg.data.long_prompts == "error":
                    raise DataError(f"{where}: prompt has {len(prompt)} tokens, over the limit of {limit} "
                                    f"(data.long_prompts: skip or truncate)")
                if self.cfg.data.long_prompts == "skip":
                    continue
                r = dataclasses.replace(r, prompt=r.prompt[-limit:])  # keep the end, where the question is
            prompts.append(r.prompt)
            rows.append((pair, r))
        if not rows:
            raise DataError(f"{path}: no usable preference records (all {long_prompts} prompts were too long)")
        pool = PromptPool.empty(len(rows), new_tokens)
        for i, ((chosen, rejected), r) in enumerate(rows):
            pool.chosen_tokens[i, :len(chosen)] = torch.tensor(chosen)
            pool.chosen_lengths[i] = len(chosen)
            pool.rejected_tokens[i, :len(rejected)] = torch.tensor(rejected)
            pool.rejected_lengths[i] = len(rejected)
            pool.chosen_rewards[i] = 1.0 if r.chosen_reward is None else r.chosen_reward
            pool.rejected_rewards[i] = 0.0 if r.rejected_reward is None else r.rejected_reward
        pool.valid[:] = True
        pool.refreshed_at[:] = 0
        return prompts, pool, long_prompts

    def load_sft(self, directory: str) -> None:
        load_model(self.model.policy, directory)
        self.model.sync_reference_to_policy()

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything besides model and optimizer that the next iteration depends on.
        (All sampling and data-order randomness is derived from seeds and the iteration.)"""
        return {
            "iterations_done": len(self.history),
            "pool": self.pool.state_dict(),
            "history": self.history,
            "responses_generated": self.responses_generated,
            "initial": self.initial,
            "optimizer_steps": self.model.optimizer_steps,  # the LR schedule's position
            "config": as_dict(self.cfg),
        }

    def save_checkpoint(self) -> str:
        root = checkpoints_root(self.cfg.exp_manager.exp_dir)
        path = checkpoint_path(root, len(self.history))
        start = time.perf_counter()
        save_training_checkpoint(path, self.model.policy, self.model.optimizer, self.state_dict())
        prune_checkpoints(root, self.cfg.exp_manager.keep_last)
        self.checkpoint_seconds.append(time.perf_counter() - start)
        return path

    def resume(self, path: str) -> None:
        state = load_training_checkpoint(path, self.model.policy, self.model.optimizer)
        self.pool.load_state_dict(state["pool"])
        self.history = state["history"]
        self.responses_generated = state["responses_generated"]
        self.initial = state["initial"]
        self.model.optimizer_steps = state["optimizer_steps"]
        self.log.print(f"[resume] from {path}: {len(self.history)} iterations done")

    def checkpoint_due(self, iterations_done: int) -> bool:
        every = self.cfg.exp_manager.checkpoint_every
        return iterations_done == self.cfg.trainer.iterations or (every > 0 and iterations_done % every == 0)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        start = time.perf_counter()
        if self.initial is None:
            self.initial = self.evaluate()
        initial, initial_kl = self.initial
        self.log.print(f"[{self.cfg.method}] layout={self.layout.as_dict()} held-out reward at start {initial:.4f}")
        for it in range(len(self.history), self.cfg.trainer.iterations):
            record = self.iteration(it)
            self.history.append(record)
            s = record["seconds"]
            self.log.print(
                f"[iter {it + 1}/{self.cfg.trainer.iterations}] heldout {record['heldout_reward']:.4f}  "
                f"kl {record['heldout_kl']:.3f}  pool {record['pool_mean_reward']:.4f}  regen {record['regenerated']:4d}  "
                f"ties {record['ties_dropped']:3d}  loss {record['train_loss']:.4f}  acc {record['train_accuracy']:.3f}  | "
                f"gen {s['generation']:.2f}s score {s['scoring']:.2f}s ref {s['reference']:.2f}s "
                f"train {s['training']:.2f}s total {s['total']:.2f}s eval {s['eval']:.2f}s"
            )
            self.log.scalars(it + 1, record)
            if self.checkpoint_due(it + 1):
                self.save_checkpoint()
        return {
            "heldout_reward_initial": initial,
            "heldout_reward_final": self.history[-1]["heldout_reward"],
            "heldout_kl_final": self.history[-1]["heldout_kl"],
            "loop_seconds": time.perf_counter() - start,
            "responses_generated": self.responses_generated,
            "long_prompts": self.long_prompts,
            "reward_source_failures": self.reward.failures,
            "peak_rss_mb": peak_rss_mb(),
            "checkpoint_save_seconds": self.checkpoint_seconds,
            "iterations": self.history,
        }

    def iteration(self, it: int) -> dict:
        timer = PhaseTimer()
        regenerated = ties = non_finite = 0
        rho = None
        if self.online:
            with timer.phase("selection"):
                selected, rho = self.select(it)  # identical on every rank
            ties, non_finite = self.regenerate(it, selected, timer)
            regenerated = len(selected)
            self.log.append_jsonl("selections.jsonl", {"iteration": it + 1, "regenerated": selected.tolist()})
        if (it == 0 and not self.online) or not self.opt.cache_reference_logprobs:
            # Offline pools get their reference log-probs once; without caching, every iteration.
            with timer.phase("reference"):
                self.refresh_all_reference_logprobs()
        train = self.train_on_pool(it, timer)
        iteration_seconds = sum(timer.seconds[p] for p in TIMED_PHASES)
        eval_start = time.perf_counter()
        heldout, heldout_kl = self.evaluate()
        return {
            "iteration": it + 1,
            "heldout_reward": heldout,
            "heldout_kl": heldout_kl,
            "pool_mean_reward": float(self.pool.chosen_rewards.add(self.pool.rejected_rewards).mean() / 2),
            "pool_chosen_reward": float(self.pool.chosen_rewards.mean()),
            "rho": rho,
            "regenerated": regenerated,
            "ties_dropped": ties,
            "non_finite_rewards": non_finite,
            "pool_valid_pairs": int(self.pool.valid.sum()),
            **train,
            "seconds": {
                **{p: timer.seconds[p] for p in TIMED_PHASES},
                "total": iteration_seconds,
                "eval": time.perf_counter() - eval_start,
            },
        }

    def dp_share(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """This rank's balanced part of `indices`, and every rank's part size (for gathers)."""
        dp = self.layout.dp
        return (alg.balanced_shard(indices, self.layout.dp_rank, dp),
                [len(alg.balanced_shard(indices, r, dp)) for r in range(dp)])

    def regenerate(self, it: int, selected: torch.Tensor, timer: PhaseTimer) -> tuple[int, int]:
        """Steps 2-6 for the selected prompts; returns (prompts without a preference,
        samples left out for a non-finite reward)."""
        mine, counts = self.dp_share(selected)
        K = self.opt.samples_per_prompt
        prompts = [self.train_ids[i] for i in mine.tolist()]
        with timer.phase("generation"):
            seeds = [mix_seed(self.cfg.trainer.seed, it, i) for i in mine.tolist()]
            rollouts = self.engine.generate(prompts, K, sampling_params(self.cfg), seeds)
        with timer.phase("scoring"):
            texts = [self.tokenizer.decode(r) for r in rollouts.response_tokens]
            prompt_texts = [self.train_prompts[i] for i in mine.tolist() for _ in range(K)]
            failure = None
            try:
                rewards = torch.tensor(self.reward.score(prompt_texts, texts), dtype=torch.float32).view(-1, K)
            except RewardSourceError as err:
                failure, rewards = err, torch.zeros(len(prompts), K)
            raise_if_any_rank_failed(failure)  # before the pool is touched
        non_finite = (~torch.isfinite(rewards)).sum(dim=1)
        chosen, rejected, valid = alg.best_worst_pairs(rewards, drop_non_finite=True)
        rows = torch.arange(len(prompts)) * K
        new = {
            "chosen_tokens": rollouts.response_tokens[rows + chosen],
            "chosen_lengths": rollouts.response_lengths[rows + chosen],
            "rejected_tokens": rollouts.response_tokens[rows + rejected],
            "rejected_lengths": rollouts.response_lengths[rows + rejected],
            # A prompt with no finite reward at all keeps key 0: it is regenerated first next time.
            "chosen_rewards": torch.nan_to_num(rewards.gather(1, chosen[:, None]).squeeze(1), 0.0, 0.0, 0.0),
            "rejected_rewards": torch.nan_to_num(rewards.gather(1, rejected[:, None]).squeeze(1), 0.0, 0.0, 0.0),
            "valid": valid,
            "refreshed_at": torch.full((len(prompts),), it, dtype=torch.long),
            "ref_chosen_logps": torch.zeros(len(prompts)),
            "ref_rejected_logps": torch.zeros(len(prompts)),
            "non_finite": non_finite,
        }
        if self.opt.cache_reference_logprobs:
            with timer.phase("reference"):
                new["ref_chosen_logps"], new["ref_rejected_logps"] = self.reference_logprobs(prompts, new)
        with timer.phase("exchange"):
            gathered = {name: gather_rows_over_dp(value, counts) for name, value in new.items()}
        dropped = int(gathered["non_finite"].sum())
        if dropped and self.cfg.reward.non_finite == "error":
            raise RewardSourceError(f"the reward source returned {dropped} non-finite rewards at iteration {it + 1} "
                                    f"(reward.non_finite=error; =drop leaves them out); the prompt pool was not updated")
        self.pool.update(selected, gathered)
        self.responses_generated += len(selected) * K
        return int(len(selected) - gathered["valid"].sum()), dropped

    # -------------------------------------------------------------- 1. select
    def select(self, it: int) -> tuple[torch.Tensor, float]:
        """(pool indices to regenerate, the rho used)."""
        n = len(self.pool)
        if it == 0:
            return torch.arange(n), 1.0  # iteration 0 fills the whole pool
        rho = self.opt.rho
        a = self.opt.adaptive_rho
        if a.enabled:
            keys = alg.selection_keys(self.pool.chosen_rewards, self.pool.rejected_rewards, self.opt.selection_key)
            rho = alg.adaptive_rho(keys, a.target, a.rho_min, a.rho_max)
        generator = torch.Generator().manual_seed(mix_seed(self.cfg.trainer.seed, it, 0xC0FFEE))
        selected = alg.select_prompts(self.opt.selection, alg.num_selected(n, rho), self.pool.chosen_rewards,
                                      self.pool.rejected_rewards, self.opt.selection_key, generator)
        return selected, rho

    # ----------------------------------------------------------- 5. reference
    def pair_sequences(self, prompts: list[list[int]], rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen rows then rejected rows: tokens [2B, W], loss mask [2B, W]."""
        pad = self.tokenizer.pad_id
        c_tok, c_mask = build_sequences(prompts, rows["chosen_tokens"], rows["chosen_lengths"], self.width, pad)
        r_tok, r_mask = build_sequences(prompts, rows["rejected_tokens"], rows["rejected_lengths"], self.width, pad)
        return torch.cat([c_tok, r_tok]), torch.cat([c_mask, r_mask])

    def reference_logprobs(self, prompts: list[list[int]], rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = self.pair_sequences(prompts, rows)
        logps = self.model.sequence_logprobs("reference", tokens, mask, self.cfg.generation.micro_batch_size)
        return logps[: len(prompts)], logps[len(prompts):]

    def refresh_all_reference_logprobs(self) -> None:
        mine, counts = self.dp_share(torch.arange(len(self.pool)))
        ref_c, ref_r = self.reference_logprobs([self.train_ids[i] for i in mine.tolist()], self.pool.rows(mine))
        self.pool.ref_chosen_logps.copy_(gather_rows_over_dp(ref_c, counts))
        self.pool.ref_rejected_logps.copy_(gather_rows_over_dp(ref_r, counts))

    # --------------------------------------------------------------- 7. train
    def train_on_pool(self, it: int, timer: PhaseTimer) -> dict:
        t, o, dp = self.cfg.trainer, self.opt, self.layout.dp
        per_rank = t.global_batch_size // dp
        totals = torch.zeros(5)  # loss, pairs, correct, margin sum, HyPO KL sum
        grad_norms = []
        for epoch in range(t.epochs_per_iteration):
            order = torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(mix_seed(t.seed, it, epoch, 7)))
            # Whole global batches only (every DP rank needs equal shares); online pools are
            # sized to fit exactly, offline ones drop a different remainder each epoch.
            for step, start in enumerate(range(0, len(order) - t.global_batch_size + 1, t.global_batch_size)):
                batch = order[start:start + t.global_batch_size]
                # Weights over the GLOBAL batch: every rank holds the pool, so no communication.
                weights = alg.reward_gap_weights(self.pool.chosen_rewards[batch], self.pool.rejected_rewards[batch],
                                                 o.weighting, o.weight_beta, o.weight_cap)
                valid = self.pool.valid[batch].float()
                weight_total = float((weights * valid).sum())
                if weight_total == 0 and self.cfg.method != "hypo":
                    continue  # a batch of all-tied pairs carries no signal
                mine = slice(self.layout.dp_rank * per_rank, (self.layout.dp_rank + 1) * per_rank)
                micro_batches = self.train_micro_batches(batch[mine], weights[mine], valid[mine], weight_total)
                if self.cfg.method == "hypo":
                    self.add_online_samples(micro_batches, batch[mine], mix_seed(t.seed, it, epoch, step), timer)
                with timer.phase("training"):
                    metrics, grad_norm = self.model.train_step(micro_batches, self.loss_fn)
                grad_norms.append(grad_norm)
                for m in metrics:
                    totals += torch.stack([m["loss"], m["pairs"], m["correct"], m["margin"], m["kl"]]).float()
        totals = self.model.global_metric_sums(totals)
        steps = max(1, len(grad_norms))
        pairs = max(1.0, float(totals[1]))
        return {
            "train_loss": float(totals[0]) / steps,
            "train_accuracy": float(totals[2]) / pairs,
            "train_margin": float(totals[3]) / pairs,
            "hypo_kl": float(totals[4]) / steps,
            "grad_norm": sum(grad_norms) / steps,
            "lr": self.model.lr_schedule(max(0, self.model.optimizer_steps - 1)),
            "optimizer_steps": len(grad_norms),
        }

    def train_micro_batches(self, indices: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                            weight_total: float) -> list[dict]:
        size = self.cfg.trainer.micro_batch_size
        out = []
        for s in range(0, len(indices), size):
            idx = indices[s:s + size]
            rows = self.pool.rows(idx)
            tokens, mask = self.pair_sequences([self.train_ids[i] for i in idx.tolist()], rows)
            out.append({
                "indices": idx, "tokens": tokens, "loss_mask": mask,
                "ref_chosen_logps": rows["ref_chosen_logps"], "ref_rejected_logps": rows["ref_rejected_logps"],
                "chosen_lengths": rows["chosen_lengths"].float(),
                "weights": weights[s:s + size], "valid": valid[s:s + size], "weight_total": weight_total,
            })
        return out

    def add_online_samples(self, micro_batches: list[dict], indices: torch.Tensor, seed: int, timer: PhaseTimer) -> None:
        """HyPO: k policy samples per prompt of this rank's share, appended to each
        micro-batch after its pair rows, with their (no-grad) reference log-probs."""
        k = self.cfg.model.hypo.samples_per_prompt
        prompts = [self.train_ids[i] for i in indices.tolist()]
        with timer.phase("generation"):
            rollouts = self.engine.generate(prompts, k, sampling_params(self.cfg),
                                            [mix_seed(seed, i) for i in indices.tolist()])
        self.responses_generated += len(prompts) * k * self.layout.dp
        sample_prompts = [p for p in prompts for _ in range(k)]
        tokens, mask = build_sequences(sample_prompts, rollouts.response_tokens, rollouts.response_lengths,
                                       self.width, self.tokenizer.pad_id)
        with timer.phase("reference"):
            ref = self.model.sequence_logprobs("reference", tokens, mask, self.cfg.generation.micro_batch_size)
        start = 0
        for mb in micro_batches:
            rows = slice(start * k, (start + len(mb["indices"])) * k)
            mb["tokens"] = torch.cat([mb["tokens"], tokens[rows]])
            mb["loss_mask"] = torch.cat([mb["loss_mask"], mask[rows]])
            mb["sample_ref_logps"] = ref[rows]
            start += len(mb["indices"])

    def loss_fn(self, mb: dict, sequence_logps: torch.Tensor):
        """Weighted DPO/IPO (+ optional SFT term, + HyPO's KL term) on one micro-batch,
        scaled by global normalisers so micro-batches and DP ranks add up exactly."""
        o = self.opt
        n = mb["weights"].shape[0]
        policy_chosen, policy_rejected = sequence_logps[:n], sequence_logps[n:2 * n]
        margin = alg.dpo_margin(policy_chosen, policy_rejected, mb["ref_chosen_logps"], mb["ref_rejected_logps"])
        per_pair = alg.preference_loss(margin, o.beta, o.loss_type)
        if o.sft_weight > 0:
            per_pair = per_pair + o.sft_weight * alg.sft_nll(policy_chosen, mb["chosen_lengths"])
        loss = alg.weighted_mean(per_pair, mb["weights"], mb["valid"], mb["weight_total"])
        kl = torch.zeros(())
        if "sample_ref_logps" in mb:
            k = self.cfg.model.hypo.samples_per_prompt
            kl_loss, kl = alg.rloo_kl_loss_sum(sequence_logps[2 * n:].view(n, k), mb["sample_ref_logps"].view(n, k),
                                               self.cfg.trainer.global_batch_size)
            loss = loss + self.cfg.model.hypo.kl_weight * kl_loss
        valid = mb["valid"]
        return loss, {
            "loss": loss.detach(),
            "pairs": valid.sum(),
            "correct": ((margin.detach() > 0).float() * valid).sum(),
            "margin": (margin.detach() * valid).sum(),
            "kl": kl.detach(),
        }

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> tuple[float, float]:
        """(mean reward, reverse KL to the reference) of samples on the held-out prompts.

        Fixed seeds: the same noise at every evaluation, so changes reflect the policy. The
        KL estimate is the mean of log pi(y) - log ref(y) over those samples (exact in
        expectation when eval_temperature is 1)."""
        g = self.cfg.generation
        mine = self.dp_share(torch.arange(len(self.heldout_ids)))[0].tolist()
        prompts = [self.heldout_ids[i] for i in mine]
        rollouts = self.engine.generate(prompts, g.eval_samples_per_prompt,
                                        sampling_params(self.cfg, g.eval_temperature),
                                        [mix_seed(self.cfg.data.seed, 0xE7A1, i) for i in mine])
        texts = [self.tokenizer.decode(r) for r in rollouts.response_tokens]
        sample_prompts = [p for p in prompts for _ in range(g.eval_samples_per_prompt)]
        prompt_texts = [self.data.heldout_prompts[i] for i in mine for _ in range(g.eval_samples_per_prompt)]
        tokens, mask = build_sequences(sample_prompts, rollouts.response_tokens, rollouts.response_lengths,
                                       self.width, self.tokenizer.pad_id)
        ref = self.model.sequence_logprobs("reference", tokens, mask, g.micro_batch_size)
        policy = rollouts.logprobs.sum(dim=1)
        total = sum_over_dp(torch.tensor([sum(self.reward.score(prompt_texts, texts)), float((policy - ref).sum()),
                                          float(len(texts))], dtype=torch.float64))
        return float(total[0] / total[2]), float(total[1] / total[2])

    def summary(self, result: dict) -> dict:
        return {"method": self.cfg.method, "config": as_dict(self.cfg), "layout": self.layout.as_dict(), **result}
