"""Tokenize stage: blocks of READ_SCHEMA rows -> blocks of STAGE_SCHEMA rows.

Every row comes out, with its status: "ok" / "truncated" rows carry ids (a prompt-only row
its prompt's only); "dropped" (over length) and "skipped" (bad row, on_bad_row=skip) rows
have empty id lists. The small
helper columns feed the counters, the fingerprint and the token stats
(ray_dpo.data.fingerprint).

Pure: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import numpy as np
import pyarrow as pa

from ray_dpo.data.counters import TokenizeResult
from ray_dpo.data.errors import DataError
from ray_dpo.data.fingerprint import row_hash
from ray_dpo.data.formats import BadRowError
from ray_dpo.data.schemas import EXAMPLE_STAGE_SCHEMA, IDS, KEPT_STATUSES, READ_SCHEMA, STAGE_SCHEMA
from ray_dpo.data.tokenizer_cache import cached_pair_tokenizer
from ray_dpo.data.unpaired import example_results


def _ids_column(lists: list[list[int]]) -> pa.Array:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=IDS)


class _TokenizeRows:
    """The tokenize stage over one block (module docstring), with the process's cached
    tokenizer; ``settings`` holds the data config fields and ``unpaired``."""

    def __init__(self, tokenizer_path: str, chat_template: Optional[str], settings: SimpleNamespace):
        self.data = settings
        self.tokenizer = cached_pair_tokenizer(tokenizer_path, chat_template, settings)

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
        schema = EXAMPLE_STAGE_SCHEMA if getattr(self.data, "unpaired", False) else STAGE_SCHEMA
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
            out["row_hash"].append(row_hash(pair_id, *ids) if kept else b"")
            out["causes"].append(",".join(result.causes))
            raw_prompt, raw_response = result.lengths if result.lengths is not None else (-1, -1)
            out["raw_prompt"].append(raw_prompt)
            out["raw_response"].append(raw_response)
            out["prompt_only"].append(result.prompt_only)
            if "label" in out:
                out["label"].append(bool(row.get("label", True)))
        arrays = [
            _ids_column(out[f.name]) if f.type == IDS else pa.array(out[f.name], f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(arrays, schema=schema)


def tokenize_batch(batch: pa.Table, *, tokenizer_path: str, chat_template: Optional[str],
                   settings: SimpleNamespace) -> pa.Table:
    """Tokenize stage UDF (Ray Data map_batches): READ_SCHEMA block -> STAGE_SCHEMA block
    (EXAMPLE_STAGE_SCHEMA when ``settings.unpaired``)."""
    return _TokenizeRows(tokenizer_path, chat_template, settings)(batch)
