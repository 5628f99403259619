"""The reward-source interface. Sources: the embedded task's rule-based scorer, a Python
function, a local HF sequence classifier, a reward server over HTTP (rewards/sources.py)."""

from typing import Protocol


class RewardSource(Protocol):
    def score(self, prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        """One finite reward per (prompt, response) pair, batched. `columns`: the prompt rows'
        other columns and `truncated`, one value per pair (sources that do not read them ignore them)."""
