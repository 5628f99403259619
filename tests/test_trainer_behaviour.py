"""The trainer against absolute expectations, not against another run of itself: the loss of
a global batch recomputed by hand from an independent forward pass, the loss and gradients
of every micro-batch split, the direction a step moves the policy (DPO towards the chosen
response, HyPO's KL term towards the reference), and an evaluation that depends only on the
weights."""

import math

import pytest
import torch
from conftest import TINY

from nemo_optune.config import load_config
from nemo_optune.data.batching import iteration_batches
from nemo_optune.data.task_data import build_task_data
from nemo_optune.runtime.experiment import ExperimentLog, PhaseTimer
from nemo_optune.trainers.common import setup
from nemo_optune.trainers.preference import PreferenceTrainer


def make_trainer(tmp_path, sft_checkpoint, overrides=()):
    cfg = load_config("optune_tiny", TINY + [f"exp_manager.exp_dir={tmp_path}", *overrides])
    trainer = PreferenceTrainer(
        cfg, setup(cfg), build_task_data(cfg.data), ExperimentLog("", enabled=False, tensorboard=False)
    )
    trainer.model.load_policy(sft_checkpoint)
    trainer.model.sync_reference_to_policy()
    return trainer


@pytest.fixture
def trainer(tmp_path, sft_checkpoint):
    """After iteration 1: the pool is filled and the policy has moved off the reference."""
    t = make_trainer(tmp_path, sft_checkpoint)
    t.iteration(0)
    return t


def independent_logps(module, prompt: list[int], response: torch.Tensor) -> float:
    """log pi(response | prompt) from a plain forward pass of a TP1 megatron GPTModel."""
    tokens = torch.tensor([prompt + response.tolist()])
    length = tokens.shape[1]
    causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), 1)
    module.eval()
    with torch.no_grad():
        logits = module(tokens, torch.arange(length)[None], causal)[0]
    logp = logits.log_softmax(-1)
    p = len(prompt)
    return float(sum(logp[p - 1 + j, int(response[j])] for j in range(len(response))))


def pair_margins(trainer, batch: torch.Tensor) -> torch.Tensor:
    """Delta_i for each pair of the batch, from independent forward passes of policy and reference."""
    pool, prompts, out = trainer.pool.store, trainer.pool.prompt_ids, []
    for i in batch.tolist():
        chosen = pool.chosen_tokens[i, : pool.chosen_lengths[i]]
        rejected = pool.rejected_tokens[i, : pool.rejected_lengths[i]]
        logps = [
            independent_logps(m, prompts[i], r)
            for m in (trainer.model.policy, trainer.model.reference)
            for r in (chosen, rejected)
        ]
        out.append((logps[0] - logps[2]) - (logps[1] - logps[3]))
    return torch.tensor(out, dtype=torch.float64)


def hand_computed_loss(trainer, batch: torch.Tensor) -> float:
    """Weighted DPO as the design defines it: w_i = min(exp(beta_w (r_w - r_l)), cap) over the
    valid pairs of the whole global batch, L = sum w_i (-log sigmoid(beta Delta_i)) / sum w_i."""
    o, pool = trainer.cfg.model.optune, trainer.pool.store
    assert (o.weighting, o.loss_type) == ("exp", "dpo")
    margins = pair_margins(trainer, batch)
    numerator = denominator = 0.0
    for j, i in enumerate(batch.tolist()):
        if not pool.valid[i]:
            continue
        w = min(math.exp(o.weight_beta * float(pool.chosen_rewards[i] - pool.rejected_rewards[i])), o.weight_cap)
        numerator += w * -math.log(1 / (1 + math.exp(-o.beta * float(margins[j]))))
        denominator += w
    return numerator / denominator


def first_batch(trainer) -> torch.Tensor:
    t = trainer.cfg.trainer
    return iteration_batches(len(trainer.pool.store), t.global_batch_size, t.epochs_per_iteration, 1, t.seed)[0]


def test_batch_loss_equals_the_hand_computed_weighted_dpo_loss(trainer):
    batch = first_batch(trainer)
    pool = trainer.pool.store
    rewards_differ = pool.chosen_rewards[batch] != pool.rejected_rewards[batch]
    assert rewards_differ.any() and (pool.chosen_rewards[batch] - pool.rejected_rewards[batch]).unique().numel() > 2
    assert pair_margins(trainer, batch).abs().max() > 1e-3  # the policy has moved: a real test of orientation
    assert trainer.batch_loss(batch)["loss"] == pytest.approx(hand_computed_loss(trainer, batch), rel=1e-5)


def _loss_and_grads(trainer, batch, micro_batch_size):
    trainer.cfg.trainer.micro_batch_size = micro_batch_size
    micro_batches, _ = trainer.micro_batches(batch)
    trained = set(torch.cat([mb["indices"] for mb in micro_batches]).tolist())
    with_signal = batch[trainer.pool.store.valid[batch] > 0]
    assert set(with_signal.tolist()) <= trained  # every pair with a signal is trained
    # tied pairs only top micro-batches up (pairs_to_train)
    assert len(micro_batches) == max(1, -(-len(with_signal) // micro_batch_size))
    trainer.model.prepare_for_training_step()
    metrics = trainer.model.get_loss_and_metrics(micro_batches, trainer.loss_fn)
    return float(sum(m["loss"] for m in metrics)), [p.grad.clone() for p in trainer.model.policy.parameters()]


def test_loss_and_gradients_do_not_depend_on_the_micro_batch_split(trainer):
    batch = first_batch(trainer)
    expected = hand_computed_loss(trainer, batch)
    whole_loss, whole_grads = _loss_and_grads(trainer, batch, len(batch))
    assert whole_loss == pytest.approx(expected, rel=1e-5)
    for size in (1, 2, 8):
        loss, grads = _loss_and_grads(trainer, batch, size)
        assert loss == pytest.approx(expected, rel=1e-5), size
        for g, ref in zip(grads, whole_grads):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)


def test_token_budget_micro_batches_give_the_same_loss_and_gradients(trainer):
    """trainer.micro_batch_tokens regroups pairs by length; the global normaliser keeps the loss
    and every gradient those of the whole batch, and each micro-batch, trimmed as the model
    trims it, stays within the budget."""
    batch = first_batch(trainer)
    expected = hand_computed_loss(trainer, batch)
    _, whole_grads = _loss_and_grads(trainer, batch, len(batch))
    t = trainer.cfg.trainer
    try:
        t.micro_batch_size, t.micro_batch_tokens = len(batch), 6 * trainer.width
        micro_batches, _ = trainer.micro_batches(batch)
        assert 1 < len(micro_batches) < len(batch)
        assert sorted(torch.cat([mb["indices"] for mb in micro_batches]).tolist()) == sorted(batch.tolist())
        for mb in trainer.model._trim_padding(micro_batches):
            assert mb["tokens"].numel() <= t.micro_batch_tokens or len(mb["indices"]) == 1
        trainer.model.prepare_for_training_step()
        metrics = trainer.model.get_loss_and_metrics(micro_batches, trainer.loss_fn)
    finally:
        t.micro_batch_tokens = None
    assert float(sum(m["loss"] for m in metrics)) == pytest.approx(expected, rel=1e-5)
    for p, ref in zip(trainer.model.policy.parameters(), whole_grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("token_budget", [None, 40])
def test_packed_pairs_give_the_same_loss_margins_and_gradients(trainer, token_budget):
    """trainer.pack_pairs: one row per pair with its own positions and attention mask. The
    policy's log-probs of both responses, hence margins, loss and every gradient, are those of
    the two-row layout (alone and with micro-batches by tokens)."""
    batch = first_batch(trainer)
    expected = hand_computed_loss(trainer, batch)
    unpacked, whole_grads = _loss_and_grads(trainer, batch, len(batch))
    t = trainer.cfg.trainer
    try:
        t.micro_batch_size, t.micro_batch_tokens, t.pack_pairs = len(batch), token_budget, True
        micro_batches, _ = trainer.micro_batches(batch)
        assert all(mb["tokens"].shape[0] == len(mb["indices"]) for mb in micro_batches)  # one row per pair
        assert (len(micro_batches) > 1) == (token_budget is not None)
        trainer.model.prepare_for_training_step()
        metrics = trainer.model.get_loss_and_metrics(micro_batches, trainer.loss_fn)
    finally:
        t.micro_batch_tokens, t.pack_pairs = None, False
    assert float(sum(m["loss"] for m in metrics)) == pytest.approx(expected, rel=1e-5)
    margins = pair_margins(trainer, batch)[trainer.pool.store.valid[batch]]
    assert float(sum(m["margin"] for m in metrics)) == pytest.approx(float(margins.sum()), rel=1e-4, abs=1e-5)
    for p, ref in zip(trainer.model.policy.parameters(), whole_grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-7)


def test_a_step_moves_the_policy_towards_the_chosen_responses(trainer):
    """DPO's gradient raises log pi(y_w) - log pi(y_l) of the pool's own chosen responses,
    measured by independent forward passes (a swap of chosen and rejected anywhere in the
    assembly would lower it)."""
    batch = first_batch(trainer)
    valid = trainer.pool.store.valid[batch]
    before = pair_margins(trainer, batch)[valid]
    loss_before = trainer.batch_loss(batch)["loss"]
    for _ in range(3):
        micro_batches, _ = trainer.micro_batches(batch)
        trainer.model.train_step(micro_batches, trainer.loss_fn)
    after = pair_margins(trainer, batch)[valid]
    assert after.mean() > before.mean() + 0.05
    loss_after = trainer.batch_loss(batch)["loss"]
    assert loss_after < loss_before
    # a policy that prefers the chosen responses has a DPO loss under log 2
    assert (after > 0).float().mean() > 0.5 and loss_after < math.log(2)


def test_evaluation_depends_on_the_weights_only(tmp_path, sft_checkpoint):
    """With the learning rate at 0, iterations regenerate and train but the weights stay: the
    held-out reward and KL must not move, whatever the iteration."""
    trainer = make_trainer(tmp_path, sft_checkpoint, ["trainer.iterations=3", "exp_manager.checkpoint_every=0"])
    trainer.model.lr_schedule = lambda step: 0.0
    start = [p.detach().clone() for p in trainer.model.policy.parameters()]
    result = trainer.fit()
    for p, p0 in zip(trainer.model.policy.parameters(), start):
        assert torch.equal(p, p0)
    assert [it["optimizer_steps"] for it in result["iterations"]] == [2, 2, 2]
    assert {it["heldout_reward"] for it in result["iterations"]} == {result["heldout_reward_initial"]}
    assert {it["heldout_kl"] for it in result["iterations"]} == {trainer.initial[1]}
    assert trainer.evaluate() == trainer.initial


@pytest.fixture
def offline_jsonl(tmp_path):
    from nemo_optune.data.make_offline_preferences import main as make_preferences

    make_preferences(["--out", str(tmp_path / "prefs.jsonl"), *TINY])
    return str(tmp_path / "prefs.jsonl")


def test_hypo_kl_term_alone_moves_the_policy_towards_the_reference(tmp_path, sft_checkpoint, offline_jsonl):
    """For a policy pushed away from its reference: the KL estimates are > 0, and a plain
    gradient step on the KL term alone (every preference pair masked out) lowers the held-out
    reverse KL. (A plain step, not Adam's: Adam's first steps move every weight by +-lr
    whatever the gradient's size, and the noise of a sampled gradient then dominates.)"""
    trainer = make_trainer(
        tmp_path / "run",
        sft_checkpoint,
        [
            "method=hypo",
            f"data.offline_path={offline_jsonl}",
            "model.optune.weighting=none",
            "model.hypo.kl_weight=1.0",
            "model.hypo.samples_per_prompt=8",
        ],
    )
    params = list(trainer.model.policy.parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # push the policy away from the reference
        for p in params:
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    _, kl_before = trainer.evaluate()
    assert kl_before > 0.2
    trainer.pool.store.valid[:] = False  # no preference signal: the KL term is the whole loss
    gradient = [torch.zeros_like(p) for p in params]
    for b, batch in enumerate(iteration_batches(len(trainer.pool.store), 32, 1, 0, seed=3)):
        micro_batches, weight_total = trainer.micro_batches(batch)
        assert weight_total == 0
        trainer.online_kl.add_to(micro_batches, batch, seed=b, max_new_tokens=10, timer=PhaseTimer())
        trainer.model.prepare_for_training_step()
        metrics = trainer.model.get_loss_and_metrics(micro_batches, trainer.loss_fn)
        assert sum(float(m["kl"]) for m in metrics) > 0.2
        for g, p in zip(gradient, params):
            g += p.grad
    norm = torch.sqrt(sum((g**2).sum() for g in gradient))

    def kl_after_step(size: float) -> float:
        with torch.no_grad():
            for g, p in zip(gradient, params):
                p -= size * g / norm
        kl = trainer.evaluate()[1]
        with torch.no_grad():
            for g, p in zip(gradient, params):
                p += size * g / norm
        return kl

    # Measured here: KL 0.61 -> 0.51 along the gradient, 1.38 against it.
    descent, ascent = kl_after_step(0.05), kl_after_step(-0.05)
    assert 0 <= descent < 0.9 * kl_before and ascent > 1.1 * kl_before, (kl_before, descent, ascent)
