"""Reference log-probs cached on storage, keyed by what they depend on.

Layout: ``<cache_dir>/<key>/ref_logps.parquet`` (pair_id string, ref_chosen_logp and
ref_rejected_logp float32) and ``<cache_dir>/<key>/meta.json`` (what went into the key,
for "why did it miss?"). cache_dir is a local path or any URI pyarrow.fs understands
(s3://, gs://, file://). The parquet file is the commit point: it appears whole or not
at all, so a reader never sees a half-written cache.

Imports pyarrow, not ray (``score_datasets`` only calls methods of the objects it gets).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger("ray_dpo.reference")

CACHE_FORMAT = 1  # bump when the layout or the meaning of the numbers changes
FILE_NAME = "ref_logps.parquet"
META_NAME = "meta.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


# --------------------------------------------------------------------------- key


def cache_key(*, data_fingerprint: str, model_path: str, dtype: str, extra: dict | None = None) -> str:
    """sha256 hex of everything the reference log-probs depend on.

    data_fingerprint: hash of the tokenized pairs (pair ids and token ids), so the
        tokenizer, chat template and truncation settings are covered through it.
    model_path: the reference model; identified by `model_identity`.
    dtype: the reference model's dtype ("fp32", "bf16", "fp16").
    extra: anything else that changes the numbers (JSON-serialisable), e.g. the attention
        implementation. Loss settings (beta, loss type) do not belong here.
    """
    payload = {
        "format": CACHE_FORMAT,
        "data": data_fingerprint,
        "model": model_identity(model_path),
        "dtype": dtype,
        "extra": extra or {},
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_identity(model_path: str) -> dict:
    """A cheap fingerprint of a model: where it is, its config, its weight files' stats.

    {"path": resolved path, "config": config.json text, "weights": [[name, size, mtime_ns]]}.
    Tradeoff: hashing the weights themselves would be exact but reads every byte
    (hundreds of GB for a large model, from object storage) on every run. Stats are
    O(files). A re-saved or copied model gets new mtimes, so it misses the cache and is
    recomputed: wasteful, never wrong. It would be wrong only if different weights were
    written in place with the same file sizes and the old mtimes restored (e.g. rsync -t
    or cp -p over the old files); pass a revision in ``extra`` if you do that.
    A name that is neither a local path nor a URI (a hub id) is identified by name only.
    """
    if "://" not in model_path and not os.path.exists(model_path):
        return {"hub_id": model_path}
    fs, path = _filesystem(model_path, resolve=True)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {"path": path, "weights": [[os.path.basename(path), info.size, info.mtime_ns]]}
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"reference model {model_path!r} does not exist")
    files = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    weights = sorted(
        [f.base_name, f.size, f.mtime_ns]
        for f in files
        if f.type == pafs.FileType.File and f.base_name.endswith(WEIGHT_SUFFIXES)
    )
    config = None
    if any(f.base_name == "config.json" for f in files):
        with fs.open_input_stream(f"{path}/config.json") as stream:
            config = stream.read().decode("utf-8")
    return {"path": path, "config": config, "weights": weights}


# --------------------------------------------------------------------------- save / load


def save(
    cache_dir: str,
    key: str,
    pair_ids: Sequence[str],
    chosen: Sequence[float],
    rejected: Sequence[float],
    *,
    meta: dict | None = None,
) -> str:
    """Write the cache entry ``key``; returns the parquet file's path (or URI path).

    pair_ids, chosen, rejected: equal lengths, pair ids unique. Overwrites an existing
    entry (same key = same inputs, so the same numbers up to nondeterminism).
    """
    if not len(pair_ids) == len(chosen) == len(rejected):
        raise ValueError(
            f"pair_ids, chosen and rejected must have equal lengths, got "
            f"{len(pair_ids)}, {len(chosen)}, {len(rejected)}"
        )
    seen: set[str] = set()
    for pid in pair_ids:
        if pid in seen:
            raise ValueError(f"pair id {pid!r} appears twice; cache entries are keyed by pair id")
        seen.add(pid)
    table = pa.table({
        "pair_id": pa.array(list(pair_ids), pa.string()),
        "ref_chosen_logp": pa.array(list(chosen), pa.float32()),
        "ref_rejected_logp": pa.array(list(rejected), pa.float32()),
    })
    fs, root = _filesystem(cache_dir)
    entry = f"{root.rstrip('/')}/{key}"
    fs.create_dir(entry, recursive=True)
    info = {"key": key, "format": CACHE_FORMAT, "num_pairs": len(pair_ids),
            "created_unix": time.time(), **(meta or {})}
    _atomic_write(fs, f"{entry}/{META_NAME}",
                  lambda out: out.write(json.dumps(info, indent=2, default=str).encode("utf-8")))
    # Parquet last: it is what load() looks for, so meta.json is complete whenever it is found.
    _atomic_write(fs, f"{entry}/{FILE_NAME}", lambda out: pq.write_table(table, out))
    return f"{entry}/{FILE_NAME}"


def load(cache_dir: str, key: str) -> dict[str, tuple[float, float]] | None:
    """{pair_id: (ref_chosen_logp, ref_rejected_logp)} of entry ``key``, or None if absent.

    An unreadable entry (e.g. storage corruption) is logged and treated as absent: the
    caller recomputes and save() overwrites it.
    """
    fs, root = _filesystem(cache_dir)
    path = f"{root.rstrip('/')}/{key}/{FILE_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        table = pq.read_table(path, filesystem=fs)
        ids = table.column("pair_id").to_pylist()
        chosen = table.column("ref_chosen_logp").to_pylist()
        rejected = table.column("ref_rejected_logp").to_pylist()
    except (OSError, KeyError, pa.ArrowException) as err:
        logger.warning("reference cache %s is unreadable (%s); recomputing", path, err)
        return None
    return {pid: (c, r) for pid, c, r in zip(ids, chosen, rejected)}


# --------------------------------------------------------------------------- scoring


def score_datasets(group: Any, datasets: Iterable[Any], *, batch_size: int,
                   progress: Callable[[int], None] | None = None) -> tuple[list, list, list]:
    """Score every pair of some PairData (``.dataset`` rows) once -> (pair_ids, chosen, rejected).

    group: a ReferenceGroup (anything with ``score_batches``). A pair id seen in an
    earlier dataset (the same file used for train and eval) is scored once.
    progress: called with the number of pairs scored so far after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pair_ids: list[str] = []
    chosen: list[float] = []
    rejected: list[float] = []
    for batch in group.score_batches(_unique_batches(datasets, batch_size)):
        for row in batch:
            pair_ids.append(row["pair_id"])
            chosen.append(row["ref_chosen_logp"])
            rejected.append(row["ref_rejected_logp"])
        if progress is not None:
            progress(len(pair_ids))
    return pair_ids, chosen, rejected


def _unique_batches(datasets: Iterable[Any], batch_size: int) -> Iterator[list[dict]]:
    seen: set[str] = set()
    batch: list[dict] = []
    for data in datasets:
        for row in data.dataset.iter_rows():
            if row["pair_id"] in seen:
                continue
            seen.add(row["pair_id"])
            batch.append(row)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- storage


def _filesystem(uri: str, *, resolve: bool = False) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    path = os.path.expanduser(uri)
    return pafs.LocalFileSystem(), os.path.realpath(path) if resolve else os.path.abspath(path)


def _atomic_write(fs: pafs.FileSystem, path: str, write) -> None:
    """Write ``path`` so that readers see the old file, or the new one whole.

    Local disks: a temporary sibling, then rename (atomic within a directory). Object
    stores (S3, GCS) already publish an object only when its upload completes, and their
    "rename" is a copy + delete, so there we write in place.
    """
    if fs.type_name != "local":
        with fs.open_output_stream(path) as out:
            write(out)
        return
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
