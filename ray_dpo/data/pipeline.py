"""Ray Data pipeline: preference shards -> tokenized pair rows (CONTRACTS.md).

    expand_files(patterns)            files / directories / globs, local or s3:// gs://
         |
    from_items([{path}])              one input row (and block) per file
         | map_batches(_read_file)    rows {file_index, line, source, raw}: JSONL line by
         |                            line (1-based line numbers; blank lines are not
         |                            rows), Parquet / JSON-array files record by record
         |                            (1-based record index as "line")
         | map_batches(_tokenize_batch)  CPU tasks; the tokenizer is cached per worker
         |                            process; EVERY row comes out, with a status column
    materialize()                     counters, fingerprint and token stats from small
         |                            summary columns, then keep ok + truncated rows
    PairData(dataset, counters, num_pairs, fingerprint, name)

Rows stay in file order: the order of ``files``, then line order. Pair ids are
"<source>:<line>", source being the file's basename (or its path relative to the
files' common directory when two files share a basename).

Bad rows (malformed JSON, an unknown format, missing fields, ...) follow
``data.on_bad_row``: "skip" counts them (DataCounters.skipped, with example reasons);
"error" stops at the first one with ``DataError("<file>:<line>: <problem, how to fix>")``.
Ray wraps exceptions raised in data tasks; ``build_pair_data`` unwraps them so the
driver sees the original message.

Ray Data 2.60 notes (measured): a dataset's DataContext is a copy of the global one
taken at creation and shared by datasets derived from it, so per-pipeline settings never
leak into other code; by default a UDF's exception reaches the driver as
RayTaskError(UserCodeException) with the original exception only as traceback text;
with ``raise_original_map_exception`` it is RayTaskError(<original type>), whose message
still carries Ray's retry note (we cut it off); map stages with equal resources fuse into
one task (a single big file would then be tokenized by one task).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from ray_dpo.data.chat_template import ChatTemplateSourceError, resolve_chat_template
from ray_dpo.data.formats import BadRowError
from ray_dpo.data.report import data_metrics, format_report  # noqa: F401 - re-exported for the driver
from ray_dpo.data.counters import DataCounters, TokenizeResult
from ray_dpo.data.tokenize import ChatTemplateError
from ray_dpo.data.unpaired import example_results

if TYPE_CHECKING:  # ray_dpo.config imports torch (via losses); data tasks need neither
    from ray_dpo.config import DataConfig

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
KEPT_STATUSES = ("ok", "truncated")
READ_CHUNK_ROWS = 2048
READ_NUM_CPUS = 0.5
"""Read tasks are I/O-bound. A resource request different from the tokenize stage's also
keeps Ray Data from fusing the two stages, so read blocks of one big file are tokenized
by several tasks in parallel instead of by the single task that reads the file."""
_DATA_FIELDS = ("format", "max_length", "max_prompt_length", "over_length", "on_bad_row", "unpair")
"""Rows per block emitted by the read stage (bounds the memory of one tokenize call)."""

_GLOB_CHARS = re.compile(r"[*?\[]")
_RAY_RETRY_NOTE = "\nFailed to apply UDF transform"

READ_SCHEMA = pa.schema([
    ("file_index", pa.int32()),
    ("line", pa.int64()),
    ("source", pa.string()),
    ("raw", pa.string()),  # the JSON text of one row; null when it could not be read
    ("read_error", pa.string()),  # why "raw" is null (e.g. invalid UTF-8)
])

_IDS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("prompt_ids", _IDS),
    ("chosen_ids", _IDS),
    ("rejected_ids", _IDS),
    ("truncated", pa.bool_()),
])
"""Schema of PairData.dataset: the tokenized pair row of CONTRACTS.md (ids as int32)."""

_STAGE_SCHEMA = pa.schema(list(PAIR_SCHEMA) + [
    ("status", pa.string()),
    ("reason", pa.string()),
    ("file_index", pa.int32()),
    ("line", pa.int64()),
    ("row_hash", pa.binary()),  # sha256 of one kept row; b"" for dropped / skipped rows
    ("causes", pa.string()),  # TokenizeResult.causes joined by ","; "" when ok
    ("raw_prompt", pa.int32()),  # prompt tokens before fitting; -1 when never tokenized
    ("raw_response", pa.int32()),  # longer response's tokens before fitting; -1 likewise
])
_HELPER_COLUMNS = [f.name for f in _STAGE_SCHEMA if f.name not in PAIR_SCHEMA.names]
_EXAMPLE_STAGE_SCHEMA = _STAGE_SCHEMA.append(pa.field("label", pa.bool_()))
"""Unpaired losses (KTO): the stage rows carry "label" (ray_dpo/data/unpaired.py)."""


class DataError(ValueError):
    """Unusable input data: the message names the file (and line) and how to fix it."""

    def __reduce__(self):  # picklable across Ray processes with its message intact
        return (DataError, (str(self),))


# --------------------------------------------------------------------------- file discovery


def _is_uri(path: str) -> bool:
    return "://" in path


def _ext_ok(path: str) -> bool:
    return path.lower().endswith(SUPPORTED_EXTENSIONS)


def _hidden(path: str) -> bool:
    # Spark/Hadoop markers (_SUCCESS, .part.crc) and dot files are not data.
    return posixpath.basename(path.rstrip("/")).startswith((".", "_"))


def _unsupported(key: str, pattern: str, path: str) -> DataError:
    return DataError(
        f"{key}: {path!r} (from {pattern!r}) has an unsupported extension; supported: "
        f"{', '.join(SUPPORTED_EXTENSIONS)}. Convert the file or remove it from {key}"
    )


def expand_files(patterns: Iterable[str] | str, *, key: str) -> list[str]:
    """Expand files, directories and globs into a list of data files.

    Args:
        patterns: each a file, a directory (every *.jsonl / *.json / *.parquet inside,
            recursively, sorted; names starting with "." or "_" are ignored) or a glob
            (``*``, ``?``, ``[..]``; ``**`` crosses directories). Local paths or URIs
            (s3://, gs://, file://; anything pyarrow.fs.FileSystem.from_uri opens).
        key: the config key the patterns came from, named in errors (e.g. "data.train_files").

    Returns:
        Paths in pattern order, each pattern's matches sorted, duplicates removed. Local
        paths are absolute (Ray workers may run in another directory); URIs keep their
        scheme.

    Raises:
        DataError: a pattern matches nothing, or names a file (directly or by glob) whose
            extension is not supported.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise DataError(f"{key}: no files given; list JSONL / Parquet files, directories or globs")
    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise DataError(f"{key}: {pattern!r} is not a path; give a file, directory or glob")
        found = _expand_uri(pattern, key) if _is_uri(pattern) else _expand_local(pattern, key)
        if not found:
            raise DataError(
                f"{key}: {pattern!r} matches no {' / '.join(SUPPORTED_EXTENSIONS)} file; "
                "check the path (directories are searched recursively, globs are expanded)"
            )
        for path in found:
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def _expand_local(pattern: str, key: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    if _GLOB_CHARS.search(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
    else:
        matches = [pattern] if os.path.exists(pattern) else []
    files: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            files += _dir_files_local(match)
        elif _ext_ok(match):
            files.append(os.path.abspath(match))
        else:
            raise _unsupported(key, pattern, match)
    return files


def _dir_files_local(directory: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found += [os.path.join(root, n) for n in names if _ext_ok(n) and not _hidden(n)]
    return sorted(os.path.abspath(p) for p in found)


def _expand_uri(pattern: str, key: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme = pattern.split("://", 1)[0]
    match = _GLOB_CHARS.search(pattern)
    base_uri = pattern if match is None else pattern[: pattern.rfind("/", 0, match.start()) + 1]
    try:
        fs, base = pafs.FileSystem.from_uri(base_uri)
    except Exception as err:  # bad bucket name, missing credentials, unknown scheme
        raise DataError(f"{key}: cannot open {pattern!r}: {err}") from err

    def uri(path: str) -> str:
        return f"{scheme}://{path}" if scheme != "file" else f"file://{path}"

    if match is None:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.Directory:
            return [uri(p) for p in _dir_files_fs(fs, base)]
        if not _ext_ok(base):
            raise _unsupported(key, pattern, pattern)
        return [uri(base)]
    # Glob: list everything under the fixed prefix, match the rest ourselves.
    regex = _glob_regex(pattern.split("://", 1)[1])  # same form as FileInfo.path
    infos = fs.get_file_info(pafs.FileSelector(base.rstrip("/"), recursive=True, allow_not_found=True))
    files = []
    for info in sorted(infos, key=lambda i: i.path):
        if not regex.fullmatch(info.path.rstrip("/")):
            continue
        if info.type == pafs.FileType.Directory:
            files += [uri(p) for p in _dir_files_fs(fs, info.path)]
        elif _ext_ok(info.path):
            files.append(uri(info.path))
        else:
            raise _unsupported(key, pattern, uri(info.path))
    return files


def _dir_files_fs(fs: Any, directory: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    rel = lambda p: p[len(directory):]  # noqa: E731 - hidden check on the part below `directory`
    return sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File and _ext_ok(i.path)
        and not any(part.startswith((".", "_")) for part in rel(i.path).split("/") if part)
    )


def _glob_regex(pattern: str) -> "re.Pattern[str]":
    """Glob -> regex with shell semantics: ``*`` / ``?`` stay inside one path segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            if pattern.startswith("/", i):  # "a/**/b" also matches "a/b"
                out[-1] = "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                out.append(fnmatch.translate(pattern[i:end + 1])[4:-3])  # "(?s:[..])\Z" -> "[..]"
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def source_names(files: list[str]) -> list[str]:
    """Short, unique names for ``files`` used in pair ids and messages.

    The basename when basenames are unique, else the path relative to the files'
    common directory (so "a/part-0.jsonl" and "b/part-0.jsonl" stay distinct).
    """
    plain = [f.split("://", 1)[-1] for f in files]
    names = [posixpath.basename(p) for p in plain]
    if len(set(names)) == len(names):
        return names
    common = posixpath.commonpath([posixpath.dirname(p) for p in plain]) if plain else ""
    return [posixpath.relpath(p, common) if common else p for p in plain]


# --------------------------------------------------------------------------- read stage


def _open_binary(path: str):
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return io.BufferedReader(fs.open_input_stream(inner), 1 << 20)
    return open(path, "rb")


def _json_records(data: bytes) -> Iterator[tuple[int, Optional[str], Optional[str]]]:
    """(line, raw, read_error) of a .json file: a JSON array of records, or JSON lines."""
    if data.lstrip()[:1] != b"[":
        yield from _jsonl_records(io.BytesIO(data))
        return
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        where = getattr(err, "lineno", 1)
        yield where, None, f"the file is not valid JSON ({err}); fix it or remove the file"
        return
    for index, item in enumerate(items, start=1):
        yield index, json.dumps(item, ensure_ascii=False), None


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

    if _is_uri(path):
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


def _read_file(batch: pa.Table) -> Iterator[pa.Table]:
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


# --------------------------------------------------------------------------- tokenize stage


def load_tokenizer(tokenizer_path: str, chat_template: Optional[str] = None) -> Any:
    """Hugging Face tokenizer from ``tokenizer_path``, with ``chat_template`` (the template
    text) replacing its own when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _read_template(chat_template: Optional[str]) -> Optional[str]:
    """Template text of a model.chat_template value (a file path or inline Jinja)."""
    try:
        return resolve_chat_template(chat_template)
    except ChatTemplateSourceError as err:
        raise DataError(str(err)) from None


def _row_hash(pair_id: str, prompt: list[int], chosen: list[int], rejected: list[int]) -> bytes:
    h = hashlib.sha256(pair_id.encode("utf-8"))
    for ids in (prompt, chosen, rejected):
        h.update(len(ids).to_bytes(4, "little"))  # lengths make the encoding unambiguous
        h.update(np.asarray(ids, dtype="<i4").tobytes())
    return h.digest()


def _ids_column(lists: list[list[int]]) -> pa.Array:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=_IDS)


_TOKENIZERS: dict[tuple, Any] = {}
"""Per-process cache: Ray reuses worker processes, so a tokenizer loads once per worker
(and across datasets built by the same cluster), not once per block."""


def _pair_tokenizer(tokenizer_path: str, chat_template: Optional[str], settings: SimpleNamespace) -> Any:
    from ray_dpo.data.tokenize import PairTokenizer

    key = (tokenizer_path, chat_template, _local_mtime(tokenizer_path))
    if key not in _TOKENIZERS:
        if len(_TOKENIZERS) >= 4:
            _TOKENIZERS.clear()
        _TOKENIZERS[key] = load_tokenizer(tokenizer_path, chat_template)
    return PairTokenizer(_TOKENIZERS[key], settings)


def _local_mtime(path: str) -> Optional[float]:
    """Newest mtime in a local tokenizer directory (a rewritten tokenizer misses the cache)."""
    try:
        return max((e.stat().st_mtime for e in os.scandir(path)), default=None)
    except OSError:  # a hub id or a file: no directory to look at
        return None


class _TokenizeRows:
    """Tokenize stage UDF (Ray Data tasks; the tokenizer comes from a per-process cache).

    Emits every input row with its status: "ok" / "truncated" rows carry ids; "dropped"
    (over length) and "skipped" (bad row, on_bad_row=skip) rows have empty id lists.
    """

    def __init__(self, tokenizer_path: str, chat_template: Optional[str], settings: SimpleNamespace):
        self.data = settings
        self.tokenizer = _pair_tokenizer(tokenizer_path, chat_template, settings)

    def _one(self, raw: Optional[str], read_error: Optional[str], source: str, line: int) -> TokenizeResult:
        try:
            return self.tokenizer.tokenize_json_row(raw, source=source, line=line, read_error=read_error)
        except BadRowError as err:  # data.on_bad_row=error (PairTokenizer decides)
            raise DataError(
                f"{err} (data.on_bad_row=error; set data.on_bad_row=skip to count and "
                "skip bad rows instead)"
            ) from None

    def _results(self, batch: pa.Table) -> list[tuple[int, int, str, TokenizeResult]]:
        cols = {name: batch.column(name).to_pylist() for name in READ_SCHEMA.names}
        out = []
        for file_index, line, source, raw, read_error in zip(*(cols[n] for n in READ_SCHEMA.names)):
            out.append((file_index, line, source, self._one(raw, read_error, source, line)))
        if getattr(self.data, "unpaired", False):  # KTO: examples, each with a mismatched completion
            examples = example_results([r for *_, r in out], unpair_pairs=self.data.unpair,
                                       max_length=self.data.max_length)
            out = [(*out[i][:3], r) for i, r in examples]
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema = _EXAMPLE_STAGE_SCHEMA if getattr(self.data, "unpaired", False) else _STAGE_SCHEMA
        out: dict[str, list] = {name: [] for name in schema.names}
        for file_index, line, source, result in self._results(batch):
            row = result.row or {}
            pair_id = row.get("pair_id", f"{source}:{line}")
            ids = [list(row.get(k, ())) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
            out["pair_id"].append(pair_id)
            out["prompt_ids"].append(ids[0])
            out["chosen_ids"].append(ids[1])
            out["rejected_ids"].append(ids[2])
            out["truncated"].append(bool(row.get("truncated", False)))
            out["status"].append(result.status)
            out["reason"].append(result.reason or "")
            out["file_index"].append(file_index)
            out["line"].append(line)
            kept = result.status in KEPT_STATUSES
            out["row_hash"].append(_row_hash(pair_id, *ids) if kept else b"")
            out["causes"].append(",".join(result.causes))
            raw_prompt, raw_response = result.lengths if result.lengths is not None else (-1, -1)
            out["raw_prompt"].append(raw_prompt)
            out["raw_response"].append(raw_response)
            if "label" in out:
                out["label"].append(bool(row.get("label", True)))
        arrays = [
            _ids_column(out[f.name]) if f.type == _IDS else pa.array(out[f.name], f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(arrays, schema=schema)


def _tokenize_batch(batch: pa.Table, *, tokenizer_path: str, chat_template: Optional[str],
                    settings: SimpleNamespace) -> pa.Table:
    return _TokenizeRows(tokenizer_path, chat_template, settings)(batch)


def _summary_columns(batch: pa.Table) -> pa.Table:
    """Small per-row columns the driver needs for counters, fingerprint and token stats."""
    return pa.table({
        "file_index": batch.column("file_index"),
        "line": batch.column("line"),
        "status": batch.column("status"),
        "reason": batch.column("reason"),
        "row_hash": batch.column("row_hash"),
        "causes": batch.column("causes"),
        "raw_prompt": batch.column("raw_prompt"),
        "raw_response": batch.column("raw_response"),
        "n_prompt": pc.list_value_length(batch.column("prompt_ids")),
        "n_chosen": pc.list_value_length(batch.column("chosen_ids")),
        "n_rejected": pc.list_value_length(batch.column("rejected_ids")),
    })


def _keep_pairs(batch: pa.Table) -> pa.Table:
    mask = pc.is_in(batch.column("status"), value_set=pa.array(KEPT_STATUSES))
    return batch.filter(mask).drop_columns(_HELPER_COLUMNS)


# --------------------------------------------------------------------------- build


@dataclass
class PairData:
    """Tokenized preference pairs of one split (train or eval).

    dataset: materialized Ray Dataset of PAIR_SCHEMA rows (ok + truncated only), in file
        order (the order of ``files``, then line order).
    counters: what happened to every row read (read == ok + truncated + dropped + skipped).
    num_pairs: rows in ``dataset`` (== counters.kept).
    fingerprint: sha256 hex over (pair_id, prompt_ids, chosen_ids, rejected_ids) of every
        kept row in order; changes when any token, id or the order changes. Computed as
        sha256 of the per-row sha256 digests, so block boundaries never matter.
    token_stats: {"prompt" | "chosen" | "rejected": {"mean", "max", "total"}} over kept rows.
    """

    dataset: Any
    counters: DataCounters
    num_pairs: int
    fingerprint: str
    name: str = "train"
    files: list[str] = field(default_factory=list)
    token_stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able description (no dataset)."""
        return {
            "name": self.name,
            "num_pairs": self.num_pairs,
            "fingerprint": self.fingerprint,
            "num_files": len(self.files),
            "files": self.files[:50],
            "counters": self.counters.as_dict(),
            "token_stats": self.token_stats,
        }


def build_pair_data(
    files: list[str],
    *,
    tokenizer_path: str,
    data: DataConfig,
    chat_template: Optional[str] = None,
    name: str = "train",
    max_tokenize_tasks: Optional[int] = None,
    unpaired: bool = False,
) -> PairData:
    """Read, normalise and tokenize ``files`` with Ray Data (module docstring).

    Args:
        files: data files, e.g. from ``expand_files``; they are read in this order.
        tokenizer_path: Hugging Face tokenizer directory.
        data: the run's DataConfig (format, lengths, over_length, on_bad_row).
        chat_template: model.chat_template: the path of a Jinja chat template file, or the
            template itself (inline Jinja), replacing the tokenizer's own.
        name: "train" / "eval", for reports.
        unpaired: the loss trains on unpaired examples (KTO): rows are examples with a
            "label" column and a mismatched completion as rejected_ids (data/unpaired.py);
            pairs are an error unless data.unpair splits them.
        max_tokenize_tasks: cap on concurrent tokenize tasks (None: as many as CPUs).
            Every new worker process pays the transformers import (~3 CPU-seconds, it
            pulls in torch) once; later builds on the same cluster reuse warm workers.

    Raises:
        DataError: a bad row with ``data.on_bad_row=error`` ("<file>:<line>: ..."), an
            unreadable file or chat template file.
        ChatTemplateError: the chat template cannot split prompt from response.
    """
    files = list(files)
    if not files:
        raise DataError(f"{name}: no data files to read")
    template = _read_template(chat_template)
    # Fail fast on the driver: a bad tokenizer path or data config is one clear error
    # here instead of the same failure in every data task.
    from ray_dpo.data.tokenize import PairTokenizer

    PairTokenizer(load_tokenizer(tokenizer_path, template), data)

    # A plain namespace: unpickling a DataConfig in a data task would import
    # ray_dpo.config, hence torch, in every worker process.
    settings = SimpleNamespace(**{k: getattr(data, k) for k in _DATA_FIELDS}, unpaired=unpaired)
    names = source_names(files)
    items = [{"path": f, "source": s, "file_index": i} for i, (f, s) in enumerate(zip(files, names))]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True  # this dataset's context copy only
    ds.context.raise_original_map_exception = True  # so _unwrap finds the original error
    ds = ds.map_batches(_read_file, batch_size=1, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)
    ds = ds.map_batches(
        _tokenize_batch,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_path": tokenizer_path, "chat_template": template, "settings": settings},
        num_cpus=1,
        concurrency=max_tokenize_tasks,
    )
    with _unwrapped_errors():
        staged = ds.materialize()
        counters, fingerprint, token_stats = _summarize(staged)
        pairs = staged.map_batches(_keep_pairs, batch_format="pyarrow").materialize()
    del staged
    return PairData(
        dataset=pairs, counters=counters, num_pairs=counters.kept, fingerprint=fingerprint,
        name=name, files=files, token_stats=token_stats,
    )


def _summarize(staged: Any) -> tuple[DataCounters, str, dict]:
    """Counters, fingerprint and token stats from the small summary columns, in file order."""
    tables = list(staged.map_batches(_summary_columns, batch_format="pyarrow")
                  .iter_batches(batch_format="pyarrow", batch_size=None))
    schema = _summary_columns(_STAGE_SCHEMA.empty_table()).schema
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    # Sort by (file, line): correct whatever order the blocks arrive in.
    order = np.lexsort((table.column("line").to_numpy(), table.column("file_index").to_numpy()))
    table = table.take(pa.array(order, pa.int64()))

    counters = DataCounters()
    for status, reason, causes, raw_prompt, raw_response in zip(
        *(table.column(name).to_pylist() for name in ("status", "reason", "causes", "raw_prompt", "raw_response"))
    ):
        lengths = (raw_prompt, raw_response) if raw_prompt >= 0 else None
        counters.add(TokenizeResult(None, status, reason, tuple(c for c in causes.split(",") if c), lengths))
    kept = table.filter(pc.is_in(table.column("status"), value_set=pa.array(KEPT_STATUSES)))
    digest = hashlib.sha256()
    for row_hash in kept.column("row_hash").to_pylist():
        digest.update(row_hash)
    stats = {}
    for part in ("prompt", "chosen", "rejected"):
        lengths = kept.column(f"n_{part}").to_numpy()
        stats[part] = {
            "mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "total": int(lengths.sum()),
        }
    return counters, digest.hexdigest(), stats


class _unwrapped_errors:
    """Re-raise errors of Ray Data tasks as the original DataError / ChatTemplateError.

    Ray wraps a UDF's exception in RayTaskError (a subclass of the original type when
    ``raise_original_map_exception`` is on) and appends a retry note to its message.
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, Exception):
            return False
        original = _find_original(exc)
        if original is None:
            return False
        message = str(original.args[0]) if original.args else str(original)
        message = message.split(_RAY_RETRY_NOTE, 1)[0]
        if isinstance(original, BadRowError):
            message = f"{original.source}:{original.line}: {original.problem}"
        cls = ChatTemplateError if isinstance(original, ChatTemplateError) else DataError
        raise cls(message) from None


def _find_original(exc: BaseException) -> Optional[BaseException]:
    wanted = (DataError, BadRowError, ChatTemplateError)
    todo, seen = [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError keeps the original here
        if isinstance(current, wanted) and not isinstance(cause, wanted):
            return current
        todo += [cause, current.__cause__, current.__context__]
    return None


# --------------------------------------------------------------------------- report


def data_report(train: PairData, eval: Optional[PairData] = None) -> dict:  # noqa: A002
    """JSON-able data report (MLflow artifact, console): per split the counters (with
    per-cause counts and length histograms), pair count, fingerprint, token stats, files
    and ``lengths``: p50 / p90 / p99 / max tokens of prompt, longer response and their
    total before fitting."""
    report = {"train": train.summary(), "eval": eval.summary() if eval is not None else None}
    for split, data in (("train", train), ("eval", eval)):
        if data is not None:
            report[split]["lengths"] = data.counters.length_summary()
    kept = train.counters.kept
    report["train"]["kept_fraction"] = round(kept / train.counters.read, 4) if train.counters.read else 0.0
    return report
