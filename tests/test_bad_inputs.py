"""Every bad input: a clear one-line error naming the key, file:line or directory, raised
before heavy work, and nothing already written lost."""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY

from nemo_optune.config import ConfigError, load_config, validate
from nemo_optune.data.preferences import read_preferences
from nemo_optune.data.records import DataError
from nemo_optune.rewards.resilient import ResilientRewardSource, RewardSourceError
from nemo_optune.runtime import exp_dir


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.optune.rho=0", "model.optune.rho"),
        ("model.optune.rho=1.5", "model.optune.rho"),
        ("model.optune.samples_per_prompt=1", "model.optune.samples_per_prompt"),
        ("model.optune.beta=0", "model.optune.beta"),
        ("model.optune.beta=-0.1", "model.optune.beta"),
        ("model.optune.selection=best", "model.optune.selection"),
        ("model.optune.weighting=square", "model.optune.weighting"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("trainer.micro_batch_tokens=0", "trainer.micro_batch_tokens"),
        ("data.num_train_prompts=100", "data.num_train_prompts"),
        ("model.hypo.samples_per_prompt=1", "model.hypo.samples_per_prompt"),
        ("method=online_dpo", "model.optune.selection"),
        ("reward.non_finite=ignore", "reward.non_finite"),
        ("model.optune.weight_beta=-1", "model.optune.weight_beta"),
        ("data.max_digits=12", "generation.max_new_tokens"),  # the longest answer + EOS needs 13 tokens
        ("generation.eval_samples_per_prompt=0", "generation.eval_samples_per_prompt"),
    ],
)
def test_invalid_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key {key}:"):
        load_config("optune_tiny", [override])


def test_token_budget_and_packing_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="config key trainer.micro_batch_tokens: is not supported with method=hypo"):
        load_config("optune_tiny", ["method=hypo", "data.offline_path=prefs.jsonl", "trainer.micro_batch_tokens=512"])
    with pytest.raises(ConfigError, match="config key trainer.pack_pairs: is not supported with method=hypo"):
        load_config("optune_tiny", ["method=hypo", "data.offline_path=prefs.jsonl", "trainer.pack_pairs=true"])
    cfg = load_config("optune_tiny", ["trainer.micro_batch_tokens=512"])
    cfg.model.pipeline_model_parallel_size = 2
    with pytest.raises(
        ConfigError, match="config key trainer.micro_batch_tokens: needs model.pipeline_model_parallel_size=1"
    ):
        validate(cfg, world_size=2)


@pytest.mark.parametrize(
    "changes,world,key",
    [
        ({"tensor_model_parallel_size": 2}, 3, "model.tensor_model_parallel_size"),
        (
            {"tensor_model_parallel_size": 2, "num_attention_heads": 3, "hidden_size": 63},
            2,
            "model.num_attention_heads",
        ),
        ({"pipeline_model_parallel_size": 2, "num_layers": 3}, 2, "model.num_layers"),
        ({}, 128, "trainer.global_batch_size"),  # 64 pairs do not split over DP128
    ],
)
def test_layout_errors_name_the_key(changes, world, key):
    cfg = load_config("optune_tiny")
    for name, value in changes.items():
        setattr(cfg.model, name, value)
    with pytest.raises(ConfigError, match=f"config key {key}:"):
        validate(cfg, world_size=world)


@pytest.mark.parametrize(
    "override,key",
    [
        ("generation.temperature=0.7", "generation.temperature"),
        ("generation.top_p=0.9", "generation.top_p"),
        ("generation.top_k=5", "generation.top_k"),
    ],
)
def test_hypo_needs_samples_from_the_policy_itself(override, key):
    with pytest.raises(ConfigError, match=f"config key {key}: HyPO's KL samples must come from the policy"):
        load_config("hypo", ["data.offline_path=x.jsonl", override])


def test_wrong_type_and_unknown_key_are_rejected():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises(ValidationError, match="model.optune.rho"):
        load_config("optune_tiny", ["model.optune.rho=abc"])
    with pytest.raises(ConfigCompositionException, match="model.optune.rhoo"):
        load_config("optune_tiny", ["model.optune.rhoo=0.5"])


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "12>", "chosen_response": "12"', r"bad\.jsonl:2: malformed JSON"),
        ('{"prompt": "12>", "chosen_response": "12"}', r"bad\.jsonl:2: missing field 'rejected_response'"),
        ('{"prompt": "  ", "chosen_response": "1", "rejected_response": "2"}', r"bad\.jsonl:2: empty prompt"),
        (
            '{"prompt": "21>", "chosen_response": "12", "rejected_response": "2", "chosen_reward": NaN, "rejected_reward": 0}',
            r"bad\.jsonl:2: field 'chosen_reward' must be a finite number",
        ),
        (
            '{"prompt": "21>", "chosen_response": "12", "rejected_response": "2", "chosen_reward": 1}',
            r"bad\.jsonl:2: give both chosen_reward and rejected_reward",
        ),
        (
            '{"prompt": "21>", "chosen_response": "2", "rejected_response": "12", "chosen_reward": 0.1, "rejected_reward": 1}',
            r"bad\.jsonl:2: chosen_reward 0.1 is below rejected_reward 1.0",
        ),
        ('["21>", "12", "2"]', r"bad\.jsonl:2: expected a JSON object"),
        (
            '{"prompt": 5, "chosen_response": "12", "rejected_response": "2"}',
            r"bad\.jsonl:2: field 'prompt' must be a string",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "21>", "chosen_response": "12", "rejected_response": "21"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_preferences(str(path))


def test_missing_and_empty_jsonl(tmp_path):
    with pytest.raises(DataError, match="cannot open data file"):
        read_preferences(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no preference records"):
        read_preferences(str(tmp_path / "empty.jsonl"))


class Flaky:
    def __init__(self, failures: int, delay: float = 0.0):
        self.failures, self.delay, self.calls = failures, delay, 0

    def score(self, prompts, responses):
        self.calls += 1
        time.sleep(self.delay)
        if self.calls <= self.failures:
            raise ConnectionError("reward server unavailable")
        return [0.5] * len(prompts)


def test_reward_source_retries_with_backoff_then_succeeds():
    source = ResilientRewardSource(Flaky(2), "remote", retries=3, backoff_seconds=0.01, timeout_seconds=5)
    assert source.score(["a", "b"], ["x", "y"]) == [0.5, 0.5]
    assert source.failures == 2


def test_reward_source_gives_up_with_a_clear_error():
    source = ResilientRewardSource(Flaky(10), "remote", retries=2, backoff_seconds=0.0, timeout_seconds=5)
    with pytest.raises(RewardSourceError, match="'remote' failed 3 times .*ConnectionError: reward server unavailable"):
        source.score(["a"], ["x"])


def test_reward_source_timeout():
    source = ResilientRewardSource(Flaky(0, delay=0.5), "slow", retries=1, backoff_seconds=0.0, timeout_seconds=0.05)
    with pytest.raises(RewardSourceError, match="timed out after 0.05s"):
        source.score(["a"], ["x"])


# ---------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def trainer(tmp_path_factory, sft_checkpoint):
    """A trainer on a briefly SFT-trained policy with its pool filled (iteration 1 done)."""
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.runtime.experiment import ExperimentLog
    from nemo_optune.trainers.common import setup
    from nemo_optune.trainers.preference import PreferenceTrainer

    cfg = load_config("optune_tiny", TINY + [f"exp_manager.exp_dir={tmp_path_factory.mktemp('bad')}"])
    t = PreferenceTrainer(
        cfg, setup(cfg), build_task_data(cfg.data), ExperimentLog("", enabled=False, tensorboard=False)
    )
    with pytest.raises(RuntimeError, match="built without weights"):  # never computes on uninitialised memory
        t.iteration(0)
    t.model.load_policy(sft_checkpoint)
    t.model.sync_reference_to_policy()
    t.iteration(0)
    return t


class Scripted:
    def __init__(self, value):
        self.value = value

    def score(self, prompts, responses):
        return [self.value(i) for i in range(len(prompts))]


@contextlib.contextmanager
def scored_by(trainer, source, non_finite="error"):
    """The trainer's (only) reward source replaced by `source` for the block."""
    wrapped = trainer.reward.sources[0]
    inner, wrapped.source, trainer.cfg.reward.non_finite = wrapped.source, source, non_finite
    try:
        yield
    finally:
        wrapped.source, trainer.cfg.reward.non_finite = inner, "error"


def _pool_unchanged_after_failure(trainer, source, error):
    before = trainer.pool.store.state_dict()
    with scored_by(trainer, source), pytest.raises(RewardSourceError, match=error):
        trainer.iteration(1)
    for name, value in before.items():
        assert torch.equal(getattr(trainer.pool.store, name), value), name


def test_failing_reward_source_leaves_the_pool_untouched(trainer):
    trainer.reward.sources[0].retries, trainer.reward.sources[0].backoff = 1, 0.0
    _pool_unchanged_after_failure(trainer, Flaky(100), "failed 2 times")


def test_non_finite_rewards_error_leaves_the_pool_untouched(trainer):
    _pool_unchanged_after_failure(
        trainer, Scripted(lambda i: float("nan") if i % 5 == 0 else 0.1 * (i % 4)), "non-finite rewards"
    )


def test_non_finite_rewards_dropped_and_counted(trainer):
    with scored_by(trainer, Scripted(lambda i: float("inf") if i % 4 == 0 else 0.1 * (i % 4)), "drop"):
        record = trainer.iteration(1)
    assert record["non_finite_rewards"] == 32  # 32 selected prompts, sample 0 of each is inf
    pool = trainer.pool.store
    fresh = pool.refreshed_at == 1
    # the inf sample is never chosen: best is sample 3 (0.3), worst sample 1 (0.1)
    assert torch.allclose(pool.chosen_rewards[fresh], torch.tensor(0.3))
    assert torch.allclose(pool.rejected_rewards[fresh], torch.tensor(0.1))


def test_prompts_without_any_finite_reward_keep_finite_pool_keys(trainer):
    with scored_by(trainer, Scripted(lambda i: float("nan") if i < 8 else 0.1 * (i % 4)), "drop"):  # 2 prompts all NaN
        record = trainer.iteration(1)
    assert record["non_finite_rewards"] == 8
    pool = trainer.pool.store
    assert torch.isfinite(pool.chosen_rewards).all() and torch.isfinite(pool.rejected_rewards).all()
    first_two = torch.nonzero(pool.refreshed_at == 1).squeeze(1)[:2]
    assert not pool.valid[first_two].any()
    assert pool.chosen_rewards[first_two].tolist() == [0.0, 0.0]


def _offline(path, long_prompts="error", min_records=1):
    from nemo_optune.data.offline_pool import build_offline_pool
    from nemo_optune.data.sort_task import SortTask

    task = SortTask()
    return build_offline_pool(str(path), task.tokenizer, task.max_prompt_chars, 10, long_prompts, min_records)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("mode", ["error", "skip", "truncate"])
def test_long_offline_prompts(tmp_path, mode):
    path = _write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "321>", "chosen_response": "123", "rejected_response": "213"},
            {"prompt": "98765432101234>", "chosen_response": "1", "rejected_response": "2"},
        ],
    )
    if mode == "error":
        with pytest.raises(DataError, match=r"prefs\.jsonl:2: prompt has 15 tokens, over the limit of 9"):
            _offline(path, mode)
        return
    offline = _offline(path, mode)
    assert offline.long_prompts == 1
    assert offline.prompts == (["321>"] if mode == "skip" else ["321>", "32101234>"])  # truncation keeps the end
    assert len(offline.pool) == len(offline.prompts)


def test_characters_outside_the_alphabet_name_file_and_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "prefs.jsonl", [{"prompt": "21>", "chosen_response": "12", "rejected_response": "x1"}]
    )
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: character 'x' is not in the tokenizer alphabet"):
        _offline(path)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(
        b'{"prompt": "21>", "chosen_response": "12", "rejected_response": "21"}\n'
        b'{"prompt": "21>", "chosen_response": "1\xff", "rejected_response": "21"}\n'
    )
    with pytest.raises(DataError, match=r"prefs\.jsonl:2: not valid UTF-8 \(byte 0xff at column 40\)"):
        read_preferences(str(path))


def test_identical_pairs_are_counted_and_kept_out_of_the_loss(tmp_path):
    path = _write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "321>", "chosen_response": "123", "rejected_response": "213"},
            {"prompt": "21>", "chosen_response": "12", "rejected_response": "12"},
            {"prompt": "31>", "chosen_response": "13", "rejected_response": "31"},
        ],
    )
    offline = _offline(path, min_records=2)
    assert offline.identical_pairs == 1
    assert offline.pool.valid.tolist() == [True, False, True]
    with pytest.raises(
        DataError,
        match=r"prefs\.jsonl: 2 usable preference records .*1 with identical responses.*"
        r"fewer than one global batch \(trainer.global_batch_size=3\)",
    ):
        _offline(path, min_records=3)


# ------------------------------------------------------------ experiment dirs
def test_exp_dir_with_a_different_config_is_refused_and_kept(tmp_path):
    cfg = {
        "method": "optune",
        "trainer": {"iterations": 4},
        "model": {"optune": {"rho": 0.5}, "tensor_model_parallel_size": 1},
    }
    assert exp_dir.prepare(str(tmp_path), cfg, True, None, False) is None
    marker = tmp_path / "checkpoints" / "iter_000002"
    marker.mkdir(parents=True)
    # a layout change is a legal resume (the newest intact checkpoint is found once the model exists)
    moved = {**cfg, "model": {**cfg["model"], "tensor_model_parallel_size": 2}}
    assert exp_dir.prepare(str(tmp_path), moved, True, None, False) == exp_dir.AUTO
    other = {**cfg, "model": {**cfg["model"], "optune": {"rho": 0.25}}}
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(exp_dir.ExperimentDirError, match=r"holds a run with a different config \(model\.optune\.rho\)"):
        exp_dir.prepare(str(tmp_path), other, True, None, False)
    assert (tmp_path / "config.json").read_text() == before and marker.exists()
    assert exp_dir.prepare(str(tmp_path), other, True, None, True) is None  # overwrite=true: start over
    assert not marker.exists()


def test_a_key_added_since_the_stored_run_counts_only_off_its_default(tmp_path):
    """A run stored by a version without trainer.pack_pairs behaved as its default (false): the
    same config with the default resumes, with the key switched on it is a different run."""
    stored = {"method": "optune", "trainer": {"iterations": 4}}
    defaults = {"method": "optune", "trainer": {"iterations": 8, "pack_pairs": False}}
    assert exp_dir.prepare(str(tmp_path), stored, True, None, False, defaults) is None
    same = {"method": "optune", "trainer": {"iterations": 4, "pack_pairs": False}}
    assert exp_dir.prepare(str(tmp_path), same, True, None, False, defaults) is None
    (tmp_path / "config.json").write_text(json.dumps(stored))  # the older version's file again
    packed = {"method": "optune", "trainer": {"iterations": 4, "pack_pairs": True}}
    with pytest.raises(exp_dir.ExperimentDirError, match=r"different config \(trainer\.pack_pairs\)"):
        exp_dir.prepare(str(tmp_path), packed, True, None, False, defaults)


def test_fewer_iterations_than_a_checkpoint_has_done_are_refused(tmp_path):
    cfg = {"method": "optune", "trainer": {"iterations": 4}}
    exp_dir.prepare(str(tmp_path), cfg, True, None, False)
    (tmp_path / "checkpoints" / "iter_000004").mkdir(parents=True)
    before = (tmp_path / "config.json").read_text()
    fewer = {**cfg, "trainer": {"iterations": 2}}
    with pytest.raises(
        exp_dir.ExperimentDirError, match=r"config key trainer.iterations: 2, but .*iter_000004 has 4 iterations done"
    ):
        exp_dir.prepare(str(tmp_path), fewer, True, None, False)
    assert (tmp_path / "config.json").read_text() == before  # the record of the run is not rewritten
    assert exp_dir.prepare(str(tmp_path), {**cfg, "trainer": {"iterations": 6}}, True, None, False) == exp_dir.AUTO


def test_unwritable_exp_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(exp_dir.ExperimentDirError, match="config key exp_manager.exp_dir: .* is not writable"):
        exp_dir.check_writable(str(blocker / "run"))


def test_a_second_run_on_a_locked_exp_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from nemo_optune.runtime import exp_dir; "
            f"h = exp_dir.lock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(exp_dir.ExperimentDirError, match=rf"is in use by another run \(pid {holder.pid} on "):
            exp_dir.lock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    exp_dir.lock(str(tmp_path)).close()  # released when the holder died


def test_full_disk_during_a_checkpoint_keeps_the_earlier_one(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from nemo_optune.run import run_experiment
    from nemo_optune.runtime.checkpoint import CheckpointError, list_checkpoints

    real_save, calls = dist_checkpointing.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save)
    cfg = load_config(
        "optune_tiny", TINY + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.checkpoint_every=1", "sft.steps=5"]
    )
    with pytest.raises(
        CheckpointError, match=r"iter_000001 failed on rank 0: \[Errno 28\] No space left on device; earlier"
    ):
        run_experiment(cfg)  # save 1 = SFT, save 2 = iteration 1 fails
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert list_checkpoints(str(tmp_path / "checkpoints")) == []
    assert not os.path.exists(tmp_path / "checkpoints" / "iter_000001.tmp")
    assert os.path.isdir(tmp_path / "sft_checkpoint")  # the earlier save is intact and reused
    summary = run_experiment(cfg)
    assert len(summary["iterations"]) == 2 and "sft_seconds" not in summary


@pytest.mark.parametrize(
    "args,line",
    [
        (["model.optune.rho=0"], "error: config key model.optune.rho: must be in (0, 1], got 0.0"),
        (
            ["--config-name", "optune_tinyy"],
            "error: --config-name optune_tinyy: no recipe conf/optune_tinyy.yaml (recipes: "
            "demo_real, dpo_offline, hypo, online_dpo, optune, optune_adaptive, optune_llama3_8b, optune_random, "
            "optune_tiny, optune_zephyr_7b, real_model, sft_tiny)",
        ),
        (["model.optune.rhoo=0.5"], "error: config key model.optune.rhoo: Key 'rhoo' is not a config key"),
        (
            ["generation.eval_temperature=0.5"],
            "error: config key generation.eval_temperature: Key 'eval_temperature' is not a config key",
        ),
        (
            ["model.optune.rho=abc"],
            "error: config key model.optune.rho: Value 'abc' of type 'str' could not be converted to Float",
        ),
        (
            ["--seed", "3"],
            "error: unknown argument '--seed': expected --config-name NAME, --config-path DIR, --config FILE.yaml, --help and key=value overrides",
        ),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, args, line):
    """The launchers' entry point: exactly one line on stderr, status 2, nothing written
    (test_cli_launcher_refuses_in_its_own_process runs the launcher itself)."""
    from nemo_optune.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main([f"exp_manager.exp_dir={tmp_path}", *args])
    assert (exit_info.value.code, capsys.readouterr().err.strip().splitlines()) == (2, [line])
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_cli_launcher_refuses_in_its_own_process(tmp_path):
    """The launcher as a user runs it: the same one line from a fresh interpreter (no stray
    warnings or import messages on stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_optune.py"), f"exp_manager.exp_dir={tmp_path}"]
        + ["model.optune.rho=0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert (out.returncode, out.stderr.strip().splitlines()) == (
        2,
        ["error: config key model.optune.rho: must be in (0, 1], got 0.0"],
    )
    assert not os.listdir(tmp_path)


def test_a_shape_not_divisible_by_the_layout_names_the_key():
    import dataclasses

    from nemo_optune.config import ModelConfig
    from nemo_optune.models.hf_spec import tiny_llama_spec
    from nemo_optune.trainers.common import check_layout

    spec = tiny_llama_spec(
        ModelConfig(num_attention_heads=12, num_query_groups=6, num_layers=3, hidden_size=48), 13, 1, 16
    )
    check_layout(spec, 2, 3, "M")
    with pytest.raises(
        ValueError,
        match="config key model.tensor_model_parallel_size: M has 16 vocabulary rows "
        r"\(padded\), not divisible by 3",
    ):
        check_layout(dataclasses.replace(spec, num_query_groups=12), 3, 1, "M")
    with pytest.raises(
        ValueError, match="config key model.tensor_model_parallel_size: M has 6 query groups, not divisible by 4"
    ):
        check_layout(spec, 4, 1, "M")
    with pytest.raises(
        ValueError, match="config key model.pipeline_model_parallel_size: M has 3 layers, not divisible by 2"
    ):
        check_layout(spec, 1, 2, "M")


def test_an_sft_only_run_reports_what_it_did(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "train_sft.py"),
            f"exp_manager.exp_dir={tmp_path}",
            *TINY,
            "sft.steps=4",  # what is reported, not what is learnt
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    done = [line for line in out.stdout.splitlines() if line.startswith("[done]")]
    assert (
        len(done) == 1
        and done[0].startswith("[done] sft in ")
        and "nan" not in out.stdout
        and "RSS 0" not in out.stdout
    )
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path)


def test_torchrun_with_one_process_initialises_and_reports(tmp_path):
    """Under torchrun even one process rendezvouses at torchrun's store (MASTER_PORT): the run
    gets past process-group set-up and stops on the unwritable directory with one line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "1",
            os.path.join(ROOT, "examples", "train_optune.py"),
            f"exp_manager.exp_dir={blocker / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: config key exp_manager.exp_dir: {blocker / 'run'} is not writable (Not a directory)"], (
        out.stderr[-2000:]
    )
