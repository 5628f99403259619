"""`reward.source: python`: any importable function scores a batch, as TRL's reward_funcs do.

The function takes (prompts: list[str], responses: list[str]) and returns one float per
pair; it is imported when the run starts, so a bad `reward.function` fails before any work.
Like TRL, it may also take the prompt rows' other columns by keyword (one value per pair, e.g.
`reference=None`) and `truncated` (list[bool]: the response was cut at max_new_tokens); it is
given only the keywords its signature names (all of them with **kwargs). Retries, timeouts and
non-finite handling come from ResilientRewardSource around it."""

import importlib

from nemo_optune.rewards.base import keyword_parameters, keywords_for


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
        self.fn, self.spec, self.key = import_reward_function(spec, key), spec, key
        self.accepted, self.required = keyword_parameters(self.fn)

    def check_columns(self, available: set[str]) -> None:
        """At start-up: every keyword the function requires is among the data's columns."""
        missing = sorted(self.required - available)
        if missing:
            raise RewardFunctionError(
                f"config key {self.key}: {self.spec} requires keyword {missing[0]!r}, which the prompts do not "
                f"provide (columns: {', '.join(sorted(available)) or 'none'}); give it a default or add the column"
            )

    def score(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        return list(self.fn(prompts, responses, **keywords_for(self.accepted, columns)))
