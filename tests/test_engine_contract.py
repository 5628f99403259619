"""The RolloutEngine contract, one suite for every engine present (generation.engine).

For each engine, on a tiny random Llama (head size 32: vLLM's CPU attention has no 16):
- the log-probs it returns are the policy's own (temperature 1, whatever the sampling
  settings), from a plain forward pass of the megatron policy, within 1e-3;
- after an optimizer step on the policy and the trainer's refit (factory.refit_engine), still
  (a stale-weights engine fails: the step moves the log-probs by far more than 1e-3);
- greedy output equals the in-process megatron engine's;
- a refit of half the tensors is refused and the engine does not generate from the mix.

megatron runs in the default suite (a few seconds); vllm only where it imports, marked `vllm`
(make test-vllm, which installs it in .venv-vllm)."""

import importlib.util
import os

import pytest
import torch

from nemo_optune.generation.base import SamplingParams

VOCAB, STOP, PAD, WIDTH = 16, 1, 0, 40
PROMPTS = [[3, 4, 5, 6, 2], [7, 8, 2], [9, 10, 11, 3, 4, 5, 2], [12, 2], [13, 14, 15, 3, 2]]
SEEDS = [11, 12, 13, 14, 15]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
# Not the policy's distribution: the engine must still report the policy's log-probs (vLLM:
# raw, not processed, log-probs).
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=12, max_new_tokens=12)

ENGINES = [
    "megatron",
    pytest.param(
        "vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(
                importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make test-vllm)"
            ),
        ],
    ),
    # vLLM's own tensor parallelism (two CPU workers, a core each here): shards loaded by refit.
    pytest.param(
        "vllm_tp2",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(
                importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make test-vllm)"
            ),
        ],
    ),
    pytest.param(
        "trtllm",
        marks=[
            pytest.mark.trtllm,
            pytest.mark.skipif(
                importlib.util.find_spec("tensorrt_llm") is None
                or importlib.util.find_spec("nemo_optune.generation.trtllm_engine") is None,
                reason="tensorrt_llm is not installed",
            ),
        ],
    ),
]


def _config(engine: str):
    """engine: a generation.engine, or vllm_tp2 (vllm with generation.engine_tp_size=2)."""
    from nemo_optune.config import GenerationConfig, RootConfig

    tp = 2 if engine.endswith("_tp2") else 1
    return RootConfig(
        generation=GenerationConfig(
            engine=engine.removesuffix("_tp2"), micro_batch_size=64, refit_bucket_mb=1, engine_tp_size=tp
        )
    )


def _tiny_model(tp: int = 1):
    """The contract's tiny Llama policy at tensor parallelism tp (tests/engine_dp_check.py: 2)."""
    from nemo_optune.config import ModelConfig
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
    from nemo_optune.models.hf_spec import tiny_llama_spec
    from nemo_optune.runtime import distributed

    layout = distributed.initialize(tp, 1, seed=0)
    cfg = ModelConfig(num_attention_heads=2, num_query_groups=1, tensor_model_parallel_size=tp)
    return MegatronGPTOPTuneModel(
        cfg,
        tiny_llama_spec(cfg, VOCAB, STOP, WIDTH),
        layout,
        seed=0,
        lr=0.0,
        weight_decay=0.0,
        grad_clip=0.0,
        with_reference=False,
    )


class _Tokenizer:
    eos_ids, pad_id = frozenset({STOP}), PAD


@pytest.fixture(scope="module", params=ENGINES)
def setup(request):
    """(engine, its policy model, the in-process engine on the same model). Each engine has its
    own model (same seed), so one engine's training step does not reach another's tests."""
    from nemo_optune.generation.factory import build_engine
    from nemo_optune.generation.megatron_engine import MegatronInProcessEngine

    model = _tiny_model()
    engine = build_engine(_config(request.param), model, _Tokenizer())
    reference = MegatronInProcessEngine(model, [STOP], PAD, micro_batch_size=64)
    yield request.param, engine, model, reference
    if hasattr(engine, "shutdown"):
        engine.shutdown()


def policy_token_logprobs(model, prompts, rollouts, num_samples: int) -> torch.Tensor:
    """[rows, new] log-prob of each response token under a plain forward of the policy."""
    module = model.policy
    was_training = module.training
    module.eval()
    out = torch.zeros_like(rollouts.logprobs)
    with torch.no_grad():
        for r in range(rollouts.response_tokens.shape[0]):
            prompt, n = prompts[r // num_samples], int(rollouts.response_lengths[r])
            tokens = torch.tensor([prompt + rollouts.response_tokens[r, :n].tolist()])
            length = tokens.shape[1]
            causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), 1)
            logp = module(tokens, torch.arange(length)[None], causal)[0, :, :VOCAB].log_softmax(-1)
            p = len(prompt)
            for j in range(n):
                out[r, j] = logp[p - 1 + j, int(rollouts.response_tokens[r, j])]
    module.train(was_training)
    return out


def _optimizer_step(model) -> None:
    """One Adam step on the policy (next-token loss on a few sequences): every weight moves."""
    module = model.policy
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    tokens = torch.tensor([p + [STOP] * (8 - len(p)) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])])
    length = tokens.shape[1]
    causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), 1)
    logits = module(tokens, torch.arange(length)[None].expand(len(tokens), -1), causal)[:, :-1, :VOCAB]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _check_logprobs(engine, model, params) -> torch.Tensor:
    out = engine.generate(PROMPTS, 2, params, SEEDS)
    assert out.response_tokens.shape == (2 * len(PROMPTS), params.max_new_tokens)
    assert (out.response_lengths >= 1).all() and (out.response_lengths <= params.max_new_tokens).all()
    past_end = torch.arange(params.max_new_tokens)[None] >= out.response_lengths[:, None]
    assert (out.logprobs[past_end] == 0).all() and (out.response_tokens[past_end] == PAD).all()
    expected = policy_token_logprobs(model, PROMPTS, out, 2)
    assert torch.allclose(out.logprobs, expected, atol=1e-3, rtol=0), (out.logprobs - expected).abs().max()
    return out


def test_logprobs_are_the_policys(setup):
    _, engine, model, _ = setup
    out = _check_logprobs(engine, model, SAMPLED)
    assert len({tuple(r.tolist()) for r in out.response_tokens}) > 1  # it does sample
    # Same seeds, same samples (vLLM: per-request seeds; megatron: counter noise).
    again = engine.generate(PROMPTS, 2, SAMPLED, SEEDS)
    assert torch.equal(again.response_tokens, out.response_tokens)


def test_greedy_equals_the_in_process_engine(setup):
    _, engine, _, reference = setup
    got, ref = engine.generate(PROMPTS, 1, GREEDY, SEEDS), reference.generate(PROMPTS, 1, GREEDY, SEEDS)
    assert torch.equal(got.response_lengths, ref.response_lengths)
    assert torch.equal(got.response_tokens, ref.response_tokens)
    assert torch.allclose(got.logprobs, ref.logprobs, atol=1e-3, rtol=0)


def test_after_a_training_step_and_a_refit_logprobs_are_still_the_policys(setup):
    from nemo_optune.generation.factory import refit_engine

    _, engine, model, reference = setup
    before = engine.generate(PROMPTS, 2, SAMPLED, SEEDS)
    _optimizer_step(model)
    moved = policy_token_logprobs(model, PROMPTS, before, 2)
    assert (moved - before.logprobs).abs().max() > 0.05  # a stale engine would fail the check below
    timings = refit_engine(engine, model)
    if setup[0] == "megatron":
        assert timings == {}  # nothing streamed: the engine runs the policy itself
    else:
        assert timings["timing/refit_seconds"] > 0 and timings["refit_bytes"] > 0
    _check_logprobs(engine, model, SAMPLED)
    got, ref = engine.generate(PROMPTS, 1, GREEDY, SEEDS), reference.generate(PROMPTS, 1, GREEDY, SEEDS)
    assert torch.equal(got.response_tokens, ref.response_tokens)


def test_a_refit_of_half_the_tensors_is_refused(setup):
    from nemo_optune.models.hf_io import stream_hf_weights

    name, engine, model, _ = setup
    if name == "megatron":
        pytest.skip(
            "vacuous for the in-process engine: it generates with the policy module itself, so there is "
            "no second copy of the weights that could be half-updated (its refit is a no-op)"
        )
    weights = list(stream_hf_weights(model))
    with pytest.raises(RuntimeError, match="refit"):
        engine.refit(weights[: len(weights) // 2])
    with pytest.raises(RuntimeError, match="refit"):  # no generation from half-old, half-new weights
        engine.generate(PROMPTS, 1, GREEDY, SEEDS)
    engine.refit(weights)  # a complete refit makes it usable again
    _check_logprobs(engine, model, SAMPLED)


def test_megatron_refit_streams_nothing(monkeypatch):
    """The default path pays nothing for external engines: refit_engine never exports."""
    import nemo_optune.models.hf_io as hf_io
    from nemo_optune.generation.factory import build_engine, refit_engine

    monkeypatch.setattr(hf_io, "stream_hf_weights", lambda model: pytest.fail("streamed weights"))
    engine = build_engine(_config("megatron"), model=object(), tokenizer=_Tokenizer())
    assert refit_engine(engine, model=object()) == {}


def test_bucketing():
    from nemo_optune.generation.refit import weight_buckets

    weights = [
        ("a", torch.zeros(10)),
        ("b", torch.zeros(20)),
        ("c", torch.zeros(100)),
        ("d", torch.zeros(5)),
        ("e", torch.zeros(5)),
    ]  # 40, 80, 400, 20, 20 bytes
    buckets = [[n for n, _ in b] for b in weight_buckets(weights, 128)]
    assert buckets == [["a", "b"], ["c"], ["d", "e"]]
    assert [[n for n, _ in b] for b in weight_buckets(weights, 10_000)] == [["a", "b", "c", "d", "e"]]
    with pytest.raises(ValueError):
        list(weight_buckets(weights, 0))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_a_missing_engine_package_is_one_line_before_any_work():
    from nemo_optune.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("optune_tiny", ["generation.engine=vllm"])
    assert str(err.value).startswith("generation.engine=vllm but vllm is not installed: ") and "\n" not in str(
        err.value
    )


def test_engine_keys_are_checked():
    from nemo_optune.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="config key generation.engine: 'sglang' is not one of megatron, vllm, trtllm"
    ):
        load_config("optune_tiny", ["generation.engine=sglang"])
    with pytest.raises(ConfigError, match="config key generation.refit_bucket_mb: must be >= 1"):
        load_config("optune_tiny", ["generation.refit_bucket_mb=0"])


def test_vllm_cpu_binding_splits_the_cores_between_engine_ranks():
    from nemo_optune.generation.vllm_engine import cpu_binding

    assert cpu_binding(2, [3, 2, 1, 0]) == "0,1|2,3"
    assert cpu_binding(2, [5, 7]) == "5|7"
    assert cpu_binding(3, list(range(7))) == "0,1|2,3|4,5"
    with pytest.raises(ValueError, match="^config key generation.engine_tp_size: 3 vLLM CPU workers need a core each"):
        cpu_binding(3, [0, 1])
    # one engine per DP replica: the node's cores go to its engines first, then to their workers
    assert [cpu_binding(2, list(range(8)), slot, engines=2) for slot in (0, 1)] == ["0,1|2,3", "4,5|6,7"]
    assert [cpu_binding(1, [0, 1], slot, engines=2) for slot in (0, 1)] == ["0", "1"]
    with pytest.raises(ValueError, match="^config key generation.engine_tp_size: 2 x 2 engines on this node vLLM"):
        cpu_binding(2, [0, 1, 2], 0, engines=2)


def test_what_external_engines_still_refuse_names_the_key(monkeypatch):
    from nemo_optune.config import ConfigError, load_config, validate

    real = importlib.util.find_spec  # tensorrt_llm as if installed
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt_llm" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="^config key generation.engine_tp_size: the TensorRT-LLM engine refits"):
        load_config("optune_tiny", ["generation.engine=trtllm", "generation.engine_tp_size=2"])
    with pytest.raises(ConfigError, match="^config key generation.engine: HyPO samples"):
        load_config("hypo", ["generation.engine=trtllm"])
    validate(load_config("optune_tiny", ["generation.engine=trtllm"]), world_size=8)  # any world size


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make test-vllm)")
def test_vllm_engine_tp_beyond_the_cores_is_refused_at_start_up(monkeypatch):
    from nemo_optune.config import ConfigError, load_config

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=f"^config key generation.engine_tp_size: {cores + 1} vLLM CPU workers need"):
        load_config("optune_tiny", ["generation.engine=vllm", f"generation.engine_tp_size={cores + 1}"])


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make test-vllm)")
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2_two_engines", "tp2_one_engine"])
def test_vllm_under_torchrun_equals_the_in_process_engine(tp, tmp_path):
    """Two torchrun processes (tests/engine_dp_check.py): at TP1 each DP rank leads its own vLLM
    engine (a core each); at TP2 rank 0 leads the replica's one engine and rank 1 receives. Each
    rank's greedy tokens equal the in-process engine's on its DP share, log-probs within 1e-3,
    before and after the weights move and the engines are refitted from their groups' shards."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "result.json"
    run = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(root, "tests", "engine_dp_check.py"),
            "--tp",
            str(tp),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["leads"] for r in ranks] == ([True, True] if tp == 1 else [True, False])
    shares = [r["prompts"] for r in ranks]
    assert (shares[0] != shares[1]) if tp == 1 else (shares[0] == shares[1])  # DP shares / one replica
    for r in ranks:
        for phase in ("before", "after"):
            assert r[phase]["rows"] > 0 and r[phase]["tokens_equal"] and r[phase]["lengths_equal"], (phase, r)
            assert r[phase]["max_logprob_diff"] < 1e-3, (phase, r)
        assert r["after_stale"]["max_logprob_diff"] > 1e-2  # the weights did move: a stale engine fails
    assert ranks[0]["refit"]["refit_bytes"] > 0
