"""Unpaired examples for KTO: unpairing pairs and the mismatched (KL) completions.

A KTO row has the tokenized pair row's columns (CONTRACTS.md) with a different meaning:

    prompt_ids    the prompt x
    chosen_ids    the labelled completion y
    rejected_ids  a completion y' of ANOTHER prompt in the same block, cut to fit after x:
                  the mismatched pair (x, y') whose log-ratio estimates KTO's z_ref
    label         True = desirable, False = undesirable

so one concatenated forward gives log π(y|x) and log π(y'|x), and the reference actors, the
cache, the feeder and every batch layout serve KTO rows unchanged. TRL forms its KL pairs
the same way (completions shifted by one within a batch of the dataset map).

Rows come from the unpaired formats (ray_dpo.data.formats: ``unpaired``, ``sharegpt_kto``)
or, with ``data.unpair``, from preference pairs: each pair becomes two examples, chosen
desirable (pair id ``<file>:<line>/chosen``) and rejected undesirable (``.../rejected``);
in the data report such a pair counts as two rows, whatever its status.

The mismatch is taken within one tokenize block (consecutive rows of one file, at most
data.readers.READ_CHUNK_ROWS), in row order, so it is deterministic and the reference
cache stays valid.
A block in which every kept example has the same prompt has nothing to mismatch with: its
examples keep their own completion as y' (the estimate is then the matched log-ratio).

Pure: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses

from ray_dpo.data.counters import TokenizeResult

UNPAIRED_SUFFIXES = ("/chosen", "/rejected")
_LOOKAHEAD = 64  # rows searched for a different prompt before giving up on a mismatch


def unpair(result: TokenizeResult) -> list[TokenizeResult]:
    """One pair's result -> its two examples' results (chosen desirable, rejected
    undesirable). A dropped or skipped pair gives two results of that status."""
    if result.row is None:
        return [result, result]
    row = result.row
    out = []
    for suffix, ids, label in zip(UNPAIRED_SUFFIXES, (row["chosen_ids"], row["rejected_ids"]), (True, False)):
        example = {**row, "pair_id": row["pair_id"] + suffix, "chosen_ids": list(ids),
                   "rejected_ids": list(ids), "label": label}
        out.append(dataclasses.replace(result, row=example))
    return out


def mismatched_index(prompts: list[list[int]], j: int) -> int:
    """A row after j (cyclically, at most _LOOKAHEAD on) whose prompt differs from row j's;
    j itself when there is none. Within a run of rows sharing a prompt (an unpaired pair:
    chosen, then rejected) the i-th row takes the i-th row of the next run when it has one,
    so desirable and undesirable completions both serve as KL samples."""
    n = len(prompts)
    offset = 0
    while offset < min(j, _LOOKAHEAD) and prompts[j - offset - 1] == prompts[j]:
        offset += 1
    for step in range(1, min(n, _LOOKAHEAD + 1)):
        k = (j + step) % n
        if prompts[k] != prompts[j]:
            shifted = (k + offset) % n
            same_run = all(prompts[(k + i) % n] == prompts[k] for i in range(1, offset + 1))
            return shifted if same_run and shifted != j else k
    return j


def assign_kl_completions(rows: list[dict], *, max_length: int) -> None:
    """Set each example row's rejected_ids (in place) to the completion of the next row with
    another prompt, cut so that prompt + y' fits max_length (never below one token)."""
    prompts = [r["prompt_ids"] for r in rows]
    completions = [list(r["chosen_ids"]) for r in rows]
    for j, row in enumerate(rows):
        other = completions[mismatched_index(prompts, j)]
        room = max(max_length - len(row["prompt_ids"]), 1)
        row["rejected_ids"] = other[:room]


def example_results(results: list[TokenizeResult], *, unpair_pairs: bool,
                    max_length: int) -> list[tuple[int, TokenizeResult]]:
    """A tokenize block's results as (index into ``results``, example result): pairs
    unpaired (``unpair_pairs``; a pair counts as two rows, a skipped row, never tokenized,
    as one), then every kept example given its mismatched completion
    (``assign_kl_completions``)."""
    out: list[tuple[int, TokenizeResult]] = []
    for i, result in enumerate(results):
        is_pair = not result.example and result.status != "skipped"
        out += [(i, r) for r in (unpair(result) if unpair_pairs and is_pair else [result])]
    assign_kl_completions([r.row for _, r in out if r.row is not None], max_length=max_length)
    return out
