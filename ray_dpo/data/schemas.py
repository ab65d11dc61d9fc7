"""Arrow schemas of the rows flowing between the data stages (ray_dpo.data.pipeline).

Pure: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import pyarrow as pa

KEPT_STATUSES = ("ok", "truncated")
"""Statuses of the rows that become training pairs (the others are only counted)."""

READ_SCHEMA = pa.schema([
    ("file_index", pa.int32()),
    ("line", pa.int64()),
    ("source", pa.string()),
    ("raw", pa.string()),  # the JSON text of one row; null when it could not be read
    ("read_error", pa.string()),  # why "raw" is null (e.g. invalid UTF-8)
])

IDS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("prompt_ids", IDS),
    ("chosen_ids", IDS),
    ("rejected_ids", IDS),
    ("truncated", pa.bool_()),
])
"""Schema of PairData.dataset: the tokenized pair row of CONTRACTS.md (ids as int32); a
prompt-only row has empty chosen_ids and rejected_ids."""

STAGE_SCHEMA = pa.schema(list(PAIR_SCHEMA) + [
    ("status", pa.string()),
    ("reason", pa.string()),
    ("file_index", pa.int32()),
    ("line", pa.int64()),
    ("row_hash", pa.binary()),  # sha256 of one kept row; b"" for dropped / skipped rows
    ("causes", pa.string()),  # TokenizeResult.causes joined by ","; "" when ok
    ("raw_prompt", pa.int32()),  # prompt tokens before fitting; -1 when never tokenized
    ("raw_response", pa.int32()),  # longer response's tokens before fitting; -1 likewise
    ("prompt_only", pa.bool_()),  # a prompt without responses (online DPO), tokenized
])
HELPER_COLUMNS = [f.name for f in STAGE_SCHEMA if f.name not in PAIR_SCHEMA.names]
EXAMPLE_STAGE_SCHEMA = STAGE_SCHEMA.append(pa.field("label", pa.bool_()))
"""Unpaired losses (KTO): the stage rows carry "label" (ray_dpo/data/unpaired.py)."""
