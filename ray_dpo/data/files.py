"""Data file discovery: files, directories and globs, local or object-store URIs, into the
list of files the pipeline reads, and the short source names used in pair ids.

Pure: imports neither ray, deepspeed nor vllm (pyarrow.fs only for URIs).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
import re
from typing import Any, Iterable

from ray_dpo.data.errors import DataError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")


def is_uri(path: str) -> bool:
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
        found = _expand_uri(pattern, key) if is_uri(pattern) else _expand_local(pattern, key)
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
