"""Batch layouts for the chosen+rejected forward: padded, packed, prefix-shared.

DPO cost is forward/backward tokens. Three layouts behind one interface, all giving the
same per-pair sequence log-probs (docs/architecture.md, "Batch layouts", also for what
transformers does with these inputs and which models can be packed):

    padded         `padded.concat_pairs`: rows prompt+chosen and prompt+rejected, right
                   padding. Computes 2B * max_i(P_i + max(C_i, R_i)) positions.
    packed         padding-free: sequences (prompt+chosen or prompt+rejected) concatenated
                   into rows of up to `max_tokens_per_row` tokens; position ids restart at 0
                   for each sequence, attention stays inside each sequence. Computes
                   sum_i(2 P_i + C_i + R_i) positions plus the tail of each row.
    prefix_shared  one sequence per pair: prompt, chosen, rejected. Positions: prompt
                   0..P-1, chosen P..P+C-1, rejected P..P+R-1 (restart at P). Mask: causal
                   within prompt+chosen; rejected sees the prompt and earlier rejected
                   tokens, never chosen. Pair-sequences are packed into rows like `packed`.
                   Computes sum_i(P_i + C_i + R_i): the prompt is paid once, not twice.

Use:
    batch = build_batch(pairs, layout="packed", pad_token_id=pad, max_tokens_per_row=4096)
    out = model(**model_inputs(batch, attn_implementation=compat.attn_implementation(model.config),
                               dtype=model.dtype))
    chosen, rejected, n_chosen, n_rejected = pair_logps(out.logits, batch)

Targets are scored by explicit (predictor, target) index pairs instead of a shift by one:
in `prefix_shared` the first rejected token is predicted by the LAST PROMPT position, not
by the position before it in the row (the last chosen token).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import torch

from ray_dpo.batching.logps import token_logps
from ray_dpo.batching.padded import TokenPair, TokenCounts, check_pairs, concat_pairs
from ray_dpo.registry import Registry

# token_roles values
ROLE_PAD, ROLE_PROMPT, ROLE_CHOSEN, ROLE_REJECTED = -1, 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One micro-batch in some layout; R rows of T positions, B pairs.

    input_ids    [R, T] long   padding holds pad_token_id
    position_ids [R, T] long   per-sequence positions (padding: 0, 1, ... of its own run)
    segment_ids  [R, T] long   sequence number inside its row; -1 on padding
    token_roles  [R, T] int8   ROLE_PROMPT / ROLE_CHOSEN / ROLE_REJECTED / ROLE_PAD
    chosen_target, chosen_predictor, chosen_pair  [Kc] long
        per scored chosen token: flat index r*T+t of the token, flat index of the logits
        that predict it, and its pair index in 0..B-1 (order of `pairs`).
    rejected_target, rejected_predictor, rejected_pair  [Kr] long, likewise.
    """

    layout: str
    num_pairs: int
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    token_roles: torch.Tensor
    chosen_target: torch.Tensor
    chosen_predictor: torch.Tensor
    chosen_pair: torch.Tensor
    rejected_target: torch.Tensor
    rejected_predictor: torch.Tensor
    rejected_pair: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """Built on each access from segment_ids and token_roles.

        padded: [R, T] long, 1 on real tokens. packed / prefix_shared: [R, 1, T, T] bool,
        True where query t may attend key s: same sequence, s <= t, and not (query
        rejected, key chosen). A padding position attends only to itself, so no softmax
        row is empty (some kernels return NaN for one, and NaN * 0 poisons the backward).
        """
        real = self.token_roles != ROLE_PAD
        if LAYOUTS[self.layout].padded:
            return real.long()
        T = self.input_ids.shape[1]
        seg, role = self.segment_ids, self.token_roles
        causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
        same = (seg[:, :, None] == seg[:, None, :]) & real[:, :, None]
        crossing = (role[:, :, None] == ROLE_REJECTED) & (role[:, None, :] == ROLE_CHOSEN)
        pad_self = torch.diag_embed(~real)
        return ((same & causal & ~crossing) | pad_self).unsqueeze(1)

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


# --- building blocks ---------------------------------------------------------------------


class _Unit(NamedTuple):
    """One sequence to place in a row; targets/predictors are offsets inside the unit."""

    ids: list[int]
    positions: torch.Tensor
    roles: torch.Tensor
    chosen: tuple[torch.Tensor, torch.Tensor, int]  # (targets, predictors, pair index)
    rejected: tuple[torch.Tensor, torch.Tensor, int]


def _ids(pair: TokenPair, key: str) -> list[int]:
    return [int(t) for t in pair[key]]


def _no_targets() -> tuple[torch.Tensor, torch.Tensor, int]:
    empty = torch.zeros(0, dtype=torch.long)
    return empty, empty, 0


def _single_units(b: int, pair: TokenPair) -> list[_Unit]:
    """`packed`: prompt+chosen and prompt+rejected as two independent sequences."""
    prompt = _ids(pair, "prompt_ids")
    P = len(prompt)
    units = []
    for key, role in (("chosen_ids", ROLE_CHOSEN), ("rejected_ids", ROLE_REJECTED)):
        response = _ids(pair, key)
        n = P + len(response)
        targets = torch.arange(P, n)
        scored = (targets, targets - 1, b)
        roles = torch.full((n,), role, dtype=torch.int8)
        roles[:P] = ROLE_PROMPT
        chosen, rejected = (scored, _no_targets()) if role == ROLE_CHOSEN else (_no_targets(), scored)
        units.append(_Unit(prompt + response, torch.arange(n), roles, chosen, rejected))
    return units


def _prefix_units(b: int, pair: TokenPair) -> list[_Unit]:
    """`prefix_shared`: [prompt | chosen | rejected], rejected positions restart at P."""
    prompt, chosen, rejected = (_ids(pair, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    P, C, R = len(prompt), len(chosen), len(rejected)
    positions = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
    roles = torch.tensor([ROLE_PROMPT] * P + [ROLE_CHOSEN] * C + [ROLE_REJECTED] * R, dtype=torch.int8)
    chosen_targets = torch.arange(P, P + C)
    rejected_targets = torch.arange(P + C, P + C + R)
    # The first rejected token continues the prompt: its predictor is the last prompt
    # token, not the token before it in the row (the last chosen token).
    rejected_predictors = rejected_targets - 1
    rejected_predictors[0] = P - 1
    return [
        _Unit(
            prompt + chosen + rejected,
            positions,
            roles,
            (chosen_targets, chosen_targets - 1, b),
            (rejected_targets, rejected_predictors, b),
        )
    ]


def _assign_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, each row's total <= capacity.

    Deterministic (stable sort). A unit longer than `capacity` gets a row of its own (the
    row is then longer than capacity; never split, never dropped). None: a single row.
    """
    if capacity is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] = max(0, free[row] - lengths[i])
    return rows


def _pack_units(
    layout: str, num_pairs: int, units: list[_Unit], pad_token_id: int, capacity: int | None
) -> PackedBatch:
    rows = _assign_rows([len(u.ids) for u in units], capacity)
    T = max(sum(len(units[i].ids) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    token_roles = torch.full((R, T), ROLE_PAD, dtype=torch.int8)
    scored: dict[str, list[list[torch.Tensor]]] = {"chosen": [[], [], []], "rejected": [[], [], []]}
    for r, row in enumerate(rows):
        start = 0
        for seg, i in enumerate(row):
            unit, end = units[i], start + len(units[i].ids)
            input_ids[r, start:end] = torch.tensor(unit.ids, dtype=torch.long)
            position_ids[r, start:end] = unit.positions
            segment_ids[r, start:end] = seg
            token_roles[r, start:end] = unit.roles
            for name, (targets, predictors, b) in (("chosen", unit.chosen), ("rejected", unit.rejected)):
                base = r * T + start
                scored[name][0].append(targets + base)
                scored[name][1].append(predictors + base)
                scored[name][2].append(torch.full_like(targets, b))
            start = end
        # Tail padding: positions 0, 1, ... form one more "sequence", so flash varlen
        # (cu_seqlens from position restarts) never glues the pads onto a real sequence.
        position_ids[r, start:] = torch.arange(T - start)
    index = {
        f"{name}_{field}": torch.cat(parts)
        for name, lists in scored.items()
        for field, parts in zip(("target", "predictor", "pair"), lists)
    }
    return PackedBatch(
        layout=layout,
        num_pairs=num_pairs,
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        token_roles=token_roles,
        **index,
    )


def _build_padded(pairs: Sequence[TokenPair], pad_token_id: int, max_tokens_per_row: int | None) -> PackedBatch:
    del max_tokens_per_row  # one row per sequence
    padded = concat_pairs(pairs, pad_token_id)
    B, (N, T) = len(pairs), padded["input_ids"].shape
    real = padded["attention_mask"].bool()
    token_roles = torch.full((N, T), ROLE_PAD, dtype=torch.int8)
    token_roles[real] = ROLE_PROMPT
    token_roles[:B][padded["loss_mask"][:B]] = ROLE_CHOSEN
    token_roles[B:][padded["loss_mask"][B:]] = ROLE_REJECTED
    flat_targets = padded["loss_mask"].reshape(-1).nonzero().squeeze(-1)
    pair_of_token = (flat_targets // T) % B
    is_rejected = flat_targets // T >= B
    return PackedBatch(
        layout="padded",
        num_pairs=B,
        input_ids=padded["input_ids"],
        position_ids=torch.arange(T).expand(N, T).clone(),
        segment_ids=torch.where(real, 0, -1),
        token_roles=token_roles,
        chosen_target=flat_targets[~is_rejected],
        chosen_predictor=flat_targets[~is_rejected] - 1,
        chosen_pair=pair_of_token[~is_rejected],
        rejected_target=flat_targets[is_rejected],
        rejected_predictor=flat_targets[is_rejected] - 1,
        rejected_pair=pair_of_token[is_rejected],
    )


def _builder(make_units: Callable[[int, TokenPair], list[_Unit]], layout: str):
    def build(pairs: Sequence[TokenPair], pad_token_id: int, max_tokens_per_row: int | None) -> PackedBatch:
        units = [u for b, pair in enumerate(pairs) for u in make_units(b, pair)]
        return _pack_units(layout, len(pairs), units, pad_token_id, max_tokens_per_row)

    return build


class Layout(NamedTuple):
    """How one layout builds a batch, and what it costs (`budget.micro_batch_cost`)."""

    build: Callable[[Sequence[TokenPair], int, int | None], PackedBatch]
    pair_tokens: Callable[[int, int, int], int]  # (P, C, R) -> positions one pair needs
    padded: bool  # micro-batch cost is 2 * n * max(P + max(C, R)), not a sum
    needs_4d_mask: bool = False  # flash attention (which takes no 4D mask) cannot run it


LAYOUTS: Registry[Layout] = Registry("batch layout", {
    "padded": Layout(_build_padded, lambda P, C, R: P + max(C, R), padded=True),
    "packed": Layout(_builder(_single_units, "packed"), lambda P, C, R: 2 * P + C + R, padded=False),
    "prefix_shared": Layout(
        _builder(_prefix_units, "prefix_shared"), lambda P, C, R: P + C + R, padded=False, needs_4d_mask=True
    ),
}, plural="layouts")
"""Every layout policy.layout / reference.layout may name."""


def layout_names() -> list[str]:
    return LAYOUTS.names()


def layout_spec(name: str) -> Layout:
    """The Layout called `name`; ValueError naming the valid ones otherwise."""
    return LAYOUTS.get(name)


# --- public API ------------------------------------------------------------------------


def build_batch(
    pairs: Sequence[TokenPair], *, layout: str, pad_token_id: int, max_tokens_per_row: int | None = None
) -> PackedBatch:
    """B tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, all non-empty) -> one
    micro-batch in `layout` ("padded", "packed", "prefix_shared").

    max_tokens_per_row: row capacity for packed / prefix_shared (first-fit decreasing;
        a longer sequence gets a row of its own, T grows to fit it). None: one row.
        Ignored by padded (one row per sequence).
    """
    spec = layout_spec(layout)
    if max_tokens_per_row is not None and max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1 or None, got {max_tokens_per_row}")
    check_pairs(pairs, caller="build_batch")
    return spec.build(pairs, pad_token_id, max_tokens_per_row)


def model_inputs(
    batch: PackedBatch, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """kwargs for `model(**...)`: input_ids, position_ids and the attention mask in the form
    `attn_implementation` consumes (compat.attn_implementation(model.config)). dtype: the model's
    dtype (eager's additive mask must match it).

    padded: 2D [R, T] long mask (transformers builds causal + padding itself).
    sdpa:   4D [R, 1, T, T] bool, True = attend.
    eager:  4D [R, 1, T, T] float `dtype`, 0 = attend, finfo(dtype).min = masked.
    flash_attention_*: packed only; rows flattened to [1, R*T], no mask: transformers
        derives cu_seqlens from the restarting position_ids. The logits come back as
        [1, R*T, V]; `pair_logps` accepts them. GPU path: not testable on CPU CI.
    Always use_cache=False: a training/scoring forward needs no k/v cache, and a cache
    silently breaks position-id based packing (docs/architecture.md, "Batch layouts").
    """
    ids, pos = batch.input_ids, batch.position_ids
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    if LAYOUTS[batch.layout].padded:
        return {**inputs, "attention_mask": batch.attention_mask}
    if "flash" in attn_implementation:
        # GPU path: not testable on CPU CI.
        if LAYOUTS[batch.layout].needs_4d_mask:
            raise ValueError(
                f"layout {batch.layout!r} needs a 4D attention mask, which {attn_implementation} does not "
                "take; use attn_implementation='sdpa' or 'eager', or layout='packed'"
            )
        return {"input_ids": ids.reshape(1, -1), "position_ids": pos.reshape(1, -1), "use_cache": False}
    if attn_implementation == "sdpa":
        return {**inputs, "attention_mask": batch.attention_mask}
    if attn_implementation == "eager":
        attend = batch.attention_mask
        mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
        mask.masked_fill_(~attend, torch.finfo(dtype).min)
        return {**inputs, "attention_mask": mask}
    raise ValueError(
        f"attn_implementation {attn_implementation!r} is not supported for layout {batch.layout!r}; "
        "use 'sdpa', 'eager' or (packed only) 'flash_attention_2' / 'flash_attention_3'"
    )


def pair_logps(
    logits: torch.Tensor, batch: PackedBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair summed response log-probs from the logits of `model(**model_inputs(batch))`.

    logits: [R, T, V] (or [1, R*T, V] from the flash path), any float dtype.
    `batch` must be on the logits' device (`batch.to(device)`).
    Returns (chosen_logps [B] float32, rejected_logps [B] float32, nats;
             chosen_n_tokens [B] long, rejected_n_tokens [B] long), pairs in input order.
    """
    R, T = batch.input_ids.shape
    V = logits.shape[-1]
    if logits.numel() != R * T * V:
        raise ValueError(f"logits {tuple(logits.shape)} do not match the batch's [R, T] = [{R}, {T}]")
    flat_logits = logits.reshape(R * T, V)
    flat_ids = batch.input_ids.reshape(-1)
    predictors = torch.cat([batch.chosen_predictor, batch.rejected_predictor])
    targets = flat_ids[torch.cat([batch.chosen_target, batch.rejected_target])]
    scored = token_logps(flat_logits, predictors, targets)

    n_chosen = batch.chosen_target.numel()
    B = batch.num_pairs
    zeros = scored.new_zeros(B)
    chosen = zeros.index_add(0, batch.chosen_pair, scored[:n_chosen])
    rejected = zeros.index_add(0, batch.rejected_pair, scored[n_chosen:])
    return (
        chosen,
        rejected,
        torch.bincount(batch.chosen_pair, minlength=B),
        torch.bincount(batch.rejected_pair, minlength=B),
    )


def batch_stats(batch: PackedBatch) -> TokenCounts:
    """(real_tokens, computed positions R*T) of a batch; `.padding_fraction` for perf/."""
    return TokenCounts(int((batch.token_roles != ROLE_PAD).sum()), batch.input_ids.numel())
