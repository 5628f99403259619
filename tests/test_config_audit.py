"""Config values that would run and mean nothing. Every numeric key of the typed config has a
domain checked at start-up: a value outside it (non-finite, negative where only >= 0 means
something, a zero count) is a ConfigError naming that key, from `validate` alone. A key the
method never reads, set off its default, is named in a warning; a training checkpoint resumes
only into the method that wrote it; a pool's untrained remainder is said and counted."""

import dataclasses
import math
import typing

import pytest

from nemo_optune.config import ConfigError, RewardSourceConfig, RootConfig, load_config, unread_keys, validate
from nemo_optune.data.batching import iteration_batches, records_left_untrained
from nemo_optune.serve_reward import ServeRewardConfig, validate_serve

# Where a negative value is meaningful: a penalty source; a target on a reward scale of any sign.
NEGATIVE_OK = {"reward.sources[0].weight", "model.optune.adaptive_rho.target"}
# Where zero is meaningful (off, none, greedy, end only, ...).
ZERO_OK = NEGATIVE_OK | {
    "trainer.lr_warmup_steps",
    "trainer.min_lr",
    "trainer.weight_decay",
    "trainer.grad_clip",
    "trainer.seed",
    "model.optune.weight_beta",
    "model.optune.sft_weight",
    "model.hypo.kl_weight",
    "data.seed",
    "generation.temperature",
    "generation.top_k",
    "reward.retries",
    "reward.backoff_seconds",
    "reward.http.dead_server_seconds",
    "reward.missing_eos_penalty",
    "reward.length_penalty",
    "reward.target_length",
    "reward.sources[0].http.dead_server_seconds",
    "sft.demonstration_noise",
    "sft.seed",
    "generate.seed",
    "exp_manager.checkpoint_every",
    "exp_manager.checkpoint_every_steps",
    "exp_manager.checkpoint_every_seconds",
    "server.port",
    "server.max_wait_ms",
    "server.graceful_shutdown_seconds",
}


def numeric_keys(instance, prefix=""):
    """(key, owner, field name, type) of every int/float key, Optional ones included, nested
    dataclasses and the items of lists of them walked."""
    for f in dataclasses.fields(instance):
        key, value = f"{prefix}{f.name}", getattr(instance, f.name)
        kinds = {f.type, *typing.get_args(f.type)} & {int, float}
        if dataclasses.is_dataclass(value):
            yield from numeric_keys(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from numeric_keys(item, f"{key}[{i}].")
        elif kinds:
            yield key, instance, f.name, float if float in kinds else int


def with_one_source():
    cfg = RootConfig()
    cfg.reward.sources = [RewardSourceConfig()]
    return cfg


def bad_values(key, kind):
    values = [-1] if key not in NEGATIVE_OK else []
    values += [0] if key not in ZERO_OK else []
    values += [math.nan, math.inf, -math.inf] if kind is float else []
    return values


CASES = [
    (make, check, key, value)
    for make, check in ((with_one_source, validate), (ServeRewardConfig, validate_serve))
    for key, _, _, kind in numeric_keys(make())
    for value in bad_values(key, kind)
]


def test_the_walk_covers_every_group():
    keys = {key for _, _, key, _ in CASES}
    assert {k.split(".")[0] for k in keys} == {
        "trainer",
        "model",
        "data",
        "generation",
        "reward",
        "sft",
        "generate",
        "exp_manager",
        "server",
    }
    assert {"reward.sources[0].weight", "reward.sources[0].hf.batch_tokens", "generation.vllm.kv_cache_gb"} <= keys


@pytest.mark.parametrize("make,check,key,value", CASES, ids=[f"{c[2]}={c[3]}" for c in CASES])
def test_a_value_outside_its_domain_names_its_key(make, check, key, value):
    cfg = make()
    check(cfg)  # the defaults are valid
    (owner, name) = next((o, n) for k, o, n, _ in numeric_keys(cfg) if k == key)
    setattr(owner, name, value)
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert str(err.value).startswith(f"config key {key}: "), str(err.value)


@pytest.mark.parametrize(
    "recipe,overrides,named",
    [
        (
            "optune_tiny",
            ["model.hypo.kl_weight=0.2", "data.offline_path=p.jsonl"],
            ["data.offline_path", "model.hypo.kl_weight"],
        ),
        (
            "dpo_offline",
            ["data.offline_path=p.jsonl", "generation.temperature=0.5", "model.optune.rho=0.3"],
            ["generation.temperature", "model.optune.rho"],
        ),
        (
            "sft_tiny",
            ["model.restore_from_path=/m", "trainer.lr=1e-5", "generation.max_new_tokens=12"],
            ["model.restore_from_path", "trainer.lr"],
        ),
        ("online_dpo", ["model.restore_from_path=/m", "sft.steps=3", "generate.seed=2"], ["sft.steps"]),
        ("hypo", ["data.offline_path=p.jsonl", "model.hypo.kl_weight=0.2", "generation.top_p=1.0"], []),
    ],
)
def test_keys_the_method_does_not_read_are_named(recipe, overrides, named):
    lines = unread_keys(load_config(recipe, overrides))
    assert [line.split(":")[0] for line in lines] == [f"config key {k}" for k in named], lines
    assert all(f"method {load_config(recipe, overrides).method} does not read it" in line for line in lines)


@pytest.mark.parametrize(
    "recipe",
    ["optune_tiny", "optune", "online_dpo", "optune_adaptive", "optune_random", "sft_tiny", "dpo_offline", "hypo"],
)
def test_shipped_recipes_set_only_what_their_method_reads(recipe):
    assert (
        unread_keys(load_config(recipe, ["data.offline_path=p.jsonl"] if recipe in ("dpo_offline", "hypo") else []))
        == []
    )


@pytest.mark.parametrize(
    "records,batch,epochs,iterations", [(40, 32, 1, 1), (40, 32, 1, 3), (100, 64, 2, 1), (64, 32, 1, 2), (7, 3, 3, 2)]
)
def test_records_left_untrained_is_what_no_batch_reaches(records, batch, epochs, iterations):
    reached = [0] * records  # how often each record of the last pass is trained, over the run
    trained = [b for it in range(iterations) for b in iteration_batches(records, batch, epochs, it, seed=5)]
    positions = len(trained) * batch
    assert positions == iterations * epochs * records - records_left_untrained(records, batch, epochs, iterations)
    last_pass = (iterations * epochs - 1) * records
    for i, b in enumerate(trained):
        for j, index in enumerate(b.tolist()):
            if i * batch + j >= last_pass:
                reached[index] += 1
    assert reached.count(0) == records_left_untrained(records, batch, epochs, iterations)
