"""NeMo-Aligner preference JSONL: one object per line with `prompt`, `chosen_response`,
`rejected_response` and optionally `chosen_reward`, `rejected_reward`.

Every problem is reported as `FILE:LINE: what is wrong`, before any model is built."""

import dataclasses
import json
import math
import random

REQUIRED = ("prompt", "chosen_response", "rejected_response")


class DataError(ValueError):
    """Bad input data; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float | None
    rejected_reward: float | None
    line: int = 0  # line number in the source file, for error messages


def read_preference_jsonl(path: str) -> list[PreferenceRecord]:
    try:
        f = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except OSError as err:
        raise DataError(f"{path}: cannot open preference file ({err.strerror})") from None
    records = []
    with f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in REQUIRED:
                if key not in obj:
                    raise DataError(f"{where}: missing field {key!r}")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: field {key!r} must be a string")
            if not obj["prompt"].strip():
                raise DataError(f"{where}: empty prompt")
            rewards = []
            for key in ("chosen_reward", "rejected_reward"):
                value = obj.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                    raise DataError(f"{where}: field {key!r} must be a finite number, got {value!r}")
                rewards.append(None if value is None else float(value))
            if (rewards[0] is None) != (rewards[1] is None):
                raise DataError(f"{where}: give both chosen_reward and rejected_reward, or neither")
            if rewards[0] is not None and rewards[0] < rewards[1]:  # a reward-gap weight would turn negative
                raise DataError(f"{where}: chosen_reward {rewards[0]} is below rejected_reward {rewards[1]}")
            records.append(PreferenceRecord(obj["prompt"], obj["chosen_response"], obj["rejected_response"], *rewards,
                                            line=number))
    if not records:
        raise DataError(f"{path}: no preference records")
    return records


def write_preference_jsonl(path: str, records: list[PreferenceRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            row = {"prompt": r.prompt, "chosen_response": r.chosen, "rejected_response": r.rejected}
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
