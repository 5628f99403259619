"""`reward.source: python`: any importable function scores a batch, as TRL's reward_funcs do.

The function takes (prompts: list[str], responses: list[str]) and returns one float per
pair; it is imported when the run starts, so a bad `reward.function` fails before any work.
Retries, timeouts and non-finite handling come from ResilientRewardSource around it."""

import importlib


class RewardFunctionError(ValueError):
    """`reward.function` cannot be imported or called; the message names the key."""


def import_reward_function(spec: str, key: str = "reward.function"):
    """'package.module:function' -> the callable, or RewardFunctionError naming the config key."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(f"config key {key}: {spec!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module failing on import
        raise RewardFunctionError(
            f"config key {key}: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"config key {key}: {module_name!r} has no callable {attr!r}")
    return fn


class PythonFunctionReward:
    def __init__(self, spec: str, key: str = "reward.function"):
        self.fn = import_reward_function(spec, key)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return list(self.fn(prompts, responses))
