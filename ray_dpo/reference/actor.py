"""ReferenceActor: one frozen copy of the reference model that scores tokenized pairs.

A plain class (no ray import): `ReferenceGroup` wraps it with ``ray.remote``, and tests
or a single-process debug run can use it directly.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Iterator, Mapping, Sequence

import torch

from ray_dpo import compat
from ray_dpo.batching.budget import micro_batch_cost
from ray_dpo.batching.layouts import LAYOUTS, build_batch, layout_names, model_inputs, pair_logps
from ray_dpo.dtypes import torch_dtype

logger = logging.getLogger("ray_dpo.reference")


def resolve_device(device: str) -> torch.device:
    """The torch device: cuda when asked for ("cuda" or "auto") and visible, else cpu."""
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")  # GPU path: not testable on CPU CI
    if device == "cuda":
        logger.warning("reference actor asked for cuda but none is visible; using cpu")
    return torch.device("cpu")


def _looks_local(model_path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name")."""
    return os.path.isabs(model_path) or model_path.startswith(("./", "../", "~"))


class ReferenceActor:
    """Holds a frozen causal LM and returns summed response log-probs of pairs.

    model_path: a directory (or hub id) for ``AutoModelForCausalLM.from_pretrained``.
    dtype: "fp32" | "bf16" | "fp16", the weights' dtype; log-probs are always float32.
    device: "cpu" | "cuda" | "auto"; cuda only if asked for and visible.
    micro_batch_size: at most this many pairs per forward (None: no limit).
    max_tokens_per_forward: at most this many computed positions per forward (None: no
        limit): padded 2 * pairs * T; packed / prefix_shared the sequences' tokens. The
        logits [positions, vocab] are the largest tensor, so this is the knob that bounds
        memory for long sequences and big vocabularies.
    A batch bigger than either limit is split; a single pair is never split.
    layout: "padded" | "packed" | "prefix_shared" (ray_dpo.batching.layouts): same log-probs, fewer
        computed positions; prefix_shared needs attn_implementation sdpa or eager.
    max_tokens_per_row: packed / prefix_shared row capacity (None: one row per forward, no
        padding at all; with sdpa/eager the dense mask then costs T x T for T = the forward's
        tokens, which max_tokens_per_forward bounds).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "fp32",
        device: str = "cpu",
        micro_batch_size: int | None = None,
        max_tokens_per_forward: int | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        layout: str = "padded",
        max_tokens_per_row: int | None = None,
    ):
        if layout not in layout_names():
            raise ValueError(f"layout must be one of {layout_names()}, got {layout!r}")
        model_dtype = torch_dtype(dtype)  # ValueError for an unknown dtype
        for name, value in (("micro_batch_size", micro_batch_size),
                            ("max_tokens_per_forward", max_tokens_per_forward),
                            ("max_tokens_per_row", max_tokens_per_row)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if _looks_local(model_path) and not os.path.exists(os.path.expanduser(model_path)):
            # Before importing transformers, whose message for this ("Repo id must be in
            # the form ...") hides the real problem: a path missing on this node.
            raise FileNotFoundError(
                f"reference model {model_path!r} does not exist on {socket.gethostname()}; "
                "on a multi-node cluster the model must be on shared storage or on every node"
            )
        from transformers import AutoModelForCausalLM  # heavy: only where the model lives

        self.device = resolve_device(device)
        self.dtype = dtype
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_forward = max_tokens_per_forward
        self.layout = layout
        self.max_tokens_per_row = max_tokens_per_row
        kwargs: dict[str, Any] = {"dtype": model_dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).to(self.device)
        self.model.eval()
        self.attn_implementation = compat.attn_implementation(self.model.config)
        if LAYOUTS[layout].needs_4d_mask and self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"layout {layout!r} needs attn_implementation 'sdpa' or 'eager' (a 4D mask), "
                             f"the reference model uses {self.attn_implementation!r}; use layout 'packed'")
        self.model.requires_grad_(False)
        # Padding sits behind the attention mask and outside the loss mask, so its id only
        # has to be a valid embedding row.
        pad = getattr(self.model.config, "pad_token_id", None)
        vocab = self.model.get_input_embeddings().num_embeddings
        self.pad_token_id = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
        # A new id per process: the group tells a restarted actor from a slow one by it.
        self.incarnation = uuid.uuid4().hex
        logger.info("reference actor ready: %s (%s on %s, pid %d)",
                    model_path, dtype, self.device, os.getpid())

    def ping(self) -> bool:
        return True

    def info(self) -> dict:
        """Who is serving: {"incarnation", "pid", "host", "device", "dtype", "torch_threads"}."""
        return {"incarnation": self.incarnation, "pid": os.getpid(), "host": socket.gethostname(),
                "device": str(self.device), "dtype": self.dtype, "torch_threads": torch.get_num_threads()}

    def log_probs(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
        """Reference log-probs of B tokenized pairs, in row order.

        rows: B mappings with prompt_ids, chosen_ids, rejected_ids (see CONTRACTS.md).
        Returns {"ref_chosen_logp": [B floats], "ref_rejected_logp": [B floats]}: summed
        log-probs (nats) of each response's tokens given the prompt, float32 precision.
        """
        chosen: list[float] = []
        rejected: list[float] = []
        for chunk in self._chunks(rows):
            c, r = self._forward(chunk)
            chosen += c.tolist()
            rejected += r.tolist()
        return {"ref_chosen_logp": chosen, "ref_rejected_logp": rejected}

    def log_probs_tagged(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, list[float]]]:
        """(incarnation, log_probs(rows)): lets the group notice restarts it did not see fail."""
        return self.incarnation, self.log_probs(rows)

    @torch.inference_mode()
    def _forward(self, pairs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over chosen+rejected of B pairs -> (chosen [B], rejected [B]) float32 cpu."""
        batch = build_batch(pairs, layout=self.layout, pad_token_id=self.pad_token_id,
                            max_tokens_per_row=self.max_tokens_per_row).to(self.device)
        logits = self.model(**model_inputs(batch, attn_implementation=self.attn_implementation,
                                           dtype=self.model.dtype)).logits
        chosen, rejected, _, _ = pair_logps(logits, batch)
        return chosen.cpu(), rejected.cpu()

    def _chunks(self, rows: Sequence[Mapping[str, Any]]) -> Iterator[list[Mapping[str, Any]]]:
        """Consecutive runs of rows that respect micro_batch_size and max_tokens_per_forward."""
        chunk: list[Mapping[str, Any]] = []
        for row in rows:
            too_many = self.micro_batch_size is not None and len(chunk) >= self.micro_batch_size
            too_long = (self.max_tokens_per_forward is not None
                        and micro_batch_cost(chunk + [row], layout=self.layout) > self.max_tokens_per_forward)
            if chunk and (too_many or too_long):
                yield chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield chunk
