"""The embedded task: sort a string of digits.

Prompt "3141>" asks for "1134". The reward is graded in [0, 1]: the fraction of positions
that hold the right digit, over the longer of the answer and the target, so a response
that is nearly sorted, or has one digit too many, still earns partial credit.

The SFT warm start learns from *imperfect* demonstrations (a configurable share of them
corrupted by swaps, substitutions and deletions), so the SFT policy samples a mix of right
and wrong answers: the setting where preference tuning has something to fix.
"""

import dataclasses
import random
from collections.abc import Iterable

from nemo_optune.data.tokenizer import CharTokenizer

PROMPT_END = ">"
ALPHABET = "0123456789" + PROMPT_END


@dataclasses.dataclass(frozen=True)
class SortTask:
    min_digits: int = 3
    max_digits: int = 8

    @property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(ALPHABET)

    @property
    def max_prompt_chars(self) -> int:
        return self.max_digits + 1

    def sample_prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_digits, self.max_digits)
        return "".join(rng.choice("0123456789") for _ in range(n)) + PROMPT_END

    def prompts(self, count: int, seed: int, exclude: Iterable = frozenset()) -> list[str]:
        """`count` distinct prompts drawn from `seed`, none of them in `exclude`."""
        rng = random.Random(seed)
        out: list[str] = []
        seen = set(exclude)
        while len(out) < count:
            p = self.sample_prompt(rng)
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    @staticmethod
    def target(prompt: str) -> str:
        return "".join(sorted(prompt.rstrip(PROMPT_END)))

    def reward(self, prompt: str, response: str) -> float:
        return graded(self.target(prompt), response)

    def demonstration(self, prompt: str, rng: random.Random, noise: float) -> str:
        """The sorted answer, corrupted 1-3 times with probability `noise`."""
        answer = list(self.target(prompt))
        if rng.random() < noise:
            for _ in range(rng.randint(1, 3)):
                kind = rng.choice(("swap", "substitute", "delete"))
                i = rng.randrange(len(answer))
                if kind == "swap" and len(answer) > 1:
                    j = min(i + 1, len(answer) - 1) if i + 1 < len(answer) else i - 1
                    answer[i], answer[j] = answer[j], answer[i]
                elif kind == "substitute":
                    answer[i] = rng.choice("0123456789")
                elif len(answer) > 1:
                    del answer[i]
        return "".join(answer)


def graded(target: str, response: str) -> float:
    """The task's reward of a response against the sorted answer (the module docstring)."""
    hits = sum(a == b for a, b in zip(response, target))
    return hits / max(len(target), len(response))


def reference_rows(prompts: list[str]) -> list[dict]:
    """Prompt rows with the answer as a `reference` column (docs/data_sources.md's example)."""
    return [{"prompt": p, "reference": SortTask.target(p)} for p in prompts]
