"""Reward functions for `reward.source=python` in the tests (importable: tests/ is on sys.path)."""

from nemo_optune.data.sort_task import SortTask

CALLS = []


def sort_reward(prompts, responses):
    """The embedded task's reward, as a user's function would compute it."""
    CALLS.append(len(prompts))
    task = SortTask()
    return [task.reward(p, r) for p, r in zip(prompts, responses)]


def response_length(prompts, responses):
    return [len(r) for r in responses]


def raises(prompts, responses):
    raise ValueError("the scorer crashed")


def one_short(prompts, responses):
    return [0.5] * (len(prompts) - 1)


not_callable = 3


def chat_sort_reward(prompts, responses):
    """The sort reward for conversations: the last user turn is the task prompt."""
    task = SortTask()
    return [task.reward(p[-1]["content"], r) for p, r in zip(prompts, responses)]


def logged_length(prompts, responses):
    """Response lengths; each call leaves a file naming the calling rank (placement tests)."""
    import os

    import torch.distributed as dist

    with open(os.path.join(os.environ["REWARD_CALL_LOG"], f"rank{dist.get_rank()}"), "a") as f:
        f.write(f"{len(prompts)}\n")
    return [len(r) for r in responses]


def fails_on_rank_2(prompts, responses):
    import torch.distributed as dist

    if dist.get_rank() == 2:
        raise ValueError("the scorer of rank 2 crashed")
    return [0.0] * len(prompts)


def sort_reward_dies(prompts, responses):
    """The sort reward, in a reward server that SIGKILLs itself once it has been asked for more
    than $REWARD_DIE_AFTER_PAIRS pairs in all (fault tests: a server lost in the middle of a run)."""
    import os
    import signal

    SCORED_PAIRS.append(len(prompts))
    if 0 < int(os.environ.get("REWARD_DIE_AFTER_PAIRS", "0")) < sum(SCORED_PAIRS):
        os.kill(os.getpid(), signal.SIGKILL)
    return sort_reward(prompts, responses)


SCORED_PAIRS = []


def sort_reference_reward(prompts, responses, reference, truncated=None):
    """The sort reward read from the rows' `reference` column (the sorted answer), as a user's
    function scores against a data set's answers; `truncated` is taken and not needed."""
    from nemo_optune.data.sort_task import graded

    assert truncated is not None and len(truncated) == len(responses)
    return [graded(ref, r) for ref, r in zip(reference, responses)]


def keywords_seen(prompts, responses, **kwargs):
    """How many keywords a **kwargs function is given (all of them)."""
    return [float(len(kwargs))] * len(prompts)
