"""Read stage: one data file -> blocks of READ_SCHEMA rows, one per record.

JSONL files line by line (1-based line numbers; blank lines are not rows); Parquet and
JSON-array files record by record (1-based record index as "line"). A line that cannot
be decoded becomes a row with ``raw`` null and ``read_error`` saying why; the tokenize
stage reports it as a bad row.

Pure: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import io
import json
from typing import Iterator, Optional

import pyarrow as pa

from ray_dpo.data.errors import DataError
from ray_dpo.data.files import is_uri
from ray_dpo.data.schemas import READ_SCHEMA

READ_CHUNK_ROWS = 2048
"""Rows per block emitted by the read stage (bounds the memory of one tokenize call)."""
READ_NUM_CPUS = 0.5
"""Read tasks are I/O-bound. A resource request different from the tokenize stage's also
keeps Ray Data from fusing the two stages, so read blocks of one big file are tokenized
by several tasks in parallel instead of by the single task that reads the file."""


def _open_binary(path: str):
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return io.BufferedReader(fs.open_input_stream(inner), 1 << 20)
    return open(path, "rb")


def _json_records(data: bytes) -> Iterator[tuple[int, Optional[str], Optional[str]]]:
    """(line, raw, read_error) of a .json file: a JSON array of records, JSON lines, or one
    JSON object spread over several lines (one record, or a read error saying where the
    records are if it holds them under a key)."""
    if data.lstrip()[:1] != b"[":
        whole = _one_object(data)
        if whole is None:
            yield from _jsonl_records(io.BytesIO(data))
        elif nested := [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]:
            yield 1, None, (f"the file holds one JSON object whose records are under {nested[0]!r}, not a list "
                            f"of records; write them as a JSON array ([{{...}}, ...]) or one per line (.jsonl)")
        else:
            yield 1, json.dumps(whole, ensure_ascii=False), None
        return
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        where = getattr(err, "lineno", 1)
        yield where, None, f"the file is not valid JSON ({err}); fix it or remove the file"
        return
    for index, item in enumerate(items, start=1):
        yield index, json.dumps(item, ensure_ascii=False), None


def _one_object(data: bytes) -> Optional[dict]:
    """The file's single JSON object when it is one spread over several lines (its first line
    alone is not JSON, the whole file is an object), else None: JSON lines."""
    first = data.lstrip().split(b"\n", 1)[0]
    try:
        json.loads(first)
        return None
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        whole = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return whole if isinstance(whole, dict) else None


def _jsonl_records(stream) -> Iterator[tuple[int, Optional[str], Optional[str]]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            yield number, line.decode("utf-8"), None
        except UnicodeDecodeError as err:
            yield number, None, f"the line is not valid UTF-8 ({err.reason} at byte {err.start})"


def _parquet_records(path: str) -> Iterator[tuple[int, Optional[str], Optional[str]]]:
    import pyarrow.parquet as pq

    if is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        source = fs.open_input_file(inner)
    else:
        source = path
    index = 0
    for batch in pq.ParquetFile(source).iter_batches(batch_size=READ_CHUNK_ROWS):
        for record in batch.to_pylist():
            index += 1
            # default=str: timestamps / decimals become strings; formats need strings anyway.
            yield index, json.dumps(record, ensure_ascii=False, default=str), None


def _records(path: str) -> Iterator[tuple[int, Optional[str], Optional[str]]]:
    lower = path.lower()
    if lower.endswith(".parquet"):
        yield from _parquet_records(path)
        return
    with _open_binary(path) as stream:
        if lower.endswith(".json"):
            yield from _json_records(stream.read())
        else:
            yield from _jsonl_records(stream)


def read_file(batch: pa.Table) -> Iterator[pa.Table]:
    """Read stage UDF: one input row per file -> blocks of READ_SCHEMA rows."""
    for path, source, file_index in zip(
        batch.column("path").to_pylist(),
        batch.column("source").to_pylist(),
        batch.column("file_index").to_pylist(),
    ):
        chunk: list[tuple[int, Optional[str], Optional[str]]] = []
        try:
            for record in _records(path):
                chunk.append(record)
                if len(chunk) >= READ_CHUNK_ROWS:
                    yield _read_table(chunk, source, file_index)
                    chunk = []
        except OSError as err:
            raise DataError(f"{source}: cannot read {path}: {err}") from err
        if chunk:
            yield _read_table(chunk, source, file_index)


def _read_table(chunk: list, source: str, file_index: int) -> pa.Table:
    lines, raws, errors = zip(*chunk)
    n = len(chunk)
    return pa.table(
        [pa.array([file_index] * n, pa.int32()), pa.array(lines, pa.int64()),
         pa.array([source] * n, pa.string()), pa.array(raws, pa.string()),
         pa.array(errors, pa.string())],
        schema=READ_SCHEMA,
    )
