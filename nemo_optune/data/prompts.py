"""Prompt sets from files (JSONL or parquet): a `prompt` string or a `messages` list per row
(UltraChat's schema: the prompt is the conversation up to its last user turn; field names
configurable), and how a prompt becomes token ids (a chat template where asked for). A row with
both (UltraChat's own rows: `prompt` is the first user turn as plain text) is read as its
`messages`, so that it goes through the chat template whatever data.apply_chat_template says."""

from collections.abc import Sequence

from nemo_optune.data.records import DataError, check_messages, prompt_messages, read_records
from nemo_optune.data.tokenizer import Tokenizer

Prompt = str | Sequence[dict]  # text, or chat messages ending with a user turn


def read_prompts(
    path: str, prompt_field: str = "prompt", messages_field: str = "messages"
) -> tuple[list[Prompt], list[str]]:
    """(prompts, where each came from)."""
    prompts: list[Prompt] = []
    wheres: list[str] = []
    for where, row in read_records(path):
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
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts, wheres


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
    """A prompt file read (data.prompt_field / data.messages_field) and encoded: see encode_prompt_set."""
    prompts, where = read_prompts(path, data_cfg.prompt_field, data_cfg.messages_field)
    return encode_prompt_set(prompts, where, tokenizer, data_cfg, limit)


def encode_prompt_set(
    prompts: Sequence[Prompt], where: list[str], tokenizer: Tokenizer, data_cfg, limit: int
) -> tuple[list[Prompt], list[list[int]], int]:
    """(prompts as reward sources see them, token ids, how many were over the limit). A reward
    source gets a text prompt as is and a conversation as its list of {role, content} turns (as
    TRL's reward functions do), never the policy's chat-template rendering, which a reward model
    with its own template would read as user text; a truncated prompt is the text of its kept
    tokens."""
    texts: list[Prompt] = []
    ids, too_long = [], 0
    for prompt, at in zip(prompts, where):
        encoded = encode_prompt(prompt, tokenizer, data_cfg.apply_chat_template, at)
        fitted = fit_prompt(encoded, limit, data_cfg.long_prompts, at)
        too_long += fitted is not encoded
        if fitted is not None:
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
    return texts, ids, too_long
