"""The reward-source interface. Sources: the embedded task's rule-based scorer today; HF
sequence classifiers and remote (HTTP) reward servers later."""

from typing import Protocol


class RewardSource(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One finite reward per (prompt, response) pair, batched."""
