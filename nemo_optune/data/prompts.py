"""Prompt sets from data sources (data/records.py: a file, a glob, a directory of shards, a
`datasets` save_to_disk directory) or a weighted mixture of them: a `prompt` string or a
`messages` list per row (UltraChat's schema: the prompt is the conversation up to its last user
turn; field names configurable), the row's other columns (reward functions may read them), and
how a prompt becomes token ids (a chat template where asked for). A row with both (UltraChat's
own rows: `prompt` is the first user turn as plain text) is read as its `messages`, so that it
goes through the chat template whatever data.apply_chat_template says. docs/data_sources.md."""

import dataclasses
import random
from collections.abc import Sequence

from nemo_optune.data.records import DataError, check_messages, prompt_messages, read_source
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.runtime.seeds import mix_seed

Prompt = str | Sequence[dict]  # text, or chat messages ending with a user turn
# Keywords a reward function gets from the trainer itself: no data column may take them.
RESERVED_COLUMNS = ("prompts", "responses", "truncated")


@dataclasses.dataclass
class PromptSet:
    prompts: list[Prompt]
    where: list[str]  # FILE:LINE (FILE:row N) of each prompt, or "task"
    # The rows' other columns by name, one value per prompt (None where a row lacks the column).
    columns: dict[str, list] = dataclasses.field(default_factory=dict)

    def take(self, indices: Sequence[int]) -> "PromptSet":
        return PromptSet(
            [self.prompts[i] for i in indices],
            [self.where[i] for i in indices],
            {name: [values[i] for i in indices] for name, values in self.columns.items()},
        )


def read_prompt_set(source: str, prompt_field: str = "prompt", messages_field: str = "messages") -> PromptSet:
    """Every row of a source (records.source_files) as a prompt with its other columns."""
    prompts: list[Prompt] = []
    wheres: list[str] = []
    rows: list[dict] = []
    for where, row in read_source(source):
        wheres.append(where)
        if row.get(messages_field) is not None:  # the chat wins over a plain-text `prompt`
            prompts.append(
                prompt_messages(check_messages(row[messages_field], where, messages_field), where, messages_field)
            )
        elif isinstance(row.get(prompt_field), str):
            if not row[prompt_field].strip():
                raise DataError(f"{where}: empty prompt")
            prompts.append(row[prompt_field])
        else:
            raise DataError(
                f"{where}: needs a string field {prompt_field!r} or a list field {messages_field!r} "
                f"(data.prompt_field / data.messages_field)"
            )
        rows.append({k: v for k, v in row.items() if k not in (prompt_field, messages_field)})
    if not prompts:
        raise DataError(f"{source}: no prompts")
    names = list(dict.fromkeys(name for row in rows for name in row))  # first-seen order
    return PromptSet(prompts, wheres, {name: [row.get(name) for row in rows] for name in names})


def read_prompts(
    path: str, prompt_field: str = "prompt", messages_field: str = "messages"
) -> tuple[list[Prompt], list[str]]:
    """(prompts, where each came from)."""
    read = read_prompt_set(path, prompt_field, messages_field)
    return read.prompts, read.where


def mix_prompt_sets(sets: list[PromptSet], weights: list[float], count: int, seed: int) -> PromptSet:
    """`count` prompts drawn from weighted sets, deterministically from `seed`: draw d picks set i
    with probability weights[i] / sum(weights) (random.Random(seed).choices, independent draws:
    set i's count is binomial(count, its share), so a 3:1 mixture is 3:1 in expectation), and takes
    that set's next row in a shuffled order; a set drawn more often than it has rows starts
    another shuffled pass (its rows repeat only then). Prompts keep the draw order."""
    picks = random.Random(seed).choices(range(len(sets)), weights=weights, k=count)
    orders: list[list[int]] = [[] for _ in sets]
    passes = [0] * len(sets)
    chosen: list[tuple[int, int]] = []
    for i in picks:
        if not orders[i]:
            orders[i] = list(range(len(sets[i].prompts)))
            random.Random(mix_seed(seed, i, passes[i])).shuffle(orders[i])
            orders[i].reverse()  # popped from the end: the shuffled order
            passes[i] += 1
        chosen.append((i, orders[i].pop()))
    names = list(dict.fromkeys(name for s in sets for name in s.columns))
    return PromptSet(
        [sets[i].prompts[r] for i, r in chosen],
        [sets[i].where[r] for i, r in chosen],
        {n: [sets[i].columns[n][r] if n in sets[i].columns else None for i, r in chosen] for n in names},
    )


def configured_prompts(data_cfg, split: str) -> PromptSet | None:
    """The prompts of data.{split}_prompts_path (every row, in order) or of the weighted mixture
    data.{split}_sources (data.num_{split}_prompts drawn from data.seed, +1 for held-out, as the
    task's prompts are); None where neither is set (the task's generated prompts)."""
    d = data_cfg
    path, sources = getattr(d, f"{split}_prompts_path"), getattr(d, f"{split}_sources")
    if path:
        return _columns_checked(read_prompt_set(path, d.prompt_field, d.messages_field), path)
    if not sources:
        return None
    sets = [
        _columns_checked(
            read_prompt_set(s.path, s.prompt_field or d.prompt_field, s.messages_field or d.messages_field), s.path
        )
        for s in sources
    ]
    count = d.num_train_prompts if split == "train" else d.num_heldout_prompts
    return mix_prompt_sets(sets, [s.weight for s in sources], count, d.seed + (split != "train"))


def _columns_checked(read: PromptSet, source: str) -> PromptSet:
    reserved = next((n for n in read.columns if n in RESERVED_COLUMNS), None)
    if reserved:
        raise DataError(
            f"{source}: column {reserved!r} is reserved (reward functions get it from the trainer); rename it"
        )
    return read


def encode_prompt(prompt: Prompt, tokenizer: Tokenizer, apply_chat_template: bool, where: str) -> list[int]:
    """Token ids of a prompt: chat messages (and, with `apply_chat_template`, text as one user
    turn) go through the tokenizer's chat template with the generation prompt appended."""
    if isinstance(prompt, str) and not apply_chat_template:
        try:
            ids = tokenizer.encode(prompt, add_special_tokens=True)  # e.g. a BOS token
        except ValueError as err:  # e.g. a character outside a character tokenizer's alphabet
            raise DataError(f"{where}: {err}") from None
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            why = "data.apply_chat_template=true" if isinstance(prompt, str) else "chat-message prompts"
            raise DataError(f"{where}: {why} need a tokenizer with a chat template; this tokenizer has none")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[attr-defined]  # HFTokenizer's
    if len(ids) == 0:  # generation and the loss need a last prompt token to continue from
        raise DataError(f"{where}: the prompt encodes to no tokens")
    return ids


def fit_prompt(ids: list[int], limit: int, policy: str, where: str) -> list[int] | None:
    """A prompt over `limit` tokens under data.long_prompts: error, skip (None) or truncate
    (keep the end, where the question is)."""
    if len(ids) <= limit:
        return ids
    if policy == "error":
        raise DataError(
            f"{where}: prompt has {len(ids)} tokens, over the limit of {limit} (raise data.max_prompt_tokens, "
            "or data.long_prompts: skip | truncate)"
        )
    return None if policy == "skip" else ids[-limit:]


def encode_prompt_file(
    path: str, tokenizer: Tokenizer, data_cfg, limit: int
) -> tuple[list[Prompt], list[list[int]], int]:
    """A prompt source read (data.prompt_field / data.messages_field) and encoded: see encode_prompt_set."""
    prompts, where = read_prompts(path, data_cfg.prompt_field, data_cfg.messages_field)
    return encode_prompt_set(prompts, where, tokenizer, data_cfg, limit)[:3]


def encode_prompt_set(
    prompts: Sequence[Prompt], where: list[str], tokenizer: Tokenizer, data_cfg, limit: int
) -> tuple[list[Prompt], list[list[int]], int, list[int]]:
    """(prompts as reward sources see them, token ids, how many were over the limit, the indices
    of the prompts kept: data.long_prompts=skip leaves some out). A reward
    source gets a text prompt as is and a conversation as its list of {role, content} turns (as
    TRL's reward functions do), never the policy's chat-template rendering, which a reward model
    with its own template would read as user text; a truncated prompt is the text of its kept
    tokens."""
    texts: list[Prompt] = []
    ids: list[list[int]] = []
    too_long, kept = 0, []
    for i, (prompt, at) in enumerate(zip(prompts, where)):
        encoded = encode_prompt(prompt, tokenizer, data_cfg.apply_chat_template, at)
        fitted = fit_prompt(encoded, limit, data_cfg.long_prompts, at)
        too_long += fitted is not encoded
        if fitted is not None:
            kept.append(i)
            ids.append(fitted)
            texts.append(
                tokenizer.decode(fitted)
                if fitted is not encoded
                else prompt
                if isinstance(prompt, str)
                else [dict(turn) for turn in prompt]
            )
    if not ids:
        raise DataError(f"{where[0].rsplit(':', 1)[0]}: no usable prompts (all {too_long} over the length limit)")
    return texts, ids, too_long, kept
