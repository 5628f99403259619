"""Offline preference sets (JSONL or parquet), in either common schema:

- NeMo-Aligner: `prompt`, `chosen_response`, `rejected_response` (strings), optionally
  `chosen_reward`, `rejected_reward`;
- Hugging Face / TRL: `prompt`, `chosen`, `rejected`, each a string or a list of chat messages
  (the response is the last assistant turn); without `prompt`, `chosen` and `rejected` are
  whole conversations whose shared turns up to the last user turn are the prompt. So are they
  when `prompt` is a plain string but `chosen` and `rejected` are conversations with a user turn
  (UltraFeedback's rows; TRL's rule too): the chat, not the plain text, is the prompt.

Every problem is reported as `FILE:LINE: what is wrong`, before any model is built."""

import dataclasses
import json
import math
import random

from nemo_optune.data.records import DataError, check_messages, prompt_messages, read_source

NEMO_ALIGNER = ("chosen_response", "rejected_response")
HF = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    prompt: str | tuple[dict, ...]  # text, or chat messages ending with a user turn
    chosen: str
    rejected: str
    chosen_reward: float | None
    rejected_reward: float | None
    where: str = ""  # FILE:LINE, for error messages


def _response(value, where: str, field: str) -> str:
    """A response given as a string or as messages (its last assistant turn)."""
    if isinstance(value, str):
        return value
    messages = check_messages(value, where, field)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {field!r} must end with an assistant turn")
    return messages[-1]["content"]


def _prompt(row: dict, where: str, fields: tuple[str, str]):
    conversations = all(
        isinstance(row[f], list) and any(isinstance(m, dict) and m.get("role") == "user" for m in row[f])
        for f in fields
    )
    if "prompt" not in row or (isinstance(row["prompt"], str) and conversations):  # implicit: the chats share it
        chats = [check_messages(row[f], where, f) for f in fields]
        prompts = [prompt_messages(chat, where, f) for chat, f in zip(chats, fields)]
        if prompts[0] != prompts[1]:
            raise DataError(
                f"{where}: {fields[0]!r} and {fields[1]!r} do not share their turns up to the last user turn"
            )
        return prompts[0]
    if isinstance(row["prompt"], str):
        if not row["prompt"].strip():
            raise DataError(f"{where}: empty prompt")
        return row["prompt"]
    return prompt_messages(check_messages(row["prompt"], where, "prompt"), where, "prompt")


def _rewards(row: dict, where: str) -> tuple[float | None, float | None]:
    rewards: list[float | None] = []
    for key in ("chosen_reward", "rejected_reward"):
        value = row.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise DataError(f"{where}: field {key!r} must be a finite number, got {value!r}")
        rewards.append(None if value is None else float(value))
    chosen, rejected = rewards
    if (chosen is None) != (rejected is None):
        raise DataError(f"{where}: give both chosen_reward and rejected_reward, or neither")
    if chosen is not None and rejected is not None and chosen < rejected:  # a reward-gap weight would turn negative
        raise DataError(f"{where}: chosen_reward {chosen} is below rejected_reward {rejected}")
    return chosen, rejected


def read_preferences(path: str) -> list[PreferenceRecord]:
    records = []
    for where, row in read_source(path):  # a file, glob, directory or save_to_disk dir
        nemo = any(key in row for key in NEMO_ALIGNER)
        fields = NEMO_ALIGNER if nemo else HF
        required = ("prompt", *fields) if nemo else fields
        for key in required:
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}")
            if nemo and not isinstance(row[key], str):
                raise DataError(f"{where}: field {key!r} must be a string")
        prompt = _prompt(row, where, fields)
        chosen, rejected = (_response(row[f], where, f) for f in fields)
        records.append(PreferenceRecord(prompt, chosen, rejected, *_rewards(row, where), where=where))
    if not records:
        raise DataError(f"{path}: no preference records")
    return records


def write_preference_jsonl(path: str, records: list[PreferenceRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            row: dict[str, object] = {"prompt": r.prompt, "chosen_response": r.chosen, "rejected_response": r.rejected}
            if r.chosen_reward is not None:
                row.update(chosen_reward=r.chosen_reward, rejected_reward=r.rejected_reward)
            f.write(json.dumps(row) + "\n")


def sort_task_preferences(task, prompts: list[str], noise: float, seed: int) -> list[PreferenceRecord]:
    """An offline preference set for the embedded task: two noisy demonstrations per prompt,
    the better one chosen (re-drawn until they differ in reward, up to 20 times)."""
    rng = random.Random(seed)
    records = []
    for prompt in prompts:
        for _ in range(20):
            a, b = task.demonstration(prompt, rng, noise), task.demonstration(prompt, rng, noise)
            ra, rb = task.reward(prompt, a), task.reward(prompt, b)
            if ra != rb:
                break
        (c, rc), (r, rr) = sorted([(a, ra), (b, rb)], key=lambda x: -x[1])
        records.append(PreferenceRecord(prompt, c, r, rc, rr))
    return records
