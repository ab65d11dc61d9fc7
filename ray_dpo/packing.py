"""Batch layouts for the chosen+rejected forward: padded, packed, prefix-shared.

DPO cost is forward/backward tokens. Three layouts behind one interface, all giving the
same per-pair sequence log-probs (docs/architecture.md, "Batch layouts"):

    padded         `logprobs.concat_pairs`: rows prompt+chosen and prompt+rejected, right
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
    out = model(**model_inputs(batch, attn_implementation=model.config._attn_implementation,
                               dtype=model.dtype))
    chosen, rejected, n_chosen, n_rejected = pair_logps(out.logits, batch)

Targets are scored by explicit (predictor, target) index pairs instead of a shift by one:
in `prefix_shared` the first rejected token is predicted by the LAST PROMPT position, not
by the position before it in the row (the last chosen token).

What transformers 5.19 does with our inputs (read in masking_utils.py,
models/llama/modeling_llama.py, integrations/sdpa_attention.py,
modeling_flash_attention_utils.py; the tests pin the CPU behaviour):

* `LlamaModel.forward` uses `position_ids` as given (only to compute RoPE cos/sin, and
  for mask creation); it builds `arange(T)` only when they are None.
* `create_causal_mask` -> `_preprocess_mask_arguments`: a Tensor (or flex BlockMask) with
  4 dims is returned AS IS. No dtype conversion, no causal AND, no padding AND, no shape
  check. The 4D mask must therefore be complete (causal + block-diagonal + prefix rule +
  padding), shaped [R, 1, T, T] (broadcast over heads), in the format the kernel eats:
    - eager: `attn_weights + attention_mask`, an ADDITIVE float mask: 0.0 where attended,
      `torch.finfo(dtype).min` where not, dtype = the model's dtype. A bool mask is NOT
      rejected: it is added as 0/1 and silently gives wrong results.
    - sdpa: passed unchanged to `F.scaled_dot_product_attention(attn_mask=...)`: bool with
      True = attend (what `sdpa_mask` itself builds), or a float additive mask of exactly
      the query dtype (float64/long/bf16-with-fp32-queries raise). With any mask, sdpa runs
      with is_causal=False and GQA repeats k/v (`enable_gqa` is only used without a mask).
    - flash_attention_2/3: no 4D masks. The padding-free path is attention_mask=None,
      batch size 1 and position_ids restarting at 0: `_is_packed_sequence` detects it and
      `prepare_fa_kwargs_from_position_ids` builds cu_seqlens from the positions equal to
      position_ids.min(), then calls flash_varlen_fn. `model_inputs` flattens the rows to
      [1, R*T] for it. GPU path: not testable on CPU CI.
    - flex_attention: a 4D tensor is added to the scores in score_mod (additive float);
      not wired here.
* Implicit packing: with attention_mask=None and past_key_values=None,
  `create_causal_mask` calls `find_packed_sequence_indices(position_ids)` (a new sequence
  wherever consecutive positions do not differ by exactly 1) and ANDs a block-diagonal mask
  into the causal one, for sdpa and eager too. TRAP: `LlamaModel.forward` creates a
  DynamicCache whenever use_cache is truthy, and `config.use_cache` defaults to True, in
  train() mode too; the cache then disables the detection and the sequences of a row
  SILENTLY attend to each other (plain causal mask). So `model_inputs` always passes
  use_cache=False (it also saves the k/v copies a training forward never reads), and on
  sdpa/eager always the explicit 4D mask: `prefix_shared` could not use the implicit route
  anyway (rejected restarts at P and would be cut off from its prompt). The tests pin both
  behaviours.

Caveats:
* Only models whose positions come from `position_ids` (RoPE, learned absolute) can be
  packed. Models that derive positions from the attention mask or a cache (ALiBi/BLOOM-
  style, some remote-code models), or use 3-D multimodal RoPE positions, silently compute
  the wrong thing; compare against `padded` once when adding a model family.
* A custom 4D mask also reaches sliding-window layers unchanged
  (`create_sliding_window_causal_mask` returns it as is): the window is NOT applied.
  Sequences longer than the window (Mistral, Qwen2 sliding, Gemma 2/3 local layers) then
  differ from `padded`.
* sdpa/eager with a dense mask still compute all T x T scores of a row: packing removes
  padding from the linear layers and the logits, but attention FLOPs grow with the row
  length squared, and the mask costs R*T*T bytes (bool). Keep rows near the longest
  sequence (a few thousand tokens). Only flash varlen skips cross-sequence blocks.
* `prefix_shared` needs a 4D mask: sdpa or eager (or a flex BlockMask, not wired here).

Pure torch: imports neither ray, deepspeed, vllm nor transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from ray_dpo.logprobs import TokenCounts, concat_pairs
from ray_dpo.registry import Registry

Pair = Mapping[str, Sequence[int]]

# token_roles values
ROLE_PAD, ROLE_PROMPT, ROLE_CHOSEN, ROLE_REJECTED = -1, 0, 1, 2

# Log-softmax is taken over this many scored tokens at a time: the float32 [chunk, V] copy
# of the logits is the peak temporary (logits are the largest tensor in DPO).
LOGP_CHUNK_TOKENS = 1024


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


def _ids(pair: Pair, key: str) -> list[int]:
    return [int(t) for t in pair[key]]


def _lengths(pair: Pair) -> tuple[int, int, int]:
    return len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])


def _check_pairs(pairs: Sequence[Pair]) -> None:
    if not pairs:
        raise ValueError("build_batch needs at least one pair")
    for i, pair in enumerate(pairs):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if len(pair[key]) == 0:
                where = pair.get("pair_id", f"index {i}")
                raise ValueError(f"pair {where}: {key} is empty; prompts and responses need >= 1 token")


def _no_targets() -> tuple[torch.Tensor, torch.Tensor, int]:
    empty = torch.zeros(0, dtype=torch.long)
    return empty, empty, 0


def _single_units(b: int, pair: Pair) -> list[_Unit]:
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


def _prefix_units(b: int, pair: Pair) -> list[_Unit]:
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


def _build_padded(pairs: Sequence[Pair], pad_token_id: int, max_tokens_per_row: int | None) -> PackedBatch:
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


def _builder(make_units: Callable[[int, Pair], list[_Unit]], layout: str):
    def build(pairs: Sequence[Pair], pad_token_id: int, max_tokens_per_row: int | None) -> PackedBatch:
        units = [u for b, pair in enumerate(pairs) for u in make_units(b, pair)]
        return _pack_units(layout, len(pairs), units, pad_token_id, max_tokens_per_row)

    return build


class _Layout(NamedTuple):
    build: Callable[[Sequence[Pair], int, int | None], PackedBatch]
    pair_tokens: Callable[[int, int, int], int]  # (P, C, R) -> positions one pair needs
    padded: bool  # micro-batch cost is 2 * n * max(P + max(C, R)), not a sum
    needs_4d_mask: bool = False  # flash attention (which takes no 4D mask) cannot run it


LAYOUTS: Registry[_Layout] = Registry("batch layout", {
    "padded": _Layout(_build_padded, lambda P, C, R: P + max(C, R), padded=True),
    "packed": _Layout(_builder(_single_units, "packed"), lambda P, C, R: 2 * P + C + R, padded=False),
    "prefix_shared": _Layout(
        _builder(_prefix_units, "prefix_shared"), lambda P, C, R: P + C + R, padded=False, needs_4d_mask=True
    ),
}, plural="layouts")
"""Every layout policy.layout / reference.layout may name."""


def layout_names() -> list[str]:
    return LAYOUTS.names()


def _layout(name: str) -> _Layout:
    return LAYOUTS.get(name)


# --- public API ------------------------------------------------------------------------


def build_batch(
    pairs: Sequence[Pair], *, layout: str, pad_token_id: int, max_tokens_per_row: int | None = None
) -> PackedBatch:
    """B tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, all non-empty) -> one
    micro-batch in `layout` ("padded", "packed", "prefix_shared").

    max_tokens_per_row: row capacity for packed / prefix_shared (first-fit decreasing;
        a longer sequence gets a row of its own, T grows to fit it). None: one row.
        Ignored by padded (one row per sequence).
    """
    spec = _layout(layout)
    if max_tokens_per_row is not None and max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1 or None, got {max_tokens_per_row}")
    _check_pairs(pairs)
    return spec.build(pairs, pad_token_id, max_tokens_per_row)


def model_inputs(
    batch: PackedBatch, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """kwargs for `model(**...)`: input_ids, position_ids and the attention mask in the form
    `attn_implementation` consumes (model.config._attn_implementation). dtype: the model's
    dtype (eager's additive mask must match it).

    padded: 2D [R, T] long mask (transformers builds causal + padding itself).
    sdpa:   4D [R, 1, T, T] bool, True = attend.
    eager:  4D [R, 1, T, T] float `dtype`, 0 = attend, finfo(dtype).min = masked.
    flash_attention_*: packed only; rows flattened to [1, R*T], no mask: transformers
        derives cu_seqlens from the restarting position_ids. The logits come back as
        [1, R*T, V]; `pair_logps` accepts them. GPU path: not testable on CPU CI.
    Always use_cache=False: a training/scoring forward needs no k/v cache (see the module
    docstring for how a cache breaks position-id based packing).
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

    # log_softmax(x)[y] = x[y] - logsumexp(x), float32, a chunk of scored tokens at a time.
    token_logps = []
    for start in range(0, predictors.numel(), LOGP_CHUNK_TOKENS):
        rows = flat_logits[predictors[start : start + LOGP_CHUNK_TOKENS]].float()
        picked = rows.gather(-1, targets[start : start + LOGP_CHUNK_TOKENS, None]).squeeze(-1)
        token_logps.append(picked - torch.logsumexp(rows, dim=-1))
    token_logps = torch.cat(token_logps) if token_logps else flat_logits.new_zeros(0, dtype=torch.float32)

    n_chosen = batch.chosen_target.numel()
    B = batch.num_pairs
    zeros = token_logps.new_zeros(B)
    chosen = zeros.index_add(0, batch.chosen_pair, token_logps[:n_chosen])
    rejected = zeros.index_add(0, batch.rejected_pair, token_logps[n_chosen:])
    return (
        chosen,
        rejected,
        torch.bincount(batch.chosen_pair, minlength=B),
        torch.bincount(batch.rejected_pair, minlength=B),
    )


def batch_stats(batch: PackedBatch) -> TokenCounts:
    """(real_tokens, computed positions R*T) of a batch; `.padding_fraction` for perf/."""
    return TokenCounts(int((batch.token_roles != ROLE_PAD).sum()), batch.input_ids.numel())


# --- token-budget batching ---------------------------------------------------------------


class TokenBudgetPlan(NamedTuple):
    micro_batches: list[list[Pair]]  # every pair exactly once, input order kept
    oversized: list[int]  # indices of micro-batches holding ONE pair over the budget


def micro_batch_cost(pairs: Sequence[Pair], *, layout: str) -> int:
    """Positions `build_batch(pairs, layout=...)` computes (packed / prefix_shared: real
    tokens, i.e. one row when max_tokens_per_row >= the cost)."""
    spec = _layout(layout)
    sizes = [spec.pair_tokens(*_lengths(p)) for p in pairs]
    if spec.padded:
        return 2 * len(sizes) * max(sizes, default=0)
    return sum(sizes)


def token_budget_micro_batches(pairs: Sequence[Pair], *, max_tokens: int, layout: str) -> TokenBudgetPlan:
    """Greedy, order-stable split of `pairs` into micro-batches of <= max_tokens computed
    positions each (cost model of `micro_batch_cost`). A pair is never split; a pair over
    the budget on its own gets a micro-batch of its own and is listed in `oversized`."""
    spec = _layout(layout)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[Pair]] = []
    oversized: list[int] = []
    current: list[Pair] = []
    total = widest = 0
    for pair in pairs:
        size = spec.pair_tokens(*_lengths(pair))
        new_total, new_widest = total + size, max(widest, size)
        cost = 2 * (len(current) + 1) * new_widest if spec.padded else new_total
        if current and cost > max_tokens:
            batches.append(current)
            current, new_total, new_widest = [], size, size
            cost = 2 * size if spec.padded else size
        current.append(pair)
        total, widest = new_total, new_widest
        if cost > max_tokens:  # alone and still over budget
            oversized.append(len(batches))
            batches.append(current)
            current, total, widest = [], 0, 0
    if current:
        batches.append(current)
    return TokenBudgetPlan(batches, oversized)
