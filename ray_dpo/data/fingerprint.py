"""The fingerprint, counters and token stats of a tokenized split.

The fingerprint is sha256 over (pair_id, prompt_ids, chosen_ids, rejected_ids) of every
kept row in file order: each row is hashed in the tokenize stage (``row_hash``), the
driver hashes the per-row digests in order, so block boundaries never matter.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_dpo.data.counters import DataCounters, TokenizeResult
from ray_dpo.data.schemas import KEPT_STATUSES, STAGE_SCHEMA


def row_hash(pair_id: str, prompt: list[int], chosen: list[int], rejected: list[int]) -> bytes:
    """sha256 digest of one kept row: its pair id and the three id lists (with lengths)."""
    h = hashlib.sha256(pair_id.encode("utf-8"))
    for ids in (prompt, chosen, rejected):
        h.update(len(ids).to_bytes(4, "little"))  # lengths make the encoding unambiguous
        h.update(np.asarray(ids, dtype="<i4").tobytes())
    return h.digest()


def _summary_columns(batch: pa.Table) -> pa.Table:
    """Small per-row columns the driver needs for counters, fingerprint and token stats
    (and an unpaired split's labels, for its desirable / undesirable counts)."""
    labels = {"label": batch.column("label")} if "label" in batch.column_names else {}
    return pa.table({**labels, 
        "file_index": batch.column("file_index"),
        "line": batch.column("line"),
        "status": batch.column("status"),
        "reason": batch.column("reason"),
        "row_hash": batch.column("row_hash"),
        "causes": batch.column("causes"),
        "raw_prompt": batch.column("raw_prompt"),
        "raw_response": batch.column("raw_response"),
        "prompt_only": batch.column("prompt_only"),
        "n_prompt": pc.list_value_length(batch.column("prompt_ids")),
        "n_chosen": pc.list_value_length(batch.column("chosen_ids")),
        "n_rejected": pc.list_value_length(batch.column("rejected_ids")),
    })


def summarize(staged: Any) -> tuple[DataCounters, str, dict]:
    """Counters, fingerprint and token stats from the small summary columns, in file order."""
    tables = list(staged.map_batches(_summary_columns, batch_format="pyarrow")
                  .iter_batches(batch_format="pyarrow", batch_size=None))
    schema = _summary_columns(STAGE_SCHEMA.empty_table()).schema
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    # Sort by (file, line): correct whatever order the blocks arrive in.
    order = np.lexsort((table.column("line").to_numpy(), table.column("file_index").to_numpy()))
    table = table.take(pa.array(order, pa.int64()))

    counters = DataCounters()
    columns = ("status", "reason", "causes", "raw_prompt", "raw_response", "prompt_only")
    for status, reason, causes, raw_prompt, raw_response, prompt_only in zip(
        *(table.column(name).to_pylist() for name in columns)
    ):
        lengths = (raw_prompt, raw_response) if raw_prompt >= 0 else None
        counters.add(TokenizeResult(None, status, reason, tuple(c for c in causes.split(",") if c), lengths,
                                    prompt_only=prompt_only))
    kept = table.filter(pc.is_in(table.column("status"), value_set=pa.array(KEPT_STATUSES)))
    digest = hashlib.sha256()
    for row_digest in kept.column("row_hash").to_pylist():
        digest.update(row_digest)
    stats = {}
    for part in ("prompt", "chosen", "rejected"):
        lengths = kept.column(f"n_{part}").to_numpy()
        stats[part] = {
            "mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "total": int(lengths.sum()),
        }
    if "label" in kept.column_names:  # KTO: what its lambda_D n_D / (lambda_U n_U) ratio counts
        desirable = sum(bool(v) for v in kept.column("label").to_pylist())
        stats["labels"] = {"desirable": desirable, "undesirable": kept.num_rows - desirable}
    return counters, digest.hexdigest(), stats
