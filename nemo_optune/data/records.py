"""Rows of a data file (JSONL or parquet) with where they came from, and the chat-message
conventions shared by prompt and preference sets. Every problem is `FILE:LINE: what is wrong`
(`FILE:row N` for parquet), raised before any model is built."""

import json
from collections.abc import Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names file and line."""


def read_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every record of a .jsonl/.json-lines or .parquet file."""
    if path.endswith(".parquet"):
        yield from _parquet_records(path)
        return
    try:
        f = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except OSError as err:
        raise DataError(f"{path}: cannot open data file ({err.strerror})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet_records(path: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # missing file, not a parquet file
        raise DataError(f"{path}: cannot read parquet file ({err})") from None
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row


def check_messages(messages, where: str, field: str) -> list[dict]:
    """A chat as a list of {"role", "content"} dicts with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: {field}[{i}] must be {{"role": system|user|assistant, "content": string}}')
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_messages(messages: list[dict], where: str, field: str) -> tuple[dict, ...]:
    """The prompt of a conversation (UltraChat's schema): every turn up to and including the
    last user turn; later assistant turns are the recorded answer, not prompt."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise DataError(f"{where}: field {field!r} has no user turn")
    return tuple(messages[: last_user + 1])
