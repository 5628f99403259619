"""Reward functions for `reward.source=python` in the tests (importable: tests/ is on sys.path)."""

from nemo_optune.data.sort_task import SortTask

CALLS = []


def sort_reward(prompts, responses):
    """The embedded task's reward, as a user's function would compute it."""
    CALLS.append(len(prompts))
    task = SortTask()
    return [task.reward(p, r) for p, r in zip(prompts, responses)]


def raises(prompts, responses):
    raise ValueError("the scorer crashed")


def one_short(prompts, responses):
    return [0.5] * (len(prompts) - 1)


not_callable = 3


def chat_sort_reward(prompts, responses):
    """The sort reward for prompts rendered through a chat template: the digits before '>'."""
    import re

    task = SortTask()
    return [task.reward(re.search(r"(\d+)>", p).group(0), r) for p, r in zip(prompts, responses)]
