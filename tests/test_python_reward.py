"""`reward.source=python`: a user's function scores the samples; bad functions fail clearly."""

import pytest
import reward_functions
from conftest import TINY

from nemo_optune.config import load_config
from nemo_optune.rewards.python_function import PythonFunctionReward, RewardFunctionError, import_reward_function
from nemo_optune.rewards.resilient import ResilientRewardSource, RewardSourceError


def test_a_python_function_reward_trains_exactly_like_the_same_built_in_reward(sft_checkpoint, tmp_path):
    from nemo_optune.run import run_experiment

    base = TINY + [f"model.restore_from_path={sft_checkpoint}"]
    builtin = run_experiment(load_config("optune_tiny", base + [f"exp_manager.exp_dir={tmp_path / 'task'}"]))
    reward_functions.CALLS.clear()
    python = run_experiment(
        load_config(
            "optune_tiny",
            base
            + [
                f"exp_manager.exp_dir={tmp_path / 'python'}",
                "reward.source=python",
                "reward.function=reward_functions:sort_reward",
            ],
        )
    )
    assert sum(reward_functions.CALLS) == (64 + 32) * 4 + 3 * 32 * 2  # samples of 2 iterations + 3 evaluations
    for a, b in zip(builtin["iterations"], python["iterations"]):
        assert (a["heldout_reward"], a["train_loss"], a["pool_mean_reward"]) == (
            b["heldout_reward"],
            b["train_loss"],
            b["pool_mean_reward"],
        )


@pytest.mark.parametrize(
    "spec,message",
    [
        ("reward_functions.sort_reward", "is not of the form package.module:function"),
        ("no_such_module:f", r"cannot import 'no_such_module' \(ModuleNotFoundError"),
        ("reward_functions:absent", "'reward_functions' has no callable 'absent'"),
        ("reward_functions:not_callable", "'reward_functions' has no callable 'not_callable'"),
    ],
)
def test_a_bad_reward_function_names_the_key(spec, message):
    with pytest.raises(RewardFunctionError, match=f"config key reward.function: .*{message}"):
        import_reward_function(spec)


def test_python_source_needs_a_function():
    with pytest.raises(ValueError, match="config key reward.function: source=python needs"):
        load_config("optune_tiny", ["reward.source=python"])


@pytest.mark.parametrize(
    "fn,message",
    [
        ("raises", r"failed 2 times \(last: ValueError: the scorer crashed\)"),
        ("one_short", r"failed 2 times \(last: returned 3 rewards for 4 responses\)"),
    ],
)
def test_a_failing_reward_function_is_retried_then_stops_the_run(fn, message):
    source = ResilientRewardSource(
        PythonFunctionReward(f"reward_functions:{fn}"), fn, retries=1, backoff_seconds=0, timeout_seconds=5
    )
    with pytest.raises(RewardSourceError, match=message):
        source.score(["12>"] * 4, ["12"] * 4)
