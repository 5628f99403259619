"""The reward-source interface. Sources: the embedded task's rule-based scorer, a Python
function, a local HF sequence classifier, a reward server over HTTP (rewards/sources.py)."""

import inspect
from typing import Protocol


class RewardSource(Protocol):
    def score(self, prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        """One finite reward per (prompt, response) pair, batched. `columns`: the prompt rows'
        other columns and `truncated`, one value per pair; a source gets those its signature
        names (all with **kwargs; none if it takes only prompts and responses)."""


def keyword_parameters(fn) -> tuple[set[str] | None, set[str]]:
    """(the keywords fn takes after (prompts, responses), None for **kwargs: all; those it requires)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): the two positionals only
        return set(), set()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    keywords = [p for p in named if p.kind == p.KEYWORD_ONLY or named.index(p) >= 2]
    required = {p.name for p in keywords if p.default is p.empty}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None, required
    return {p.name for p in keywords}, required


def keywords_for(accepted: set[str] | None, columns: dict) -> dict:
    """The columns a callable takes (keyword_parameters' first value: None = all)."""
    return columns if accepted is None else {name: v for name, v in columns.items() if name in accepted}
