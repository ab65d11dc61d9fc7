"""The weight-sync probe's log-probs: the policy computes them, and every generation
engine must reproduce them with the weights it was sent (engines/weight_sync.py checks the
difference; `online.weight_sync.random_probe` draws a probe).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ray_dpo.batching.logps import sequence_logps
from ray_dpo.batching.padded import padded_rows

# (prompt token ids, continuation token ids); the continuation is what gets scored.
ProbeItem = tuple[Sequence[int], Sequence[int]]
Probe = Sequence[ProbeItem]


def probe_batch(probe: Probe, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+continuation rows (`padded.padded_rows`): input_ids,
    attention_mask, and loss_mask True on the continuation tokens."""
    if not probe:
        raise ValueError("the probe is empty: pass at least one (prompt_ids, continuation_ids)")
    for i, (prompt, cont) in enumerate(probe):
        if not prompt or not cont:
            raise ValueError(f"probe item {i}: prompt and continuation must both be non-empty")
    return padded_rows([(list(prompt), list(cont)) for prompt, cont in probe], pad_token_id)


@torch.no_grad()  # not inference_mode: under ZeRO-3 the forward gathers parameters into
# tensors that training reuses, and inference tensors cannot be saved for backward
def torch_probe_logps(model: torch.nn.Module, probe: Probe, *, pad_token_id: int = 0) -> list[float]:
    """Summed log-probs (nats, float32) of each probe continuation under a HF causal LM.

    The policy side calls this (on every rank under ZeRO-3: the forward is collective)
    to get the values the engines must reproduce; TransformersEngine uses it too.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in probe_batch(probe, pad_token_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    return logps.cpu().tolist()
