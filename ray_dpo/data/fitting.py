"""Length rules: fit one tokenized pair (or a chat prompt) to data.max_length /
data.max_prompt_length.

Length policy (``data.over_length``); both limits count tokens:
    truncate_prompt    a prompt longer than max_prompt_length is shortened, then
                       responses are cut from the right to max_length - len(prompt).
                       Chat prompts are shortened turn by turn (``fit_chat_prompt``): a
                       leading system message always stays; the earliest turns go first,
                       so the kept conversation starts with a user turn; the prompt is
                       re-rendered, so every kept message has its full role header. Only
                       when the last user turn (and what follows it) alone is too long is
                       that oldest kept message cut inside its content, from the left
                       (its end, closest to the answer, stays). If even the system prompt,
                       the role headers and one token of that message do not fit, the pair
                       is dropped ("prompt_no_room"). Text prompts keep their last
                       max_prompt_length tokens (a BOS the tokenizer adds stays in front,
                       in place of the oldest kept token: models degrade without it).
    truncate_response  the prompt is never cut: a prompt longer than max_prompt_length
                       drops the pair; responses are cut from the right to
                       max_length - len(prompt).
    drop               a pair over either limit is dropped, nothing is ever cut.
A pair whose responses tokenize identically, become identical after cutting, or have no
room left is dropped: identical responses give the DPO loss no gradient.

The keys of CAUSES (ray_dpo.data.counters) name what was cut or why a pair was dropped.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ray_dpo.data.formats import Messages

OVER_LENGTH_POLICIES = ("truncate_prompt", "truncate_response", "drop")


@dataclass(frozen=True)
class _Fitted:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    status: str  # "ok" | "truncated" | "dropped"
    reason: str = ""
    causes: tuple[str, ...] = ()  # keys of CAUSES


def _dropped(cause: str, reason: str) -> _Fitted:
    return _Fitted([], [], [], "dropped", reason, (cause,))


def fit_lengths(
    prompt: Sequence[int],
    chosen: Sequence[int],
    rejected: Sequence[int],
    *,
    max_length: int,
    max_prompt_length: int,
    policy: str,
    bos_id: Optional[int] = None,
    same_response_ok: bool = False,
) -> _Fitted:
    """Apply the over-length policy (module docstring) to one tokenized pair, cutting a
    too-long prompt as a text prompt (``prompt_tail``); chat prompts are fitted before
    (``PairTokenizer`` uses ``fit_chat_prompt``), so they arrive within max_prompt_length.

    ``bos_id``: when the prompt starts with it, left truncation keeps it as token 0.
    ``same_response_ok``: an unpaired example (its completion given as both responses).
    """
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    longest = max(len(chosen), len(rejected))
    prompt_over = len(prompt) > max_prompt_length
    total_over = len(prompt) + longest > max_length
    if chosen == rejected and not same_response_ok:  # e.g. texts that differ only in unknown words
        return _dropped("identical_responses", "chosen and rejected tokenize to the same ids")
    if not prompt_over and not total_over:
        return _Fitted(prompt, chosen, rejected, "ok")
    sizes = f"prompt {len(prompt)} + longest response {longest} tokens"
    if policy == "drop":
        return _dropped("over_length", (
            f"{sizes} exceeds max_prompt_length={max_prompt_length} / "
            f"max_length={max_length} (over_length=drop)"
        ))
    notes, causes = [], []
    if prompt_over:
        if policy == "truncate_response":
            return _dropped("prompt_over_limit", (
                f"prompt has {len(prompt)} tokens > max_prompt_length={max_prompt_length} "
                "and over_length=truncate_response never cuts prompts (use truncate_prompt)"
            ))
        notes.append(f"prompt cut from {len(prompt)} to {max_prompt_length}")
        causes.append("prompt_text_cut")
        prompt = prompt_tail(prompt, max_prompt_length, bos_id)
    budget = max_length - len(prompt)
    if budget <= 0:
        return _dropped("no_response_room", (
            f"prompt of {len(prompt)} tokens leaves no room for responses "
            f"under max_length={max_length}"
        ))
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if len(ids) > budget:
            notes.append(f"{name} cut from {len(ids)} to {budget}")
    if longest > budget:
        causes.append("response_cut")
    chosen, rejected = chosen[:budget], rejected[:budget]
    if chosen == rejected and not same_response_ok:
        return _dropped("identical_after_cut", (
            f"chosen and rejected are identical within the first {budget} response tokens"
        ))
    return _Fitted(prompt, chosen, rejected, "truncated" if notes else "ok", "; ".join(notes),
                   tuple(causes))


def prompt_tail(prompt: list[int], limit: int, bos_id: Optional[int]) -> list[int]:
    """The last ``limit`` tokens of a prompt (the end is closest to the answer); a leading BOS
    stays in front, in place of the oldest kept token. Shorter prompts come back as they are."""
    if len(prompt) <= limit:
        return prompt
    if bos_id is not None and prompt[0] == bos_id and limit > 1:
        return prompt[:1] + prompt[len(prompt) - limit + 1:]
    return prompt[-limit:]


@dataclass(frozen=True)
class ChatFit:
    """A chat prompt fitted to max_prompt_length (``fit_chat_prompt``).

    messages / ids: the kept messages and their rendered token ids (empty when dropped).
    causes: () when it fit as it was; "prompt_turns_dropped" and / or "prompt_message_cut";
    ("prompt_no_room",) when it cannot fit at all. note: what happened, for people.
    """

    messages: Messages
    ids: list[int]
    causes: tuple[str, ...] = ()
    note: str = ""
    raw_length: int = 0  # tokens of the prompt as given, before fitting

    @property
    def dropped(self) -> bool:
        return self.causes == ("prompt_no_room",)


def fit_chat_prompt(
    messages: Messages,
    limit: int,
    encode: Callable[[Messages], list[int]],
    token_starts: Callable[[str], list[int]],
) -> ChatFit:
    """Shorten a chat prompt to at most ``limit`` tokens without breaking its structure.

    1. A leading system message always stays.
    2. Whole earliest turns are dropped, the kept conversation starting at a user turn
       (templates that require user/assistant alternation still render it); the fewest
       turns that make the prompt fit are dropped.
    3. If it still does not fit from the last user turn on, the oldest kept message
       after the system message is cut inside its content, from the left: the end of
       the message stays and the template renders its role header as usual.
    4. If not even one token of that content fits, the prompt cannot fit: ("prompt_no_room",).

    ``encode(messages)``: token ids of the rendered prompt (with the generation prompt).
    ``token_starts(text)``: character offset where each token of ``text`` starts.
    Lengths are measured on the re-rendered prompt, so tokens merging across a cut
    never make it overflow.
    """
    messages = tuple(messages)
    ids = encode(messages)
    if len(ids) <= limit:
        return ChatFit(messages, ids, raw_length=len(ids))
    head = messages[:1] if messages and messages[0]["role"] == "system" else ()
    body = messages[len(head):]
    total = len(ids)
    starts = [i for i, m in enumerate(body) if i > 0 and m["role"] == "user"]
    # Dropping more turns never makes the prompt longer: the fewest that make it fit.
    best = _fitting_extreme(0, len(starts) - 1, lambda k: encode(head + body[starts[k]:]), limit, lowest=True)
    if best is not None:
        start, kept_ids = starts[best[0]], best[1]
        after = " after the system prompt" if head else ""
        return ChatFit(head + body[start:], kept_ids, ("prompt_turns_dropped",),
                       f"prompt: dropped the first {start} of {len(body)} turns{after} "
                       f"({total} -> {len(kept_ids)} tokens)", total)
    if not body:  # a system message alone: nothing may be cut
        return ChatFit((), [], ("prompt_no_room",), (
            f"the system prompt alone renders to {total} tokens > max_prompt_length={limit}; "
            "shorten it or raise data.max_prompt_length"), total)
    return _cut_oldest_message(head, body, starts[-1] if starts else 0, limit, encode, token_starts, total)


def _cut_oldest_message(head: Messages, body: Messages, start: int, limit: int,
                        encode: Callable[[Messages], list[int]], token_starts: Callable[[str], list[int]],
                        total: int) -> ChatFit:
    """Step 3-4 of fit_chat_prompt: keep the conversation from ``body[start]`` on and cut that
    message's content from the left to the most tokens that fit."""
    causes = ("prompt_turns_dropped",) if start else ()
    oldest = body[start]
    content = oldest["content"]
    offsets = token_starts(content)

    def with_tail(n: int) -> Messages:  # the oldest kept message keeps its last n tokens
        tail = content[offsets[len(offsets) - n]:].lstrip() if n < len(offsets) else content
        return head + ({**oldest, "content": tail},) + body[start + 1:]

    best = _fitting_extreme(1, len(offsets) - 1, lambda n: encode(with_tail(n)), limit, lowest=False)
    if best is None:
        return ChatFit((), [], ("prompt_no_room",), (
            f"prompt of {total} tokens cannot fit max_prompt_length={limit}: the system prompt, "
            f"role headers and one token of the last {oldest['role']} turn"
            + (" (and what follows it)" if start + 1 < len(body) else "")
            + " already exceed it; shorten the system prompt or raise data.max_prompt_length"), total)
    n, kept_ids = best
    dropped = f"dropped the first {start} turns, " if start else ""
    return ChatFit(with_tail(n), kept_ids, causes + ("prompt_message_cut",),
                   f"prompt: {dropped}cut the {oldest['role']} message to its last {n} of "
                   f"{len(offsets)} tokens ({total} -> {len(kept_ids)} tokens)", total)


def _fitting_extreme(lo: int, hi: int, encode_at: Callable[[int], list[int]], limit: int, *,
                     lowest: bool) -> Optional[tuple[int, list[int]]]:
    """Binary search of lo..hi for the lowest (``lowest``) or highest index whose encoding has
    at most ``limit`` tokens, fitting being monotone in the index: (index, ids) or None."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = encode_at(mid)
        fits = len(ids) <= limit
        if fits:
            best = (mid, ids)
        if fits == lowest:
            hi = mid - 1
        else:
            lo = mid + 1
    return best
