"""PairStore: tokenized pairs in compact numpy storage, and their reference log-prob arrays."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
"""The token-id columns of a tokenized pair row, in the order PairStore lays them out."""


class PairStore:
    """Tokenized pairs in flat numpy arrays, in their original (file) order.

    Memory per pair: 4 bytes per token (prompt + chosen + rejected, one int32 buffer)
    + 24 bytes of offsets (three int64 arrays of N + 1) + the pair id (fixed-width bytes:
    the longest id's UTF-8 length) + 1 byte (truncated) + 1 byte (label, unpaired rows only).
    Roughly 4 * tokens + 60 bytes, versus ~100 bytes per token as Python lists of ints.
    Unpaired rows (KTO) carry a "label" (True = desirable); pair rows have no labels.
    """

    def __init__(self, tokens: np.ndarray, offsets: dict[str, np.ndarray], pair_ids: np.ndarray,
                 truncated: np.ndarray, labels: Optional[np.ndarray] = None):
        self.tokens = tokens
        self.offsets = offsets  # column -> int64 [N + 1], positions in self.tokens
        self.pair_ids = pair_ids  # bytes, dtype "S<width>"
        self.truncated = truncated
        self.labels = labels  # bool [N] or None

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def nbytes(self) -> int:
        return (self.tokens.nbytes + sum(o.nbytes for o in self.offsets.values())
                + self.pair_ids.nbytes + self.truncated.nbytes + (0 if self.labels is None else self.labels.nbytes))

    def pair_id(self, i: int) -> str:
        return self.pair_ids[i].decode("utf-8")

    def row(self, i: int) -> dict:
        out: dict[str, Any] = {"pair_id": self.pair_id(i)}
        for column in ID_COLUMNS:
            start, end = self.offsets[column][i], self.offsets[column][i + 1]
            out[column] = self.tokens[start:end].tolist()
        out["truncated"] = bool(self.truncated[i])
        if self.labels is not None:
            out["label"] = bool(self.labels[i])
        return out

    def limit(self, n: int) -> "PairStore":
        """The first n pairs (views, no copy of the token buffer)."""
        n = min(n, len(self))
        return PairStore(self.tokens, {k: v[: n + 1] for k, v in self.offsets.items()},
                         self.pair_ids[:n], self.truncated[:n], None if self.labels is None else self.labels[:n])

    @classmethod
    def from_source(cls, source: Any) -> "PairStore":
        """From PairData (``.dataset``), a Ray Dataset, an iterable of pair row dicts, or a
        PairStore (returned as is: stores are read-only)."""
        if isinstance(source, PairStore):
            return source
        dataset = getattr(source, "dataset", source)
        if hasattr(dataset, "iter_batches"):
            return cls._from_arrow(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
        return cls._from_rows(dataset)

    @classmethod
    def _from_arrow(cls, tables: Iterable[Any]) -> "PairStore":
        import pyarrow.compute as pc

        parts: dict[str, list[np.ndarray]] = {c: [] for c in ID_COLUMNS}
        lengths: dict[str, list[np.ndarray]] = {c: [] for c in ID_COLUMNS}
        ids: list[str] = []
        truncated: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for table in tables:
            if table.num_rows == 0:
                continue
            if "label" in table.column_names:
                labels.append(table.column("label").to_numpy(zero_copy_only=False).astype(bool))
            for column in ID_COLUMNS:
                col = table.column(column)
                parts[column].append(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int32))
                lengths[column].append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
            ids += table.column("pair_id").to_pylist()
            truncated.append(table.column("truncated").to_numpy(zero_copy_only=False).astype(bool))
        return cls._assemble(parts, lengths, ids, truncated, labels)

    @classmethod
    def _from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> "PairStore":
        parts: dict[str, list[np.ndarray]] = {c: [] for c in ID_COLUMNS}
        lengths: dict[str, list[np.ndarray]] = {c: [] for c in ID_COLUMNS}
        ids: list[str] = []
        truncated: list[bool] = []
        labels: list[bool] = []
        for row in rows:
            if "label" in row:
                labels.append(bool(row["label"]))
            for column in ID_COLUMNS:
                values = np.asarray(row[column], dtype=np.int32)
                parts[column].append(values)
                lengths[column].append(np.array([len(values)]))
            ids.append(row["pair_id"])
            truncated.append(bool(row.get("truncated", False)))
        return cls._assemble(parts, lengths, ids, [np.asarray(truncated, dtype=bool)],
                             [np.asarray(labels, dtype=bool)] if labels else [])

    @classmethod
    def _assemble(cls, parts, lengths, ids, truncated, labels=()) -> "PairStore":
        flat = {c: np.concatenate(parts[c]) if parts[c] else np.zeros(0, np.int32) for c in ID_COLUMNS}
        tokens = np.concatenate([flat[c] for c in ID_COLUMNS])
        offsets, base = {}, 0
        for column in ID_COLUMNS:
            sizes = np.concatenate(lengths[column]) if lengths[column] else np.zeros(0, np.int64)
            offsets[column] = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]) + base
            base += len(flat[column])
        pair_ids = np.array([i.encode("utf-8") for i in ids], dtype="S") if ids else np.zeros(0, "S1")
        trunc = np.concatenate(truncated) if truncated else np.zeros(0, bool)
        label = np.concatenate(labels) if labels else None
        if label is not None and len(label) != len(trunc):
            raise ValueError(f"{len(label)} of {len(trunc)} rows have a label; unpaired rows all need one")
        return cls(tokens, offsets, pair_ids, trunc, label)


def ref_array(store: PairStore, ref_cache: Optional[Mapping[str, Any]], reference_free: bool = False) -> np.ndarray:
    """[N, 2] float64 reference log-probs (chosen, rejected); NaN where unknown; 0 (never
    scored, never served) for a reference-free loss."""
    ref = np.full((len(store), 2), 0.0 if reference_free else np.nan, dtype=np.float64)
    if ref_cache:
        for i in range(len(store)):
            value = ref_cache.get(store.pair_id(i))
            if value is not None:
                ref[i] = value
    return ref


def check_overlap(train: PairStore, evaluation: PairStore) -> None:
    """One ref_cache dict serves both splits, keyed by pair id: an id in both splits must
    be the same pair, else one of them would get the other's reference log-probs."""
    common, ti, ei = np.intersect1d(train.pair_ids, evaluation.pair_ids, return_indices=True)
    for k in range(len(common)):
        a, b = train.row(int(ti[k])), evaluation.row(int(ei[k]))
        if any(a[c] != b[c] for c in ID_COLUMNS):
            raise ValueError(
                f"pair id {a['pair_id']!r} names different pairs in train and eval data (two files "
                "with the same name?); reference log-probs are keyed by pair id. Rename one of "
                "the files"
            )
