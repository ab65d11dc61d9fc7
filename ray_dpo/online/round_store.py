"""Each online round's pairs, kept on the run's storage as the round is built.

A round is generated once. When its steps run again — the driver killed and the same
command run again, the policy workers restarted from a checkpoint, the OnlineCoordinator
restarted by Ray — the round's pairs come back from here instead of being sampled anew
from other weights, so the pair ledger of a resumed run holds exactly the pairs a run
without the failure would have trained.

    <storage_path>/<run.name>/online_rounds/round_00003.jsonl
        line 1: {"round": 3, "fingerprint": {...}, "metrics": {...}}
        then one pair row per line (CONTRACTS.md: pair_id, prompt_ids, chosen_ids,
        rejected_ids, truncated)

A file is written under a temporary name and then moved into place, so a process that dies
mid-write leaves no round behind. A file whose fingerprint (seed, model, round plan, pair
strategy, data) differs from the run's is ignored with a warning: the run's settings
changed, so the round is generated again. Local paths and object-store URIs alike.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from ray_dpo.config import join_path

logger = logging.getLogger("ray_dpo.online")


@dataclass
class SavedRound:
    rows: list[dict]
    metrics: dict
    path: str


class RoundStore:
    """round r -> its pair rows, under ``<run_dir>/online_rounds``.

    fingerprint: what must match for a saved round to be the one this run would build
    (JSON-serializable values).
    """

    def __init__(self, run_dir: str, fingerprint: dict[str, Any]):
        self.directory = join_path(run_dir, "online_rounds")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back

    def path(self, r: int) -> str:
        return join_path(self.directory, f"round_{r:05d}.jsonl")

    def save(self, r: int, rows: list[dict], metrics: dict[str, float]) -> str:
        from ray_dpo.faults import storage_fs

        fs, directory = storage_fs(self.directory)
        fs.create_dir(directory, recursive=True)
        _, final = storage_fs(self.path(r))
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        header = {"round": r, "fingerprint": self.fingerprint, "metrics": metrics}
        with fs.open_output_stream(tmp) as f:
            f.write((json.dumps(header) + "\n").encode())
            for row in rows:
                f.write((json.dumps(row) + "\n").encode())
        fs.move(tmp, final)
        return self.path(r)

    def load(self, r: int) -> Optional[SavedRound]:
        """Round r as saved by this run, or None (never saved, or saved with other settings)."""
        from pyarrow import fs as pafs

        from ray_dpo.faults import storage_fs

        fs, final = storage_fs(self.path(r))
        if fs.get_file_info(final).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(final) as f:
            lines = f.read().decode().splitlines()
        header = json.loads(lines[0])
        if header.get("fingerprint") != self.fingerprint or header.get("round") != r:
            logger.warning("%s was written with other settings (%s); round %d is generated again",
                           self.path(r), _differences(header.get("fingerprint") or {}, self.fingerprint), r)
            return None
        return SavedRound([json.loads(line) for line in lines[1:] if line.strip()], header.get("metrics", {}),
                          self.path(r))


def _differences(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys) or "?"
