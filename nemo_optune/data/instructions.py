"""A task for real chat models: verifiable instructions in the style of IFEval.

Each prompt is one user turn: a short request followed by one or two instructions a rule can
check ("Use at most 12 words.", "Do not use any commas.", ...). The instructions are written in
fixed sentences, so the reward reads them back from the prompt text itself: it needs nothing but
(prompt, response), works on prompt files and through the reward server, and is the share of
the prompt's instructions the response follows (graded, in [0, 1]).

    python -m nemo_optune.data.make_instruction_prompts --out DIR [--train N] [--heldout N] [--seed S]

writes DIR/train.jsonl and DIR/heldout.jsonl (chat `messages` rows, disjoint sets); with
`data.task=instructions` a run draws the same prompts in-process (data.num_train_prompts,
data.num_heldout_prompts, data.seed). Reward: `reward.source=python
reward.function=nemo_optune.rewards.instructions:reward` (or reward.source=task).
"""

import json
import random
import re

REQUESTS = (
    "Describe a rainy afternoon.",
    "Explain why people enjoy music.",
    "Give one tip for learning a new language.",
    "What makes a good friend?",
    "Describe your ideal breakfast.",
    "Explain what a rainbow is.",
    "Give advice to someone starting a new job.",
    "Why is sleep important?",
    "Describe a walk in the forest.",
    "What is the best way to save money?",
    "Explain how plants grow.",
    "Describe the ocean at night.",
    "Give a reason to read books.",
    "What should a traveler pack for a short trip?",
    "Explain why exercise is healthy.",
    "Describe a busy city street.",
    "How can someone stay calm before an exam?",
    "What is a good hobby for winter?",
    "Explain what the moon does to the tides.",
    "Describe a favorite childhood game.",
    "Give a tip for cooking pasta.",
    "Why do birds migrate?",
    "Describe the smell of fresh bread.",
    "Explain why teamwork matters.",
    "What makes a city pleasant to live in?",
    "Describe a quiet library.",
    "Give one idea for a weekend project.",
    "Why should people drink water?",
    "Explain what a computer does.",
    "Describe a mountain view.",
    "How can someone make a new friend?",
    "What is a good way to start the day?",
    "Explain why recycling helps.",
    "Describe a summer festival.",
    "Give a tip for writing a clear email.",
    "Why do leaves change color in autumn?",
    "Describe a cup of hot tea.",
    "Explain what a map is for.",
    "What makes a good teacher?",
    "Describe a train journey.",
    "Give advice for a first job interview.",
    "Why is the sky blue?",
    "Describe a garden in spring.",
    "Explain how a bicycle works.",
    "What is a kind thing to do for a neighbor?",
    "Describe snow falling on a town.",
    "Give a tip for keeping a room tidy.",
    "Why do people keep pets?",
)
KEYWORDS = ("green", "river", "happy", "light", "simple", "future", "gentle", "bright")
START_WORDS = ("yes", "well", "sure", "today", "first")
END_PHRASES = ("That is all.", "Thank you.", "Have a nice day.", "Any questions?")
WORD_LIMITS = (8, 12, 16, 20)
BULLET_COUNTS = (2, 3, 4)


def _words(text: str) -> list[str]:
    return text.split()


def _has_bullets(n: int, text: str) -> bool:
    return sum(line.strip().startswith(("- ", "* ")) for line in text.splitlines()) == n


def _is_json(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())  # a fenced block counts
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _first_word(text: str) -> str:
    words = _words(text)
    return re.sub(r"\W", "", words[0]).lower() if words else ""


# kind -> (sentence template, the sentence as a regex capturing the parameter, check(parameter, response))
INSTRUCTIONS = {
    "max_words": ("Use at most {} words.", r"Use at most (\d+) words\.", lambda n, r: 0 < len(_words(r)) <= int(n)),
    "no_commas": (
        "Do not use any commas.",
        r"Do not use any commas\.()",
        lambda _, r: bool(r.strip()) and "," not in r,
    ),
    "lowercase": (
        "Write your whole answer in lowercase letters.",
        r"Write your whole answer in lowercase letters\.()",
        lambda _, r: any(c.isalpha() for c in r) and r == r.lower(),
    ),
    "uppercase": (
        "Write your whole answer in capital letters.",
        r"Write your whole answer in capital letters\.()",
        lambda _, r: any(c.isalpha() for c in r) and r == r.upper(),
    ),
    "keyword": (
        'Include the word "{}".',
        r'Include the word "(\w+)"\.',
        lambda w, r: re.search(rf"\b{w}\b", r, re.IGNORECASE) is not None,
    ),
    "start_word": (
        'Start your answer with the word "{}".',
        r'Start your answer with the word "(\w+)"\.',
        lambda w, r: _first_word(r) == w.lower(),
    ),
    "end_phrase": (
        'End your answer with the phrase "{}"',
        r'End your answer with the phrase "([^"]+)"',
        lambda p, r: r.rstrip().endswith(p),
    ),
    "bullets": (
        'Answer with exactly {} bullet points, each on its own line starting with "- ".',
        r"Answer with exactly (\d+) bullet points",
        lambda n, r: _has_bullets(int(n), r),
    ),
    "json": ("Answer in valid JSON only.", r"Answer in valid JSON only\.()", lambda _, r: _is_json(r)),
}
PARAMETERS = {
    "max_words": WORD_LIMITS,
    "keyword": KEYWORDS,
    "start_word": START_WORDS,
    "end_phrase": END_PHRASES,
    "bullets": BULLET_COUNTS,
}
# Pairs no response can satisfy together (or that read oddly together).
CONFLICTS = {
    frozenset(p)
    for p in (
        ("lowercase", "uppercase"),
        ("json", "bullets"),
        ("json", "start_word"),
        ("json", "end_phrase"),
        ("json", "max_words"),
        ("bullets", "max_words"),
        ("bullets", "start_word"),
        ("uppercase", "start_word"),
        ("uppercase", "end_phrase"),
        ("lowercase", "end_phrase"),
    )
}
_PATTERNS = {kind: re.compile(pattern) for kind, (_, pattern, _) in INSTRUCTIONS.items()}


def instruction_text(kind: str, parameter=None) -> str:
    return INSTRUCTIONS[kind][0].format(parameter)


def found_instructions(prompt_text: str) -> list[tuple[str, str]]:
    """(kind, parameter) of every instruction sentence in a prompt, in the order of INSTRUCTIONS."""
    return [(kind, m.group(1)) for kind, pattern in _PATTERNS.items() for m in pattern.finditer(prompt_text)]


def follows(kind: str, parameter: str, response: str) -> bool:
    return INSTRUCTIONS[kind][2](parameter, response)


def prompt_text(prompt) -> str:
    """The text a prompt's instructions are read from: a string, or the last user turn of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [turn["content"] for turn in prompt if turn["role"] == "user"]
    if not users:
        raise ValueError("instructions reward: a chat prompt without a user turn")
    return users[-1]


def score(prompt, response: str) -> float:
    """Share of the prompt's instructions that `response` follows; ValueError when the prompt has none."""
    found = found_instructions(prompt_text(prompt))
    if not found:
        raise ValueError(f"instructions reward: no instruction found in the prompt {prompt_text(prompt)[:80]!r}")
    return sum(follows(kind, p, response) for kind, p in found) / len(found)


class InstructionsTask:
    """Prompts (chat messages) drawn from a seed, with instructions of the given kinds (all by
    default), and the rule-based reward."""

    def __init__(self, kinds=()):
        self.kinds = list(kinds) or list(INSTRUCTIONS)

    def sample_prompt(self, rng: random.Random) -> tuple[dict, ...]:
        kinds = [rng.choice(self.kinds)]
        others = [k for k in self.kinds if k != kinds[0] and frozenset((k, kinds[0])) not in CONFLICTS]
        if others and rng.random() < 0.5:
            kinds.append(rng.choice(others))
        kinds.sort(key=list(INSTRUCTIONS).index)  # canonical order: the same set reads the same
        sentences = [instruction_text(k, rng.choice(PARAMETERS[k]) if k in PARAMETERS else None) for k in kinds]
        return ({"role": "user", "content": " ".join([rng.choice(REQUESTS), *sentences])},)

    def prompts(self, count: int, seed: int, exclude=()) -> list[tuple[dict, ...]]:
        """`count` distinct prompts drawn from `seed`, none of them in `exclude`."""
        rng = random.Random(seed)
        out: list[tuple[dict, ...]] = []
        seen = {_key(p) for p in exclude}
        for _ in range(1000 * count):
            if len(out) == count:
                return out
            p = self.sample_prompt(rng)
            if _key(p) not in seen:
                seen.add(_key(p))
                out.append(p)
        raise ValueError(f"cannot draw {count} distinct instruction prompts (fewer combinations left)")

    @staticmethod
    def reward(prompt, response: str) -> float:
        return score(prompt, response)


def _key(prompt: tuple[dict, ...]) -> str:
    return prompt[-1]["content"]
