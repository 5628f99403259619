"""The verifiable-instructions reward (data/instructions.py) as a `reward.source: python` function:

    reward.source=python reward.function=nemo_optune.rewards.instructions:reward

A prompt is a string or a chat (list of {role, content}); its last user turn holds the
instructions. The reward is the share of them the response follows, in [0, 1]."""

from nemo_optune.data.instructions import score


def reward(prompts: list, responses: list[str]) -> list[float]:
    return [score(p, r) for p, r in zip(prompts, responses)]
