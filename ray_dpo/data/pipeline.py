"""Ray Data pipeline: preference shards -> tokenized pair rows (CONTRACTS.md).

    expand_files(patterns)            files / directories / globs, local or s3:// gs://
         |                            (ray_dpo.data.files)
    from_items([{path}])              one input row (and block) per file
         | map_batches(read_file)     rows {file_index, line, source, raw}: JSONL line by
         |                            line (1-based line numbers; blank lines are not
         |                            rows), Parquet / JSON-array files record by record
         |                            (1-based record index as "line"; data.readers)
         | map_batches(tokenize_batch)  CPU tasks; the tokenizer is cached per worker
         |                            process; EVERY row comes out, with a status column
         |                            (data.tokenize_stage, data.tokenizer_cache)
    materialize()                     counters, fingerprint and token stats from small
         |                            summary columns (data.fingerprint), then keep ok +
         |                            truncated rows
    PairData(dataset, counters, num_pairs, fingerprint, name)

Rows stay in file order: the order of ``files``, then line order. Pair ids are
"<source>:<line>", source being the file's basename (or its path relative to the
files' common directory when two files share a basename).

Bad rows (malformed JSON, an unknown format, missing fields, ...) follow
``data.on_bad_row`` (decided by PairTokenizer): "skip" counts them (DataCounters.skipped,
with example reasons); "error" stops at the first one with
``DataError("<file>:<line>: <problem, how to fix>")``. Ray wraps exceptions raised in
data tasks; ``build_pair_data`` unwraps them (ray_dpo.data.errors) so the driver sees
the original message.

Ray Data 2.60 notes (measured): a dataset's DataContext is a copy of the global one
taken at creation and shared by datasets derived from it, so per-pipeline settings never
leak into other code; map stages with equal resources fuse into one task (a single big
file would then be tokenized by one task; data.readers.READ_NUM_CPUS keeps them apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from ray_dpo.data.counters import DataCounters
from ray_dpo.data.errors import DataError, unwrapped_errors
from ray_dpo.data.files import source_names
from ray_dpo.data.fingerprint import summarize
from ray_dpo.data.formats import PROMPT_ONLY_NEEDS_ONLINE
from ray_dpo.data.readers import READ_NUM_CPUS, read_file
from ray_dpo.data.schemas import HELPER_COLUMNS, KEPT_STATUSES
from ray_dpo.data.tokenize import PairTokenizer
from ray_dpo.data.tokenize_stage import tokenize_batch
from ray_dpo.data.tokenizer_cache import load_tokenizer, read_chat_template

if TYPE_CHECKING:  # ray_dpo.config imports torch (via losses); data tasks need neither
    from ray_dpo.config import DataConfig

_DATA_FIELDS = ("format", "max_length", "max_prompt_length", "over_length", "on_bad_row", "unpair")
"""The DataConfig fields the tokenize stage reads."""


def _keep_pairs(batch: pa.Table) -> pa.Table:
    """Stage UDF: the ok + truncated rows, as PAIR_SCHEMA rows."""
    mask = pc.is_in(batch.column("status"), value_set=pa.array(KEPT_STATUSES))
    return batch.filter(mask).drop_columns(HELPER_COLUMNS)


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
    refuse_prompt_only: Optional[str] = PROMPT_ONLY_NEEDS_ONLINE,
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
        refuse_prompt_only: why prompt-only rows (a prompt, no responses) cannot be used here
            and what to do, their bad-row message; None accepts them (online runs whose pair
            strategy makes both responses: ray_dpo.loss_rules.prompt_only_refusal). An
            accepted one is a row with empty chosen_ids / rejected_ids (CONTRACTS.md).
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
    template = read_chat_template(chat_template)
    # Fail fast on the driver: a bad tokenizer path or data config is one clear error
    # here instead of the same failure in every data task.
    PairTokenizer(load_tokenizer(tokenizer_path, template), data)

    # A plain namespace: unpickling a DataConfig in a data task would import
    # ray_dpo.config, hence torch, in every worker process.
    settings = SimpleNamespace(**{k: getattr(data, k) for k in _DATA_FIELDS}, unpaired=unpaired,
                               refuse_prompt_only=refuse_prompt_only)
    ds = _staged_dataset(files, tokenizer_path=tokenizer_path, template=template, settings=settings,
                         max_tokenize_tasks=max_tokenize_tasks)
    with unwrapped_errors():
        staged = ds.materialize()
        counters, fingerprint, token_stats = summarize(staged)
        pairs = staged.map_batches(_keep_pairs, batch_format="pyarrow").materialize()
    del staged
    return PairData(
        dataset=pairs, counters=counters, num_pairs=counters.kept, fingerprint=fingerprint,
        name=name, files=files, token_stats=token_stats,
    )


def _staged_dataset(files: list[str], *, tokenizer_path: str, template: Optional[str],
                    settings: SimpleNamespace, max_tokenize_tasks: Optional[int]) -> Any:
    """The lazy read -> tokenize dataset of ``files`` (STAGE_SCHEMA rows, file order)."""
    names = source_names(files)
    items = [{"path": f, "source": s, "file_index": i} for i, (f, s) in enumerate(zip(files, names))]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True  # this dataset's context copy only
    ds.context.raise_original_map_exception = True  # so unwrapped_errors finds the original error
    ds = ds.map_batches(read_file, batch_size=1, batch_format="pyarrow", num_cpus=READ_NUM_CPUS)
    return ds.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_path": tokenizer_path, "chat_template": template, "settings": settings},
        num_cpus=1,
        concurrency=max_tokenize_tasks,
    )
