"""Log-probs from logits: the one chunked log-softmax every scorer uses, and sums of it.

log_softmax(x)[y] = x[y] - logsumexp(x), taken in float32 on `LOGP_CHUNK_TOKENS` scored
tokens at a time: the float32 [chunk, V] copy of the logits (for bf16 logits) and
logsumexp's exp() temporary stay small, while the logits are the largest tensor in DPO.
"""

from __future__ import annotations

import torch

LOGP_CHUNK_TOKENS = 1024


def token_logps(flat_logits: torch.Tensor, predictors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[k] | logits row predictors[k]) for every scored token k, [K] float32.

    flat_logits [M, V] any float dtype; predictors [K] long, row indices into flat_logits;
    targets [K] long, token ids (only these are gathered: padding ids never are).
    """
    out = []
    for start in range(0, predictors.numel(), LOGP_CHUNK_TOKENS):
        rows = flat_logits[predictors[start : start + LOGP_CHUNK_TOKENS]].float()
        picked = rows.gather(-1, targets[start : start + LOGP_CHUNK_TOKENS, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out) if out else flat_logits.new_zeros(0, dtype=torch.float32)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the masked tokens of each sequence.

    logits [N, T, V] (any float dtype), input_ids [N, T], loss_mask [N, T] bool.
    logits[:, t] predicts input_ids[:, t+1], so token t is scored iff loss_mask[:, t] and
    t >= 1 (position 0 has no prediction; `padded.concat_pairs` never masks it in).

    Returns (logps [N] float32, nats; n_tokens [N] long, the number of tokens scored).
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}; expected [N, T, V], [N, T], [N, T]"
        )
    N, T, V = logits.shape
    mask = loss_mask[:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)  # token cols+1 of row `rows`, predicted at cols
    scored = token_logps(logits.reshape(N * T, V), rows * T + cols, input_ids[rows, cols + 1])
    per_position = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    logps = per_position.index_put((rows, cols), scored).sum(-1)
    return logps, mask.sum(-1)


def mean_nll(logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean negative log-likelihood of each sequence, [N] -> [N] (nats/token).

    The SFT term of `losses.dpo_loss` (pass the chosen half). Empty sequences give 0.
    """
    return -logps / n_tokens.to(logps).clamp(min=1)
