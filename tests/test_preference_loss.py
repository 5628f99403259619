"""From pool records to the loss (trainers/preference_loss.py, data/batching.py), against
hand-computed values. Pure torch: no megatron import."""

import math

import pytest
import torch

from nemo_optune.data.batching import iteration_batches
from nemo_optune.data.pool import PromptPool
from nemo_optune.trainers.preference_loss import (
    METRICS,
    global_batch_weights,
    metric_sums,
    preference_loss_fn,
    preference_micro_batches,
)

PAD = 99
PROMPTS = [[1, 2], [3], [4, 5, 6]]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def make_pool() -> PromptPool:
    """Three records; record 2 is invalid (its rewards tie)."""
    return PromptPool(
        chosen_tokens=torch.tensor([[11, 12, 13], [21, 22, 0], [31, 0, 0]]),
        chosen_lengths=torch.tensor([3, 2, 1]),
        rejected_tokens=torch.tensor([[14, 15, 0], [24, 0, 0], [34, 35, 36]]),
        rejected_lengths=torch.tensor([2, 1, 3]),
        chosen_rewards=torch.tensor([1.0, 0.5, 0.3]),
        rejected_rewards=torch.tensor([0.2, 0.3, 0.3]),
        valid=torch.tensor([True, True, False]),
        ref_chosen_logps=torch.tensor([-4.0, -2.0, -1.0]),
        ref_rejected_logps=torch.tensor([-5.0, -3.0, -6.0]),
        refreshed_at=torch.tensor([0, 0, 0]),
    )


# Batch order [2, 0, 1]: gaps 0, 0.8, 0.2; with beta_w = 0.5 the weight inputs are 0, 0.4, 0.1.
@pytest.mark.parametrize(
    "scheme,beta_w,cap,weights",
    [
        ("none", 0.5, None, [1.0, 1.0, 1.0]),
        ("linear", 0.5, None, [0.0, 0.4, 0.1]),
        ("exp", 0.5, None, [1.0, math.exp(0.4), math.exp(0.1)]),
        ("sigmoid", 0.5, None, [0.5, sigmoid(0.4), sigmoid(0.1)]),
        ("exp", 5.0, 3.0, [1.0, 3.0, math.e]),  # e^4 = 54.6 capped at 3; e^1 = 2.72 under the cap
    ],
)
def test_global_batch_weights(scheme, beta_w, cap, weights):
    w, valid, total = global_batch_weights(make_pool(), torch.tensor([2, 0, 1]), scheme, beta_w, cap)
    assert w.tolist() == pytest.approx(weights, rel=1e-6)
    assert valid.dtype == torch.float32 and valid.tolist() == [0.0, 1.0, 1.0]
    assert isinstance(total, float)
    assert total == pytest.approx(weights[1] + weights[2], rel=1e-6)  # invalid record 2 left out


# Prompt + response, right-padded to width 6; the mask marks positions whose NEXT token is a response token.
CHOSEN_ROWS = {0: [1, 2, 11, 12, 13, PAD], 1: [3, 21, 22, PAD, PAD, PAD], 2: [4, 5, 6, 31, PAD, PAD]}
CHOSEN_MASK = {0: [0, 1, 1, 1, 0, 0], 1: [1, 1, 0, 0, 0, 0], 2: [0, 0, 1, 0, 0, 0]}
REJECTED_ROWS = {0: [1, 2, 14, 15, PAD, PAD], 1: [3, 24, PAD, PAD, PAD, PAD], 2: [4, 5, 6, 34, 35, 36]}
REJECTED_MASK = {0: [0, 1, 1, 0, 0, 0], 1: [1, 0, 0, 0, 0, 0], 2: [0, 0, 1, 1, 1, 0]}


@pytest.mark.parametrize("micro_batch_size,sizes", [(3, [3]), (2, [1, 1, 1]), (1, [1, 1, 1])])  # equal parts
def test_preference_micro_batches_rows_and_split(micro_batch_size, sizes):
    pool = make_pool()
    order = [2, 0, 1]
    weights, valid = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0, 1.0])
    mbs = preference_micro_batches(
        pool,
        PROMPTS,
        torch.tensor(order),
        weights,
        valid,
        weight_total=13.0,
        micro_batch_size=micro_batch_size,
        width=6,
        pad_id=PAD,
    )
    assert [len(mb["indices"]) for mb in mbs] == sizes
    start = 0
    for mb, size in zip(mbs, sizes):
        ids = order[start : start + size]
        assert mb["indices"].tolist() == ids
        # rows 0..B-1: prompt + chosen, rows B..2B-1: prompt + rejected
        assert mb["tokens"].tolist() == [CHOSEN_ROWS[i] for i in ids] + [REJECTED_ROWS[i] for i in ids]
        assert mb["loss_mask"].tolist() == [CHOSEN_MASK[i] for i in ids] + [REJECTED_MASK[i] for i in ids]
        assert mb["ref_chosen_logps"].tolist() == [[-4.0, -2.0, -1.0][i] for i in ids]
        assert mb["ref_rejected_logps"].tolist() == [[-5.0, -3.0, -6.0][i] for i in ids]
        assert mb["chosen_lengths"].dtype == torch.float32
        assert mb["chosen_lengths"].tolist() == [[3, 2, 1][i] for i in ids]
        assert mb["weights"].tolist() == weights[start : start + size].tolist()
        assert mb["valid"].tolist() == valid[start : start + size].tolist()
        assert mb["weight_total"] == 13.0  # the GLOBAL normaliser, not this micro-batch's sum
        start += size


@pytest.mark.parametrize(
    "budget,groups",
    [
        (20, [[1, 0], [2]]),  # lengths: pair 1: 1 + 2 = 3, pair 0: 2 + 3 = 5, pair 2: 3 + 3 = 6; 2 x 2 x 5 = 20 fits
        (19, [[1], [0], [2]]),  # 2 x 2 x 5 = 20 > 19
        (36, [[1, 0, 2]]),  # 2 x 3 x 6 = 36
        (1, [[1], [0], [2]]),  # every pair over the budget: each alone, none dropped
    ],
)
def test_preference_micro_batches_by_tokens(budget, groups):
    """Pairs sorted by length (prompt + the longer response), grouped under the padded-token budget;
    each micro-batch's rows, weights and validity follow its own pairs."""
    pool = make_pool()
    order = torch.tensor([2, 0, 1])
    weights, valid = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0, 1.0])  # of pairs 2, 0, 1
    by_pair = {2: (5.0, 0.0), 0: (6.0, 1.0), 1: (7.0, 1.0)}
    mbs = preference_micro_batches(
        pool,
        PROMPTS,
        order,
        weights,
        valid,
        weight_total=13.0,
        micro_batch_size=3,
        width=6,
        pad_id=PAD,
        token_budget=budget,
    )
    assert [mb["indices"].tolist() for mb in mbs] == groups
    for mb, ids in zip(mbs, groups):
        assert mb["tokens"].tolist() == [CHOSEN_ROWS[i] for i in ids] + [REJECTED_ROWS[i] for i in ids]
        assert mb["loss_mask"].tolist() == [CHOSEN_MASK[i] for i in ids] + [REJECTED_MASK[i] for i in ids]
        assert mb["weights"].tolist() == [by_pair[i][0] for i in ids]
        assert mb["valid"].tolist() == [by_pair[i][1] for i in ids]
        assert mb["weight_total"] == 13.0


def test_token_budget_groups():
    from nemo_optune.data.batching import token_budget_groups

    lengths = torch.tensor([9, 2, 5, 2, 30, 5])
    groups = token_budget_groups(lengths, max_rows=8, token_budget=20, rows_per_item=2)
    # sorted: 2 (1), 2 (3), 5 (2), 5 (5), 9 (0), 30 (4): 2x2x2 = 8, 3x2x5 = 30 > 20 -> cut, ...
    assert [g.tolist() for g in groups] == [[1, 3], [2, 5], [0], [4]]
    assert [g.tolist() for g in token_budget_groups(lengths, max_rows=1, token_budget=10**6)] == [
        [1],
        [3],
        [2],
        [5],
        [0],
        [4],
    ]
    assert [g.tolist() for g in token_budget_groups(lengths, max_rows=6, token_budget=10**6)] == [[1, 3, 2, 5, 0, 4]]
    assert token_budget_groups(torch.tensor([], dtype=torch.long), 4, 100) == []
    # every item exactly once, for random lengths and budgets
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen)
        budget, cap = int(torch.randint(1, 400, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        groups = token_budget_groups(lengths, cap, budget, rows_per_item=2)
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
        for g in groups:
            assert len(g) <= cap and (len(g) == 1 or 2 * len(g) * int(lengths[g].max()) <= budget)


def test_packed_pair_sequences_hand_built():
    """Pair 0: prompt [1, 2], chosen [11, 12, 13], rejected [14, 15]; pair 1: prompt [3], chosen
    [21, 22], rejected [24]. Row = prompt, chosen, last prompt token (the bridge), rejected."""
    from nemo_optune.data.packing import packed_attention_mask, packed_pair_sequences

    rows = make_pool().rows(torch.tensor([0, 1]))
    packed = packed_pair_sequences(PROMPTS[:2], rows, 9, PAD)
    assert packed["tokens"].tolist() == [[1, 2, 11, 12, 13, 2, 14, 15, PAD], [3, 21, 22, 3, 24, PAD, PAD, PAD, PAD]]
    # the bridge takes the prompt's last position again; the rejected response continues from it
    assert packed["positions"][0, :8].tolist() == [0, 1, 2, 3, 4, 1, 2, 3]
    assert packed["positions"][1, :5].tolist() == [0, 1, 2, 0, 1]
    assert packed["pack_layout"].tolist() == [[2, 5, 8], [1, 3, 5]]  # prompt length, bridge, row length
    # labels (next tokens) of the chosen response: positions 1-3 (pair 0), 0-1 (pair 1); rejected: the bridge on
    assert packed["rejected_mask"][:, :8].tolist() == [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0, 0]]
    chosen = packed["loss_mask"] - packed["rejected_mask"]
    assert chosen[:, :8].tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    sees = ~packed_attention_mask(packed["pack_layout"], 8)[:, 0]  # [pair, query, key], trimmed to 8

    def keys(b, q):
        return sees[b, q].nonzero().squeeze(-1).tolist()

    assert [keys(0, q) for q in range(8)] == [
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 1, 2, 3],
        [0, 1, 2, 3, 4],
        [0, 5],
        [0, 5, 6],
        [0, 5, 6, 7],
    ]  # rejected: never the chosen
    assert [keys(1, q) for q in range(8)] == [[0], [0, 1], [0, 1, 2], [3], [3, 4], [5], [6], [7]]  # padding: itself
    with pytest.raises(ValueError, match="does not fit width 7"):
        packed_pair_sequences(PROMPTS[:2], rows, 7, PAD)


@pytest.mark.parametrize("budget,groups", [(16, [[1, 2], [0]]), (15, [[1], [2], [0]])])
def test_packed_micro_batches_by_tokens(budget, groups):
    """Packed rows are prompt + chosen + 1 + rejected long: pair 1: 5, pair 2: 8, pair 0: 8 (equal
    lengths keep batch order: 2 before 0)."""
    mbs = preference_micro_batches(
        make_pool(),
        PROMPTS,
        torch.tensor([2, 0, 1]),
        torch.ones(3),
        torch.ones(3),
        weight_total=3.0,
        micro_batch_size=3,
        width=6,
        pad_id=PAD,
        token_budget=budget,
        pack=True,
    )
    assert [mb["indices"].tolist() for mb in mbs] == groups
    assert all(mb["tokens"].shape[0] == len(mb["indices"]) for mb in mbs)  # one row per pair


def pair_mb(weights, valid, total, ref_chosen, ref_rejected, chosen_lengths):
    return {
        "weights": torch.tensor(weights),
        "valid": torch.tensor(valid),
        "weight_total": total,
        "ref_chosen_logps": torch.tensor(ref_chosen),
        "ref_rejected_logps": torch.tensor(ref_rejected),
        "chosen_lengths": torch.tensor(chosen_lengths),
    }


# Policy chosen [-3, -2.5], rejected [-5.5, -3.5]; reference chosen [-4, -2], rejected [-5, -3]
# -> margins 1.5 and 0.0; chosen lengths 3 and 2 -> length-normalised NLLs 1.0 and 1.25.
DPO0, DPO1 = -math.log(sigmoid(0.15)), math.log(2)  # beta = 0.1
IPO0, IPO1 = (1.5 - 5) ** 2, (0.0 - 5) ** 2  # target 1 / (2 beta) = 5


@pytest.mark.parametrize(
    "loss_type,sft_weight,valid,total,expected",
    [
        ("dpo", 0.0, [1.0, 1.0], 4.0, (1 * DPO0 + 3 * DPO1) / 4),
        ("ipo", 0.0, [1.0, 1.0], 4.0, (1 * IPO0 + 3 * IPO1) / 4),
        ("dpo", 0.5, [1.0, 1.0], 4.0, (1 * (DPO0 + 0.5 * 1.0) + 3 * (DPO1 + 0.5 * 1.25)) / 4),
        ("dpo", 0.0, [0.0, 1.0], 3.0, DPO1),  # the invalid pair contributes nothing
        ("dpo", 0.0, [1.0, 1.0], 8.0, (1 * DPO0 + 3 * DPO1) / 8),  # part of a larger global batch
        ("dpo", 0.0, [0.0, 0.0], 0.0, 0.0),  # nothing valid anywhere: zero, not nan
    ],
)
def test_preference_loss_fn_hand_computed(loss_type, sft_weight, valid, total, expected):
    mb = pair_mb([1.0, 3.0], valid, total, [-4.0, -2.0], [-5.0, -3.0], [3.0, 2.0])
    loss, metrics = preference_loss_fn(0.1, loss_type, sft_weight, kl_weight=0.0, kl_prompts_total=1)(
        mb, torch.tensor([-3.0, -2.5, -5.5, -3.5])
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["pairs"].item() == sum(valid)
    assert metrics["correct"].item() == valid[0]  # margin 1.5 > 0 counts, margin 0.0 does not
    assert metrics["margin"].item() == pytest.approx(1.5 * valid[0])
    assert metrics["kl"].item() == 0.0
    # implicit rewards beta * (policy - reference): chosen [0.1, -0.05], rejected [-0.05, -0.05];
    # summed over the valid pairs, their difference is beta times the summed margin
    v0, v1 = valid
    assert metrics["reward_chosen"].item() == pytest.approx(0.1 * v0 - 0.05 * v1)
    assert metrics["reward_rejected"].item() == pytest.approx(-0.05 * v0 - 0.05 * v1)
    assert (metrics["reward_chosen"] - metrics["reward_rejected"]).item() == pytest.approx(
        0.1 * metrics["margin"].item()
    )
    assert metrics["logp_chosen"].item() == pytest.approx(-3.0 * v0 - 2.5 * v1)
    assert metrics["logp_rejected"].item() == pytest.approx(-5.5 * v0 - 3.5 * v1)
    assert set(metrics) == set(METRICS)


def test_metric_sums_add_each_named_metric_over_micro_batches():
    """The trainer reads the sums by name: each METRICS entry is its own total over micro-batches."""
    loss_fn = preference_loss_fn(0.1, "dpo", 0.0, kl_weight=0.0, kl_prompts_total=1)
    _, first = loss_fn(
        pair_mb([1.0, 3.0], [1.0, 1.0], 4.0, [-4.0, -2.0], [-5.0, -3.0], [3.0, 2.0]),
        torch.tensor([-3.0, -2.5, -5.5, -3.5]),
    )
    _, second = loss_fn(pair_mb([1.0], [1.0], 4.0, [-1.0], [-2.0], [1.0]), torch.tensor([-0.5, -3.0]))
    sums = dict(zip(METRICS, metric_sums([first, second], torch.device("cpu")).tolist()))
    assert sums["pairs"] == 3 and sums["correct"] == 2  # margins 1.5, 0.0, 1.5
    assert sums["reward_chosen"] == pytest.approx(0.1 - 0.05 + 0.05)
    assert sums["reward_rejected"] == pytest.approx(-0.05 - 0.05 - 0.1)
    assert sums["logp_chosen"] == pytest.approx(-3.0 - 2.5 - 0.5)
    assert sums["logp_rejected"] == pytest.approx(-5.5 - 3.5 - 3.0)


def test_dpo_orientation():
    """A policy that raised the chosen log-prob over the reference has margin > 0, loss < log 2,
    and descent raises chosen further (negative gradient) and lowers rejected (positive)."""
    logps = torch.tensor([-3.5, -5.0], requires_grad=True)  # reference: chosen -4, rejected -5
    mb = pair_mb([1.0], [1.0], 1.0, [-4.0], [-5.0], [1.0])
    loss, metrics = preference_loss_fn(0.1, "dpo", 0.0, 0.0, 1)(mb, logps)
    assert metrics["margin"].item() == pytest.approx(0.5) and metrics["correct"].item() == 1
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.05))) and loss.item() < math.log(2)
    loss.backward()
    g = 0.1 * sigmoid(-0.05)  # d/dDelta of -log sigma(beta Delta) is -beta sigma(-beta Delta)
    assert logps.grad.tolist() == pytest.approx([-g, g])


# HyPO samples, k = 3 per prompt, prompt-major rows. c = policy - ref:
#   prompt 0: policy [-1, -2, -3], ref [-1.5, -1, -3] -> c [0.5, -1, 0], LOO means [-0.5, 0.25, -0.25]
#             -> c - b = [1, -1.25, 0.25], term (1*-1 - 1.25*-2 + 0.25*-3) / 3 = 0.25
#   prompt 1: policy [-2, -1, -4], ref [-3, -2, -2] -> c [1, 1, -2], LOO means [-0.5, -0.5, 1]
#             -> c - b = [1.5, 1.5, -3], term (1.5*-2 + 1.5*-1 - 3*-4) / 3 = 2.5
SAMPLE_POLICY = [-1.0, -2.0, -3.0, -2.0, -1.0, -4.0]
SAMPLE_REF = [-1.5, -1.0, -3.0, -3.0, -2.0, -2.0]
C_MINUS_B = [1.0, -1.25, 0.25, 1.5, 1.5, -3.0]
KL_LOSS = (0.25 + 2.5) / 2  # divided by the global prompt count
MEAN_C = (0.5 - 1 + 0 + 1 + 1 - 2) / 6


@pytest.mark.parametrize("kl_weight", [0.0, 0.5, 2.0])
def test_hypo_rloo_kl_term(kl_weight):
    # Both pairs have margin 0 (DPO log 2 each, weights 1): the pair part of the loss is log 2.
    mb = pair_mb([1.0, 1.0], [1.0, 1.0], 2.0, [-4.0, -2.0], [-5.0, -3.0], [1.0, 1.0])
    mb["sample_ref_logps"] = torch.tensor(SAMPLE_REF)
    logps = torch.tensor([-4.0, -2.0, -5.0, -3.0] + SAMPLE_POLICY, requires_grad=True)
    loss, metrics = preference_loss_fn(0.1, "dpo", 0.0, kl_weight, kl_prompts_total=2)(mb, logps)
    assert loss.item() == pytest.approx(math.log(2) + kl_weight * KL_LOSS)
    assert metrics["kl"].item() == pytest.approx(MEAN_C)  # reported whatever kl_weight
    loss.backward()
    sample_grad = logps.grad[4:]
    assert sample_grad.tolist() == pytest.approx([kl_weight * cb / 3 / 2 for cb in C_MINUS_B])
    if kl_weight > 0:
        # samples the policy favours more than the reference (c_j above the leave-one-out mean)
        # get a positive gradient: descent lowers them, pulling the policy towards the reference
        assert ((sample_grad > 0) == (torch.tensor(C_MINUS_B) > 0)).all()


def test_loss_and_gradient_invariant_to_micro_batch_split():
    """One global batch of 8 pairs (with HyPO samples, k = 2) split into 1, 2 or 4 micro-batches:
    summed losses, metrics and gradients w.r.t. the log-probs agree, and equal the global formula."""
    g = torch.Generator().manual_seed(0)
    n, k, beta = 8, 2, 0.1
    chosen, rejected = -torch.rand(n, generator=g) * 5, -torch.rand(n, generator=g) * 5
    ref_c, ref_r = -torch.rand(n, generator=g) * 5, -torch.rand(n, generator=g) * 5
    samples, sample_ref = -torch.rand(n * k, generator=g) * 5, -torch.rand(n * k, generator=g) * 5
    weights = torch.rand(n, generator=g) + 0.5
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    total = float((weights * valid).sum())
    lengths = torch.arange(1.0, n + 1)
    loss_fn = preference_loss_fn(beta, "dpo", 0.3, 0.5, kl_prompts_total=n)

    margin = (chosen - ref_c) - (rejected - ref_r)
    per_pair = -torch.nn.functional.logsigmoid(beta * margin) + 0.3 * (-chosen / lengths)
    c = (samples - sample_ref).view(n, k)
    kl_loss = ((c - c.flip(-1)) * samples.view(n, k)).mean(-1).sum() / n  # k = 2: b_j is the other sample
    expected = (per_pair * weights * valid).sum() / total + 0.5 * kl_loss

    results = []
    for parts in (1, 2, 4):
        leaves = [t.clone().requires_grad_() for t in (chosen, rejected, samples)]
        size = n // parts
        sums = {}
        for s in range(0, n, size):
            sl, ss = slice(s, s + size), slice(s * k, (s + size) * k)
            mb = {
                "weights": weights[sl],
                "valid": valid[sl],
                "weight_total": total,
                "ref_chosen_logps": ref_c[sl],
                "ref_rejected_logps": ref_r[sl],
                "chosen_lengths": lengths[sl],
                "sample_ref_logps": sample_ref[ss],
            }
            loss, metrics = loss_fn(mb, torch.cat([leaves[0][sl], leaves[1][sl], leaves[2][ss]]))
            loss.backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        results.append((sums, [leaf.grad for leaf in leaves]))

    assert results[0][0]["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert results[0][0]["pairs"] == 6 and results[0][0]["kl"] == pytest.approx(c.mean().item(), rel=1e-6)
    for sums, grads in results[1:]:
        assert sums == pytest.approx(results[0][0], rel=1e-6)
        for grad, ref_grad in zip(grads, results[0][1]):
            torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("num_records,batch,epochs", [(64, 32, 1), (64, 16, 2), (8, 8, 3)])
def test_iteration_batches_whole_epochs(num_records, batch, epochs):
    for it in range(3):
        batches = iteration_batches(num_records, batch, epochs, it, seed=1)
        assert len(batches) == epochs * num_records // batch
        assert all(b.shape == (batch,) for b in batches)
        stream = torch.cat(batches)
        for e in range(epochs):  # each epoch, in order, is a permutation of all records
            assert sorted(stream[e * num_records : (e + 1) * num_records].tolist()) == list(range(num_records))


def test_iteration_batches_carry_remainder():
    """40 records, batches of 32: iterations 0, 1, 2, 3 hold 1, 1, 1, 2 batches; the 160 = 5 * 32
    records they draw are epochs 0..3 back to back, each record exactly 4 times."""
    per_iteration = [iteration_batches(40, 32, 1, it, seed=3) for it in range(4)]
    assert [len(b) for b in per_iteration] == [1, 1, 1, 2]
    stream = torch.cat([b for batches in per_iteration for b in batches])
    assert stream.shape == (160,) and torch.bincount(stream, minlength=40).tolist() == [4] * 40
    for e in range(4):
        assert sorted(stream[e * 40 : (e + 1) * 40].tolist()) == list(range(40))
    # deterministic for a seed, different for another
    again = torch.cat([b for it in range(4) for b in iteration_batches(40, 32, 1, it, seed=3)])
    assert again.tolist() == stream.tolist()
    other = torch.cat([b for it in range(4) for b in iteration_batches(40, 32, 1, it, seed=4)])
    assert other.tolist() != stream.tolist()


def test_iteration_windows_are_shuffled_passes_over_the_pool():
    from nemo_optune.data.batching import iteration_window

    assert iteration_window(10, None, 3, seed=1).tolist() == list(range(10))
    # 70 prompts, windows of 32: two windows per pass, 6 prompts of each pass left for later.
    windows = [iteration_window(70, 32, it, seed=1) for it in range(6)]
    assert all(w.shape == (32,) for w in windows)
    for p in range(3):
        both = torch.cat(windows[2 * p : 2 * p + 2]).tolist()
        assert len(set(both)) == 64 and set(both) <= set(range(70))  # a pass: no prompt twice
    assert windows[0].tolist() != windows[2].tolist()  # a new pass, a new order
    assert [w.tolist() for w in windows] == [iteration_window(70, 32, it, seed=1).tolist() for it in range(6)]
    assert iteration_window(70, 32, 0, seed=2).tolist() != windows[0].tolist()


@pytest.mark.parametrize(
    "share,cap,size", [(32, 64, 32), (64, 16, 16), (48, 32, 24), (50, 16, 10), (7, 4, 1), (8, 8, 8)]
)
def test_micro_batch_size_is_a_cap_that_splits_a_rank_share_evenly(share, cap, size):
    from nemo_optune.data.batching import micro_batch_size_for

    assert micro_batch_size_for(share, cap) == size


@pytest.mark.parametrize(
    "valid,size,kept",
    [
        ([1, 0, 0, 1, 0, 0, 0, 0], 2, [0, 3]),  # two valid pairs: one micro-batch of 2
        ([0, 1, 0, 1, 1, 0, 0, 0], 2, [0, 1, 3, 4]),  # three: two micro-batches, topped up with the first tied
        ([0, 0, 0, 0], 2, [0, 1]),  # none: one micro-batch, so the rank still takes part
        ([1, 1, 1, 1], 4, [0, 1, 2, 3]),
        ([0, 0, 1, 0, 0, 0], 4, [0, 1, 2, 3]),
    ],
)
def test_tied_pairs_are_left_out_in_whole_micro_batches(valid, size, kept):
    from nemo_optune.data.batching import pairs_to_train

    assert pairs_to_train(torch.tensor(valid, dtype=torch.float), size).tolist() == kept


def test_leaving_tied_pairs_out_changes_neither_loss_nor_gradient():
    """The trained subset gives the whole share's loss and gradient: a tied pair weighs 0."""
    from nemo_optune import algorithms as alg
    from nemo_optune.data.batching import pairs_to_train

    torch.manual_seed(0)
    n, beta = 8, 0.1
    logps = torch.randn(2 * n, requires_grad=True)
    ref = torch.randn(2 * n)
    valid = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.float)
    weights = torch.rand(n)
    total = float((weights * valid).sum())

    def loss(rows: torch.Tensor) -> torch.Tensor:
        margin = alg.dpo_margin(logps[rows], logps[n + rows], ref[rows], ref[n + rows])
        return alg.weighted_mean(alg.preference_loss(margin, beta, "dpo"), weights[rows], valid[rows], total)

    whole = loss(torch.arange(n))
    (grad_whole,) = torch.autograd.grad(whole, logps)
    kept = pairs_to_train(valid, 2)
    assert len(kept) == 2
    part = loss(kept)
    (grad_part,) = torch.autograd.grad(part, logps)
    torch.testing.assert_close(part, whole)
    torch.testing.assert_close(grad_part, grad_whole)
