"""The KV-cached rollout engine (models/kv_cache.py) against the recompute
engine it replaces: same tokens, same log-probs, under TP and PP; and the per-step counter
noise that makes both draw the same samples whatever the batch."""

import pytest
import torch
from conftest import TINY

from nemo_optune.generation.base import SamplingParams
from nemo_optune.generation.megatron_engine import MegatronInProcessEngine, MegatronRecomputeEngine
from nemo_optune.generation.sampling import counter_uniform

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16)


# ------------------------------------------------------------------ the noise
def test_counter_uniform_is_uniform_and_deterministic():
    u = counter_uniform(torch.tensor([3, 3, 7]), torch.tensor([0, 1, 0]), steps=200_000)
    assert u.shape == (3, 200_000) and u.dtype == torch.float32
    assert float(u.min()) > 0 and float(u.max()) < 1
    for row in u:  # mean 1/2, variance 1/12, flat histogram
        assert abs(float(row.mean()) - 0.5) < 0.005
        assert abs(float(row.var()) - 1 / 12) < 0.002
        counts = torch.histc(row, bins=20, min=0, max=1)
        assert float((counts / len(row) - 0.05).abs().max()) < 0.003
    # Rows (seeds, samples) are uncorrelated, and so are consecutive steps of a row.
    assert abs(float(torch.corrcoef(u)[0, 1:].abs().max())) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1])) < 0.01
    assert torch.equal(u, counter_uniform(torch.tensor([3, 3, 7]), torch.tensor([0, 1, 0]), 200_000))


def test_counter_uniform_depends_only_on_the_row():
    seeds, samples = torch.tensor([11, 12, 13, 14]), torch.tensor([0, 3, 1, 2])
    whole = counter_uniform(seeds, samples, steps=50)
    order = torch.tensor([2, 0])
    assert torch.equal(counter_uniform(seeds[order], samples[order], 50), whole[order])
    assert torch.equal(counter_uniform(seeds[3:], samples[3:], 50), whole[3:])
    # More steps extend the row: step t's draw does not depend on how many steps are drawn.
    assert torch.equal(counter_uniform(seeds, samples, 80)[:, :50], whole)


# ------------------------------------------------------------ on the tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sft_checkpoint):
    from test_trainer_behaviour import make_trainer

    trainer = make_trainer(tmp_path_factory.mktemp("kv"), sft_checkpoint)
    ids = trainer.pool.prompt_ids
    # Prompts of different lengths (some cut short, so the model stops at different steps).
    prompts = [ids[0], ids[1][:3], ids[2], ids[3][:5], ids[4], ids[5][:2], ids[6]]
    assert len({len(p) for p in prompts}) >= 3
    tok = trainer.tokenizer
    engines = {
        "recompute": MegatronRecomputeEngine(trainer.model, tok.eos_ids, tok.pad_id, micro_batch_size=4),
        "cached": MegatronInProcessEngine(trainer.model, tok.eos_ids, tok.pad_id, micro_batch_size=4),
        # A bounded cache: passes of at most 5 rows.
        "cached_5_rows": MegatronInProcessEngine(
            trainer.model, tok.eos_ids, tok.pad_id, micro_batch_size=4, rows_per_pass=5
        ),
    }
    return trainer, prompts, engines


def test_trainer_uses_the_cached_engine(tiny, monkeypatch):
    trainer, prompts, _ = tiny
    assert type(trainer.engine) is MegatronInProcessEngine
    # Prefill once per distinct prompt (the longest prompt's width), then one token per row and
    # step; no recompute.
    widths, model = [], trainer.model
    cached = model.next_token_logits_cached
    monkeypatch.setattr(
        model,
        "next_token_logits_cached",
        lambda ctx, tokens, *a: (widths.append(tokens.shape), cached(ctx, tokens, *a))[1],
    )
    monkeypatch.setattr(model, "next_token_logits", lambda *a: pytest.fail("recomputed the prefix"))
    out = trainer.engine.generate(prompts, 2, SAMPLED, seeds=list(range(len(prompts))))
    assert len(set(map(tuple, prompts))) == len(prompts)
    assert widths[0] == (len(prompts), max(len(p) for p in prompts))
    assert len(out.response_lengths) == 2 * len(prompts)
    assert all(w[1] == 1 for w in widths[1:]) and len(widths) == int(out.response_lengths.max())


@pytest.mark.parametrize("cached", ["cached", "cached_5_rows"])
def test_greedy_matches_recompute(tiny, cached):
    _, prompts, engines = tiny
    ref = engines["recompute"].generate(prompts, 2, GREEDY, seeds=list(range(len(prompts))))
    got = engines[cached].generate(prompts, 2, GREEDY, seeds=list(range(len(prompts))))
    lengths = ref.response_lengths
    assert (lengths < GREEDY.max_new_tokens).any() and len(set(lengths.tolist())) > 1  # early, different stops
    assert torch.equal(got.response_lengths, lengths)
    assert torch.equal(got.response_tokens, ref.response_tokens)
    assert torch.allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cached", ["cached", "cached_5_rows"])
def test_sampled_matches_recompute_and_ignores_the_batch(tiny, cached):
    _, prompts, engines = tiny
    seeds = [100 + i for i in range(len(prompts))]
    ref = engines["recompute"].generate(prompts, 3, SAMPLED, seeds)
    got = engines[cached].generate(prompts, 3, SAMPLED, seeds)
    assert torch.equal(got.response_tokens, ref.response_tokens)
    assert torch.equal(got.response_lengths, ref.response_lengths)
    assert torch.allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(r.tolist()) for r in got.response_tokens[:3]}) > 1  # it does sample
    # Another batch: prompt 4 alone, then prompts 6 and 0 in reverse order beside others.
    alone = engines[cached].generate([prompts[4]], 3, SAMPLED, [seeds[4]])
    assert torch.equal(alone.response_tokens, got.response_tokens[12:15])
    mixed = engines[cached].generate([prompts[6], prompts[1], prompts[0]], 3, SAMPLED, [seeds[6], 7, seeds[0]])
    assert torch.equal(mixed.response_tokens[:3], got.response_tokens[18:21])
    assert torch.equal(mixed.response_tokens[6:9], got.response_tokens[0:3])
    assert torch.allclose(mixed.logprobs[6:9], got.logprobs[0:3], atol=1e-5, rtol=0)
    # The same prompt twice in a batch (prefilled once, its cache rows copied), other seeds.
    twice = engines[cached].generate([prompts[4], prompts[0], prompts[4]], 3, SAMPLED, [seeds[4], seeds[0], 999])
    assert torch.equal(twice.response_tokens[:3], got.response_tokens[12:15])
    assert torch.equal(twice.response_tokens[3:6], got.response_tokens[0:3])
    other_seed = engines[cached].generate([prompts[4]], 3, SAMPLED, [999])
    assert torch.equal(twice.response_tokens[6:9], other_seed.response_tokens)
    assert torch.allclose(twice.logprobs[6:9], other_seed.logprobs, atol=1e-5, rtol=0)
    assert not torch.equal(other_seed.response_tokens, alone.response_tokens)


def test_plain_linears_cover_decoder_and_output_layer(tiny):
    """At TP = 1 every decoder linear and the output layer run as plain matmuls during
    generation, with megatron's outputs; the tiny model's weights are too small to pack."""

    from nemo_optune.models.kv_cache import _plain_linear, _plain_linears

    trainer, _, _ = tiny
    policy = trainer.model.policy
    linears = _plain_linears(policy)
    assert len(linears) == 4 * len(policy.decoder.layers) + 1 and linears[-1][0] is policy.output_layer
    with torch.no_grad():
        for linear, weight, packed in linears:
            assert packed is None
            x = torch.randn(1, 5, weight.shape[1])
            out, bias = _plain_linear(linear, x, None, weight, packed)
            # (forward itself: the module call would add the output layer's padded-vocabulary hook)
            is_output = linear is policy.output_layer
            expected, expected_bias = linear.forward(x, weight=weight) if is_output else linear.forward(x)
            assert torch.allclose(out, expected, atol=1e-6, rtol=1e-6)
            assert (bias is None) == (expected_bias is None)


def test_packed_linear_equals_f_linear():
    """On CPU a weight of 512 x 1024 is packed into oneDNN's layout (a torch without the
    operator would fall back to F.linear: slower, and this test says so), with F.linear's
    outputs; a weight passed at call time (tied embeddings) is used as passed."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from nemo_optune.models.kv_cache import _packed_weight, _plain_linear

    weight, bias = torch.randn(1024, 512), torch.randn(1024)
    packed = _packed_weight(weight)
    assert packed is not None and _packed_weight(torch.randn(64, 192)) is None
    x = torch.randn(1, 7, 512)
    for skip_bias_add in (False, True):
        linear = SimpleNamespace(weight=weight, bias=bias, skip_bias_add=skip_bias_add)
        out, left_bias = _plain_linear(linear, x, None, weight, packed)
        assert torch.allclose(out, F.linear(x, weight, None if skip_bias_add else bias), atol=1e-4, rtol=1e-5)
        assert (left_bias is bias) == skip_bias_add
    other = torch.randn(1024, 512)
    out, _ = _plain_linear(linear, x, other, weight, packed)
    assert torch.allclose(out, F.linear(x, other), atol=1e-4, rtol=1e-5)


def test_logprobs_match_sequence_logprobs(tiny):
    trainer, prompts, engines = tiny
    out = engines["cached"].generate(prompts, 2, SAMPLED, seeds=[5] * len(prompts))
    tok = trainer.tokenizer
    rows, masks, expected = [], [], []
    width = max(len(p) for p in prompts) + SAMPLED.max_new_tokens
    for r in range(out.response_tokens.shape[0]):
        prompt, n = prompts[r // 2], int(out.response_lengths[r])
        seq = prompt + out.response_tokens[r, :n].tolist()
        for j in range(n):  # one sequence per response token: its own log-prob
            tokens = torch.full((width,), tok.pad_id, dtype=torch.long)
            tokens[: len(seq)] = torch.tensor(seq)
            mask = torch.zeros(width)
            mask[len(prompt) - 1 + j] = 1.0  # position t predicts token t + 1
            rows.append(tokens)
            masks.append(mask)
            expected.append(float(out.logprobs[r, j]))
    logps = trainer.model.sequence_logprobs("policy", torch.stack(rows), torch.stack(masks), micro_batch_size=64)
    assert torch.allclose(logps, torch.tensor(expected), atol=1e-4, rtol=0)
    assert (out.logprobs[torch.arange(SAMPLED.max_new_tokens)[None] >= out.response_lengths[:, None]] == 0).all()


# ------------------------------------------------------------------ TP2, PP2
def _layout_worker(rank, world, port, overrides, checkpoint, prompts, out_path):
    from parallel_harness import _env

    _env(rank, world, port)
    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.experiment import ExperimentLog
    from nemo_optune.trainers.common import setup
    from nemo_optune.trainers.preference import PreferenceTrainer

    cfg = load_config("optune_tiny", overrides)
    trainer = PreferenceTrainer(
        cfg, setup(cfg), build_task_data(cfg.data), ExperimentLog("", enabled=False, tensorboard=False)
    )
    trainer.model.load_policy(checkpoint)
    seeds = list(range(len(prompts)))
    out = {
        name: trainer.engine.generate(prompts, 2, params, seeds)
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED))
    }
    if rank == 0:
        torch.save(out, out_path)
    distributed.shutdown()


@pytest.mark.parametrize("layout", ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"])
def test_tp2_pp2_match_tp1(tiny, sft_checkpoint, tmp_path, layout):
    from parallel_harness import _spawn

    from nemo_optune.runtime.distributed import free_port

    trainer, prompts, _ = tiny
    seeds = list(range(len(prompts)))
    overrides = TINY + [f"exp_manager.exp_dir={tmp_path / 'exp'}", layout, "generation.micro_batch_size=4"]
    _spawn(_layout_worker, (2, free_port(), overrides, sft_checkpoint, prompts, str(tmp_path / "out.pt")), 2)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
        ref = trainer.engine.generate(prompts, 2, params, seeds)
        assert torch.equal(got[name].response_tokens, ref.response_tokens), name
        assert torch.equal(got[name].response_lengths, ref.response_lengths), name
        assert torch.allclose(got[name].logprobs, ref.logprobs, atol=1e-5, rtol=0), name
