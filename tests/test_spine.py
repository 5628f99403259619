"""The single-process spine: log-probs, the pool across an iteration, selection, end to end."""

import json
import os

import pytest
import torch
from conftest import TINY

from nemo_optune.config import load_config
from nemo_optune.data.task_data import build_task_data
from nemo_optune.runtime.experiment import ExperimentLog
from nemo_optune.trainers.common import setup, sft_checkpoint_dir
from nemo_optune.trainers.preference import PreferenceTrainer
from nemo_optune.trainers.sft import run_sft


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """An OPTune trainer on a briefly SFT-trained policy, after iteration 1 (pool filled)."""
    exp = tmp_path_factory.mktemp("spine")
    cfg = load_config("optune_tiny", TINY + [f"exp_manager.exp_dir={exp}"])
    layout = setup(cfg)
    data = build_task_data(cfg.data)
    run_sft(cfg, layout, data, sft_checkpoint_dir(cfg), log=lambda *_: None)
    t = PreferenceTrainer(cfg, layout, data, ExperimentLog(str(exp), enabled=False, tensorboard=False))
    t.model.load_policy(sft_checkpoint_dir(cfg))
    t.model.sync_reference_to_policy()
    t.iteration(0)
    return t


def test_response_logprobs_equal_manual_log_softmax_gather(trainer):
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, trainer.tokenizer.vocab_size, (6, trainer.width), generator=g)
    mask = torch.zeros(6, trainer.width)
    mask[:, 4:11] = 1.0
    mask[2, 11:14] = 1.0
    got = model.sequence_logprobs("policy", tokens, mask, micro_batch_size=4)

    model.policy.eval()
    with torch.no_grad():
        positions = torch.arange(trainer.width).unsqueeze(0).expand_as(tokens)
        causal = torch.triu(torch.ones(1, 1, trainer.width, trainer.width, dtype=torch.bool), 1)
        logits = model.policy(tokens, positions, causal)  # [B, L, V] at TP1
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    expected = (logp * mask[:, :-1]).sum(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _fresh_reference(trainer):
    pool = trainer.pool
    return pool.reference_logprobs(pool.prompt_ids, pool.store.rows(torch.arange(len(pool.store))))


def test_cached_reference_logprobs_equal_fresh_ones(trainer):
    fresh_c, fresh_r = _fresh_reference(trainer)
    torch.testing.assert_close(trainer.pool.store.ref_chosen_logps, fresh_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(trainer.pool.store.ref_rejected_logps, fresh_r, atol=1e-5, rtol=0)


def test_iteration_selects_lowest_keys_and_leaves_the_rest_untouched(trainer):
    pool = trainer.pool.store
    before = pool.state_dict()
    keys = before["chosen_rewards"].tolist()
    count = len(keys) // 2  # rho = 0.5
    # Independent statement of the rule: the `count` lowest keys, ties to the stalest pair, then
    # the lower index (after iteration 0 every pair is equally old).
    assert (before["refreshed_at"] == 0).all()
    expected = sorted(sorted(range(len(keys)), key=lambda i: (keys[i], i))[:count])

    record = trainer.iteration(1)
    selected = sorted(int(i) for i in torch.nonzero(pool.refreshed_at == 1).squeeze(1))
    assert record["regenerated"] == count
    assert selected == expected
    untouched = torch.ones(len(keys), dtype=torch.bool)
    untouched[expected] = False
    for name, old in before.items():
        assert torch.equal(getattr(pool, name)[untouched], old[untouched]), name
    # Reused pairs kept their cache and it is still exact (the reference is frozen).
    fresh_c, _ = _fresh_reference(trainer)
    torch.testing.assert_close(pool.ref_chosen_logps, fresh_c, atol=1e-5, rtol=0)


def test_a_window_iteration_regenerates_and_trains_its_window_only(trainer, monkeypatch):
    """trainer.prompts_per_iteration=32 of 64 prompts: the iteration selects the rho share of the
    lowest keys among its window, trains one optimizer step (32 pairs) on the window, and leaves
    every entry outside the window untouched."""
    from nemo_optune.data.batching import iteration_window

    monkeypatch.setattr(trainer.cfg.trainer, "prompts_per_iteration", 32)
    pool, it = trainer.pool.store, 5
    window = iteration_window(len(pool), 32, it, trainer.cfg.trainer.seed)
    before = pool.state_dict()
    keys = before["chosen_rewards"]
    age = before["refreshed_at"]  # equal keys: the stalest pair first, then the lower index
    expected = sorted(sorted(window.tolist(), key=lambda i: (float(keys[i]), int(age[i]), i))[:16])
    trained = []
    real_train_step = trainer.model.train_step
    monkeypatch.setattr(
        trainer.model,
        "train_step",
        lambda mbs, fn: (trained.extend(int(i) for mb in mbs for i in mb["indices"]), real_train_step(mbs, fn))[1],
    )

    record = trainer.iteration(it)
    assert record["regenerated"] == 16 and record["optimizer_steps"] == 1
    assert sorted(int(i) for i in torch.nonzero(pool.refreshed_at == it).squeeze(1)) == expected
    assert sorted(trained) == sorted(window.tolist())
    outside = torch.ones(len(pool), dtype=torch.bool)
    outside[window] = False
    for name, old in before.items():
        assert torch.equal(getattr(pool, name)[outside], old[outside]), name


def test_equal_keys_go_to_the_stalest_pairs(trainer, monkeypatch):
    """Late in training most chosen rewards tie at the maximum: the oldest pairs are refreshed."""
    store = trainer.pool.store
    ages = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(store, "chosen_rewards", torch.ones(len(store)))
    monkeypatch.setattr(store, "refreshed_at", ages)
    selected, rho = trainer.pool.select(99, torch.arange(len(store)))
    assert rho == 0.5 and selected.tolist() == sorted(torch.argsort(ages)[: len(store) // 2].tolist())


def test_eval_every_skips_held_out_evaluation_between_and_keeps_the_last(trainer, monkeypatch):
    from nemo_optune.trainers.preference import iteration_line

    monkeypatch.setattr(trainer.cfg.trainer, "eval_every", 4)
    monkeypatch.setattr(trainer.cfg.trainer, "iterations", 7)
    calls = []
    monkeypatch.setattr(trainer, "evaluate", lambda: (calls.append(1), (0.5, 0.1))[1])
    records = {it: trainer.iteration(it) for it in (4, 5, 6)}  # iterations 5, 6, 7 (the last)
    assert [records[it]["heldout_reward"] for it in (4, 5, 6)] == [None, None, 0.5] and len(calls) == 1
    assert " heldout   -     kl   -  " in iteration_line(records[4], 7)
    trainer.cfg.trainer.iterations = 8  # iteration 8 is then the last: 7 is not evaluated
    assert trainer.iteration(6)["heldout_reward"] is None and len(calls) == 1


def test_iteration_metrics_are_hand_counts_of_its_rollouts_and_pairs(trainer, monkeypatch):
    """Response lengths and EOS rate: a count of the iteration's rollouts (regeneration, then
    the held-out evaluation); implicit rewards, log-probs and trained tokens: from the pool's pairs."""
    calls = []
    real_generate = trainer.engine.generate
    monkeypatch.setattr(trainer.engine, "generate", lambda *a, **k: calls.append(real_generate(*a, **k)) or calls[-1])
    record = trainer.iteration(7)
    regenerated, heldout = calls
    max_new, tok = trainer.cfg.generation.max_new_tokens, trainer.tokenizer
    for rollouts, stats in ((regenerated, record["completions"]), (heldout, record["heldout_completions"])):
        lengths = rollouts.response_lengths.tolist()
        ended = [
            n < max_new or int(row[n - 1]) in tok.eos_ids | {tok.pad_id}
            for row, n in zip(rollouts.response_tokens, lengths)
        ]
        assert stats == {
            "responses": len(lengths),
            "tokens": sum(lengths),
            "mean_length": pytest.approx(sum(lengths) / len(lengths)),
            "min_length": min(lengths),
            "max_length": max(lengths),
            "eos_rate": pytest.approx(sum(ended) / len(lengths)),
        }
        assert 0 < stats["eos_rate"] < 1 and stats["max_length"] <= max_new  # the tiny policy does both
    assert record["generated_tokens"] == record["completions"]["tokens"]  # one rank
    seconds = record["seconds"]
    assert record["throughput"]["generation_tokens_per_s"] == pytest.approx(
        record["completions"]["tokens"] / seconds["generation"]
    )

    # every pair of the pool was trained once (one epoch, no batch skipped)
    store, beta = trainer.pool.store, trainer.cfg.model.optune.beta
    assert record["batches_without_signal"] == 0 and trainer.cfg.trainer.epochs_per_iteration == 1
    prompts = sum(len(p) for p in trainer.pool.prompt_ids)
    assert record["training_tokens"] == 2 * prompts + int(store.chosen_lengths.sum() + store.rejected_lengths.sum())
    assert record["throughput"]["training_tokens_per_s"] == pytest.approx(
        record["training_tokens"] / seconds["training"]
    )
    rewards, logps = record["implicit_rewards"], record["policy_logps"]
    valid = store.valid  # float32 sums: to 1e-5
    assert rewards["chosen"] == pytest.approx(
        beta * (logps["chosen"] - float(store.ref_chosen_logps[valid].mean())), abs=1e-5
    )
    assert rewards["rejected"] == pytest.approx(
        beta * (logps["rejected"] - float(store.ref_rejected_logps[valid].mean())), abs=1e-5
    )
    assert rewards["margins"] == pytest.approx(rewards["chosen"] - rewards["rejected"])
    assert rewards["margins"] == pytest.approx(beta * record["train_margin"], abs=1e-5)
    assert logps["chosen"] < 0 and logps["rejected"] < 0
    assert record["memory"]["peak_rss_mb"] > 100 and record["memory"]["peak_gpu_memory_mb"] is None  # CPU


def test_pool_pairs_are_valid_exactly_when_their_rewards_differ(trainer):
    pool = trainer.pool.store
    tied = pool.chosen_rewards == pool.rejected_rewards
    assert torch.equal(~tied, pool.valid)


def test_end_to_end_two_iterations(tiny_overrides):
    from nemo_optune.run import run_experiment

    cfg = load_config("optune_tiny", tiny_overrides + ["exp_manager.report=true", "exp_manager.tensorboard=true"])
    summary = run_experiment(cfg)
    exp = cfg.exp_manager.exp_dir
    with open(os.path.join(exp, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["method"] == "optune"
    assert on_disk["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    assert len(on_disk["iterations"]) == 2
    first, second = on_disk["iterations"]
    assert first["regenerated"] == 64 and second["regenerated"] == 32
    assert on_disk["responses_generated"] == (64 + 32) * 4
    for it in on_disk["iterations"]:
        for phase in ("generation", "scoring", "reference", "training", "total"):
            assert it["seconds"][phase] >= 0
        assert 0 <= it["heldout_reward"] <= 1
        assert it["train_loss"] > 0
    assert 0 <= summary["heldout_reward_initial"] <= 1
    assert on_disk["wall_seconds"] >= on_disk["sft_seconds"] > 0
    lines = open(os.path.join(exp, "selections.jsonl")).read().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    assert len(json.loads(lines[1])["regenerated"]) == 32
    assert os.path.getsize(os.path.join(exp, "report.png")) > 1000
    assert os.listdir(os.path.join(exp, "tensorboard"))

    # docs/metrics.md's metrics: in summary.json with plausible values, in TensorBoard by name
    max_new = cfg.generation.max_new_tokens
    for it in on_disk["iterations"]:
        for stats in (it["completions"], it["heldout_completions"]):
            assert 1 <= stats["min_length"] <= stats["mean_length"] <= stats["max_length"] <= max_new
            assert 0 <= stats["eos_rate"] <= 1
        assert it["completions"]["responses"] == it["regenerated"] * 4
        assert it["heldout_completions"]["responses"] == 32 * 2  # held-out prompts x eval samples
        rewards = it["implicit_rewards"]
        assert rewards["margins"] == pytest.approx(rewards["chosen"] - rewards["rejected"])
        assert it["throughput"]["generation_tokens_per_s"] > 0 and it["throughput"]["training_tokens_per_s"] > 0
        assert it["memory"]["peak_rss_mb"] <= on_disk["peak_rss_mb"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(exp, "tensorboard"))
    events.Reload()
    names = set(events.Tags()["scalars"])
    for name in (
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/logps/chosen",
        "train/logps/rejected",
        "rollout/completions/mean_length",
        "rollout/completions/max_length",
        "rollout/completions/eos_rate",
        "val/completions/mean_length",
        "throughput/generation_tokens_per_s",
        "throughput/training_tokens_per_s",
        "memory/peak_rss_mb",
    ):
        assert name in names, name
    eos = [(e.step, e.value) for e in events.Scalars("rollout/completions/eos_rate")]
    assert eos == [(i, pytest.approx(r["completions"]["eos_rate"])) for i, r in enumerate(on_disk["iterations"], 1)]
    assert [e.step for e in events.Tensors("val/samples/text_summary")] == [0, 1, 2]

    # samples.jsonl: the first 3 held-out prompts at the start and after each iteration, with
    # the reward their response gets
    data = build_task_data(cfg.data)
    samples = [json.loads(line) for line in open(os.path.join(exp, "samples.jsonl"))]
    assert [(s["iteration"], s["prompt_index"]) for s in samples] == [(i, p) for i in range(3) for p in range(3)]
    for s in samples:
        assert s["prompt"] == data.heldout_prompts[s["prompt_index"]]
        assert s["reward"] == pytest.approx(data.task.reward(s["prompt"], s["response"]))
        assert 1 <= s["length"] <= max_new


def test_stored_pairs_are_the_best_and_worst_samples_with_their_own_rewards(trainer):
    """Rescoring each stored response gives the stored reward, and the chosen one is the better:
    the pool's pairs are oriented (a swap of tokens or of rewards anywhere in the refresh fails)."""
    pool, tok, task = trainer.pool.store, trainer.tokenizer, trainer.data.task
    for i, prompt in enumerate(trainer.pool.prompt_texts):
        chosen = task.reward(prompt, tok.decode(pool.chosen_tokens[i, : pool.chosen_lengths[i]]))
        rejected = task.reward(prompt, tok.decode(pool.rejected_tokens[i, : pool.rejected_lengths[i]]))
        assert (chosen, rejected) == pytest.approx((float(pool.chosen_rewards[i]), float(pool.rejected_rewards[i])))
        assert chosen >= rejected
    assert (pool.chosen_rewards > pool.rejected_rewards).sum() > len(pool) // 2
