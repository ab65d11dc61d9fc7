"""Sequence log-probs from logits, and the padded chosen+rejected batch layout.

One forward pass scores both halves of every pair: rows 0..B-1 are prompt+chosen, rows
B..2B-1 prompt+rejected (see `concat_pairs`), so `split_pairs` on any per-row tensor gives
(chosen, rejected). Pure torch: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch


def concat_pairs(
    pairs: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch for ONE forward over the chosen and rejected halves of B pairs.

    pairs: B mappings with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists or 1-D
        arrays of ints). Prompts and responses must be non-empty: the first response
        token is scored by the logits of the last prompt token.
    pad_to_multiple_of: round T up to a multiple of this (friendlier kernel shapes).

    Returns
        input_ids      [2B, T] long  rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected
        attention_mask [2B, T] long  1 on real tokens, 0 on padding
        loss_mask      [2B, T] bool  True on response tokens (the positions scored)
    """
    if not pairs:
        raise ValueError("concat_pairs needs at least one pair")
    for i, pair in enumerate(pairs):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if len(pair[key]) == 0:
                where = pair.get("pair_id", f"index {i}")
                raise ValueError(f"pair {where}: {key} is empty; prompts and responses need >= 1 token")

    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    T = max(len(prompt) + len(response) for prompt, response in rows)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        n_p, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n_p] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[i, n_p:n] = torch.as_tensor(response, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, n_p:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the masked tokens of each sequence.

    logits [N, T, V] (any float dtype), input_ids [N, T], loss_mask [N, T] bool.
    logits[:, t] predicts input_ids[:, t+1], so token t is scored iff loss_mask[:, t] and
    t >= 1 (position 0 has no prediction; `concat_pairs` never masks it in).

    Returns (logps [N] float32, nats; n_tokens [N] long, the number of tokens scored).
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}; expected [N, T, V], [N, T], [N, T]"
        )
    mask = loss_mask[:, 1:].bool()
    # Padding may use an id outside the vocabulary (e.g. -100); never gather with it.
    targets = input_ids[:, 1:].masked_fill(~mask, 0)

    # log_softmax(x)[y] = x[y] - logsumexp(x), in float32. Row by row, so the float32
    # copy (for bf16 logits) and logsumexp's exp() temporary are one [T, V] row at a
    # time instead of the whole [N, T, V] batch: logits are the largest tensor in DPO.
    token_logps = []
    for row_logits, row_targets in zip(logits[:, :-1], targets):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        token_logps.append(picked - torch.logsumexp(row_logits, dim=-1))
    token_logps = torch.stack(token_logps)  # [N, T-1]

    logps = torch.where(mask, token_logps, 0.0).sum(-1)
    return logps, mask.sum(-1)


def mean_nll(logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean negative log-likelihood of each sequence, [N] -> [N] (nats/token).

    The SFT term of `losses.dpo_loss` (pass the chosen half). Empty sequences give 0.
    """
    return -logps / n_tokens.to(logps).clamp(min=1)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [2B, ...] in `concat_pairs` row order -> (chosen [B, ...], rejected [B, ...])."""
    if x.shape[0] % 2:
        raise ValueError(f"split_pairs needs an even leading dimension (2B), got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


class TokenCounts(NamedTuple):
    """Token counts of one padded batch, for throughput and padding-fraction metrics."""

    real_tokens: int  # positions holding a real (non-pad) token
    padded_positions: int  # all positions of the padded batch, N * T (real + pad)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_positions if self.padded_positions else 0.0


def batch_token_counts(batch: Mapping[str, torch.Tensor]) -> TokenCounts:
    """(real_tokens, padded_positions) of a batch with an `attention_mask` [N, T]."""
    attention_mask = batch["attention_mask"]
    return TokenCounts(int(attention_mask.sum()), attention_mask.numel())
