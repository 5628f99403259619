"""Rows of a data source with where they came from, and the chat-message conventions shared by
prompt and preference sets. Every problem is `FILE:LINE: what is wrong` (`FILE:row N` for
parquet and arrow), raised before any model is built.

A source (docs/data_sources.md) is a .jsonl / .parquet file, a glob of them
(`data/train-*.parquet`), a directory of them, or a `datasets` save_to_disk directory (its
arrow files, read with pyarrow: no `datasets` import)."""

import glob
import json
import os
from collections.abc import Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names file and line."""


SHARD_SUFFIXES = (".parquet", ".jsonl", ".json")  # the files a directory source reads


def source_files(source: str) -> list[str]:
    """The files of a source, in reading order: a glob's matches and a directory's shards
    sorted by name (train-00000-of-00002 before train-00001-of-00002), a save_to_disk
    directory's arrow files in its state.json order, else the file itself."""
    if glob.has_magic(source):
        files = sorted(f for f in glob.glob(source) if os.path.isfile(f))
        if not files:
            raise DataError(f"{source}: no files match this pattern")
        return files
    if not os.path.isdir(source):
        return [source]  # a missing file is reported when it is opened
    if os.path.isfile(os.path.join(source, "dataset_dict.json")):
        splits = sorted(n for n in os.listdir(source) if os.path.isdir(os.path.join(source, n)))
        raise DataError(
            f"{source}: a datasets DatasetDict; give one split's directory ({', '.join(splits) or 'none found'})"
        )
    if os.path.isfile(os.path.join(source, "state.json")):
        return _saved_dataset_files(source)
    files = sorted(
        os.path.join(source, n)
        for n in os.listdir(source)
        if n.endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(source, n))
    )
    if not files:
        raise DataError(f"{source}: directory has no {' / '.join(SHARD_SUFFIXES)} files (nor a datasets state.json)")
    return files


def _saved_dataset_files(directory: str) -> list[str]:
    """A `Dataset.save_to_disk` directory's arrow shards, as its state.json lists them."""
    state_path = os.path.join(directory, "state.json")
    try:
        state = json.load(open(state_path))
        files = [os.path.join(directory, entry["filename"]) for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{state_path}: not a datasets save_to_disk state (no readable _data_files list: {err!r})"
        ) from None
    if not files:
        raise DataError(f"{state_path}: lists no data files")
    return files


def read_source(source: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every record of every file of a source (source_files)."""
    for path in source_files(source):
        yield from read_records(path)


def read_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for every record of a .jsonl/.json-lines, .parquet or .arrow file."""
    if path.endswith(".parquet"):
        yield from _parquet_records(path)
        return
    if path.endswith(".arrow"):
        yield from _arrow_records(path)
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
    yield from _numbered(path, table.iter_batches(batch_size=4096))


def _arrow_records(path: str) -> Iterator[tuple[str, dict]]:
    """An Arrow IPC file: the streaming format `datasets` writes, or the random-access one."""
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
    except OSError as err:
        raise DataError(f"{path}: cannot open data file ({err})") from None
    with source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as err:
                raise DataError(f"{path}: not an Arrow IPC file ({err})") from None
            yield from _numbered(path, (reader.get_batch(i) for i in range(reader.num_record_batches)))
            return
        yield from _numbered(path, reader)


def _numbered(path: str, batches) -> Iterator[tuple[str, dict]]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row


def write_records(path: str, rows: list[dict]) -> None:
    """Rows as a .parquet file, else as JSON lines."""
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


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
