"""The right-padded chosen+rejected batch, and the pair check every layout runs first.

One forward pass scores both halves of every pair: rows 0..B-1 are prompt+chosen, rows
B..2B-1 prompt+rejected (see `concat_pairs`), so `split_pairs` on any per-row tensor gives
(chosen, rejected).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch

TokenPair = Mapping[str, Sequence[int]]
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


def check_pairs(pairs: Sequence[TokenPair], *, caller: str) -> None:
    """Raise ValueError unless there is at least one pair and every prompt and response is
    non-empty: the first response token is scored by the logits of the last prompt token.
    caller: the function named in the error when there are no pairs."""
    if not pairs:
        raise ValueError(f"{caller} needs at least one pair")
    for i, pair in enumerate(pairs):
        for key in PAIR_KEYS:
            if len(pair[key]) == 0:
                where = pair.get("pair_id", f"index {i}")
                raise ValueError(f"pair {where}: {key} is empty; prompts and responses need >= 1 token")


def padded_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch of (context, scored) rows, each row the context then the scored tokens.

    Returns
        input_ids      [N, T] long  padding holds pad_token_id
        attention_mask [N, T] long  1 on real tokens, 0 on padding
        loss_mask      [N, T] bool  True on the scored tokens (what `sequence_logps` sums)
    """
    T = max(len(context) + len(scored) for context, scored in rows)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (context, scored) in enumerate(rows):
        n_c, n = len(context), len(context) + len(scored)
        input_ids[i, :n_c] = torch.as_tensor(context, dtype=torch.long)
        input_ids[i, n_c:n] = torch.as_tensor(scored, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, n_c:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def concat_pairs(
    pairs: Sequence[TokenPair],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch for ONE forward over the chosen and rejected halves of B pairs.

    pairs: B mappings with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists or 1-D
        arrays of ints), all non-empty (`check_pairs`).
    pad_to_multiple_of: round T up to a multiple of this (friendlier kernel shapes).

    Returns `padded_rows` of [2B, T]: rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected,
    loss_mask True on the response tokens (the positions scored).
    """
    check_pairs(pairs, caller="concat_pairs")
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    return padded_rows(rows, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [2B, ...] in `concat_pairs` row order -> (chosen [B, ...], rejected [B, ...])."""
    if x.shape[0] % 2:
        raise ValueError(f"split_pairs needs an even leading dimension (2B), got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


class TokenCounts(NamedTuple):
    """Token counts of one batch, for throughput and padding-fraction metrics."""

    real_tokens: int  # positions holding a real (non-pad) token
    padded_positions: int  # all positions of the batch, N * T (real + pad)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_positions if self.padded_positions else 0.0
