"""Tokenize normalised preference pairs into the tokenized pair rows of CONTRACTS.md.

    raw row --normalize_row--> Pair --PairTokenizer--> {"pair_id", "prompt_ids",
                                                        "chosen_ids", "rejected_ids",
                                                        "truncated"}

Chat pairs: the prompt is ``apply_chat_template(prompt, add_generation_prompt=True)``;
a response is whatever the template adds after that string when the response messages
are appended (so role headers of the answer belong to the prompt, and the end-of-turn
marker belongs to the response). This needs a *prefix-stable* template: rendering
prompt+response must start with the rendered prompt. Templates that rewrite history
(e.g. strip reasoning from earlier turns) or whose generation prompt differs from the
assistant header they render raise ``ChatTemplateError``.

Text pairs: prompt tokens (with BOS when the tokenizer adds one), response tokens + EOS
(not added again when the response text already ends with the EOS token).

Every response ends with exactly one EOS unless it was truncated. Templates that emit
whitespace after their end-of-turn token (``"<|im_end|>\\n"``) get that tail cut, since
generation stops at EOS and never produces it.

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

Every result says why it is not "ok" with stable short keys (``TokenizeResult.causes``,
described in CAUSES) and carries the pair's token lengths before fitting, so
``DataCounters`` can report per-reason counts and length percentiles.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import jinja2

from ray_dpo.data.formats import FORMATS, BadRowError, Messages, Pair, normalize_row

OVER_LENGTH_POLICIES = ("truncate_prompt", "truncate_response", "drop")
BAD_ROW_POLICIES = ("error", "skip")
STATUSES = ("ok", "truncated", "dropped", "skipped")


CAUSES = {
    # truncated (a pair counts once under each kind of cut it got)
    "prompt_turns_dropped": "lost the start of the conversation (earliest turns dropped)",
    "prompt_message_cut": "had the oldest kept prompt message cut inside (its start removed)",
    "prompt_text_cut": "had a text prompt cut from the left",
    "response_cut": "had a response cut at max_length",
    # dropped (exactly one each)
    "over_length": "over max_prompt_length / max_length with over_length=drop",
    "prompt_over_limit": "prompt over max_prompt_length with over_length=truncate_response",
    "prompt_no_room": "system prompt + role headers + last user turn alone exceed max_prompt_length",
    "no_response_room": "prompt leaves no room for responses under max_length",
    "identical_responses": "chosen and rejected tokenize to the same ids",
    "identical_after_cut": "chosen and rejected became identical after cutting",
    # skipped (exactly one each)
    "bad_row": "malformed row (on_bad_row=skip)",
    "malformed_json": "line is not valid JSON (on_bad_row=skip)",
    "unreadable": "line could not be read, e.g. invalid UTF-8 (on_bad_row=skip)",
}
"""Stable short keys of why a pair was truncated / dropped / skipped -> what they mean.
They name the data/* metrics and the data report's per-reason counts."""


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be split into prompt and response.

    Not a bad row: it is a property of the template, so it is raised even with
    ``on_bad_row=skip``. Fix it with ``model.chat_template`` (a prefix-stable template).
    """


@dataclass(frozen=True)
class TokenizeResult:
    """Outcome of tokenizing one row.

    row: the tokenized pair row (CONTRACTS.md), or None when dropped / skipped.
    status: one of STATUSES. reason: why it was truncated / dropped / skipped ("" if ok),
    for people. causes: the same as stable keys of CAUSES (one for dropped / skipped, one
    per kind of cut for truncated). lengths: (prompt, longest response) tokens before
    fitting; None when the row never got tokenized (skipped). example: the row was an
    unpaired example (KTO), not a pair, even when it was dropped.
    """

    row: Optional[dict]
    status: str
    reason: str = ""
    causes: tuple[str, ...] = ()
    lengths: Optional[tuple[int, int]] = None
    example: bool = False


# --------------------------------------------------------------------------- length policy


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


# --------------------------------------------------------------------------- tokenizer


class PairTokenizer:
    """Callable that turns a ``Pair`` into a ``TokenizeResult``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow) with an EOS token; chat pairs
            also need a chat template.
        config: duck-typed data config with ``max_length``, ``max_prompt_length``,
            ``over_length``, ``on_bad_row`` and ``format`` (ray_dpo.config.DataConfig).
    """

    def __init__(self, tokenizer: Any, config: Any):
        _check_config(config)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one (responses must end with EOS)")
        self.tokenizer = tokenizer
        self.config = config
        self.eos_id: int = tokenizer.eos_token_id
        self._bos_prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []

    # ---- public

    def __call__(self, pair: Pair, *, source: str = "<unknown>", line: int = 0) -> TokenizeResult:
        """Tokenize one pair; ``row["pair_id"]`` is ``f"{source}:{line}"``. An unpaired
        example (``pair.label`` set) gives a row with its completion as both responses and
        a "label" column.

        Raises BadRowError when the chat template rejects the row's messages (e.g. a
        system turn the template does not support) and ChatTemplateError when the
        template is not prefix-stable.
        """
        result = self._tokenize(pair, source, line)
        return result if pair.label is None else dataclasses.replace(result, example=True)

    def _tokenize(self, pair: Pair, source: str, line: int) -> TokenizeResult:
        where = f"{source}:{line}"
        chat_fit = None
        if pair.is_chat:
            chat_fit, prompt, chosen, rejected = self._encode_chat(pair, source, line)
            raw_prompt = chat_fit.raw_length if chat_fit is not None else len(prompt)
        else:
            prompt, chosen, rejected = self._encode_text(pair)
            raw_prompt = len(prompt)
        lengths = (raw_prompt, max(len(chosen), len(rejected)))
        if chat_fit is not None and chat_fit.dropped:
            return TokenizeResult(None, "dropped", f"{where}: {chat_fit.note}", chat_fit.causes, lengths)
        fitted = fit_lengths(
            prompt, chosen, rejected,
            max_length=self.config.max_length,
            max_prompt_length=self.config.max_prompt_length,
            policy=self.config.over_length,
            bos_id=self._bos_prefix[0] if self._bos_prefix else None,
            same_response_ok=pair.label is not None,
        )
        if fitted.status == "dropped":
            return TokenizeResult(None, "dropped", f"{where}: {fitted.reason}", fitted.causes, lengths)
        status, reason, causes = fitted.status, fitted.reason, fitted.causes
        if chat_fit is not None and chat_fit.causes:
            status = "truncated"
            reason = "; ".join(r for r in (chat_fit.note, reason) if r)
            causes = chat_fit.causes + causes
        row = {
            "pair_id": where,
            "prompt_ids": fitted.prompt,
            "chosen_ids": fitted.chosen,
            "rejected_ids": fitted.rejected,
            "truncated": status == "truncated",
        }
        if pair.label is not None:
            row["label"] = pair.label
        return TokenizeResult(row, status, reason, causes, lengths)

    def tokenize_raw_row(self, raw_row: Any, *, source: str, line: int) -> TokenizeResult:
        """Normalise (``config.format``) and tokenize one raw row.

        A malformed row raises BadRowError with ``on_bad_row=error`` and returns status
        "skipped" (reason = the error message) with ``on_bad_row=skip``.
        """
        try:
            pair = normalize_row(raw_row, self.config.format, source=source, line=line)
            check_row_kind(pair, self.config, source=source, line=line)
            return self(pair, source=source, line=line)
        except BadRowError as err:
            if self.config.on_bad_row == "error":
                raise
            return TokenizeResult(None, "skipped", str(err), ("bad_row",))

    def encode_prompt(self, prompt: Any, *, source: str = "<unknown>", line: int = 0) -> list[int]:
        """Token ids of a prompt alone, exactly as pair rows start (for sampling from it).

        ``prompt``: a string, or chat messages (rendered with the generation prompt). A prompt
        over max_prompt_length is shortened as truncate_prompt does (whatever
        data.over_length says: a sampling prompt has to fit): chat prompts turn by turn
        (``fit_chat_prompt``), text prompts keep their last tokens (and a leading BOS).

        Raises BadRowError when a chat prompt cannot fit at all ("prompt_no_room").
        """
        limit = self.config.max_prompt_length
        if isinstance(prompt, str):
            ids = self._bos_prefix + self._ids([prompt])[0]
            return prompt_tail(ids, limit, self._bos_prefix[0] if self._bos_prefix else None)
        fit = self._fit_chat(tuple(prompt), source, line)
        if fit.dropped:
            raise BadRowError(source, line, fit.note)
        return fit.ids

    # ---- encoding

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # Special tokens come from the template (chat) or are added explicitly (text).
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode_text(self, pair: Pair) -> tuple[list[int], list[int], list[int]]:
        prompt, chosen, rejected = self._ids([pair.prompt, pair.chosen, pair.rejected])
        # A response that already ends with the EOS token keeps it, without a second one.
        return self._bos_prefix + prompt, self._end_with_eos(chosen), self._end_with_eos(rejected)

    def _encode_chat(self, pair: Pair, source: str, line: int):
        """(ChatFit or None, prompt, chosen, rejected); the prompt is fitted (truncate_prompt)."""
        prompt_messages = tuple(pair.prompt)
        if self.config.over_length == "truncate_prompt":
            fit = self._fit_chat(prompt_messages, source, line)
            if not fit.dropped:  # a dropped prompt still measures its responses (the report)
                prompt_messages = fit.messages
        else:
            fit = None
        prompt_text = self._render(prompt_messages, True, source, line)
        responses = [
            self._response_text(prompt_messages, response, prompt_text, source, line)
            for response in (pair.chosen, pair.rejected)
        ]
        if fit is not None and not fit.dropped:  # fit.ids are the ids of prompt_text already
            prompt = fit.ids
            chosen, rejected = self._ids(responses)
        else:
            prompt, chosen, rejected = self._ids([prompt_text, *responses])
        return fit, prompt, self._end_with_eos(chosen), self._end_with_eos(rejected)

    def _fit_chat(self, messages: Messages, source: str, line: int) -> ChatFit:
        """``fit_chat_prompt`` with this tokenizer and template."""

        def encode(msgs: Messages) -> list[int]:
            return self._ids([self._render(msgs, True, source, line)])[0]

        return fit_chat_prompt(messages, self.config.max_prompt_length, encode, self._token_starts)

    def _token_starts(self, text: str) -> list[int]:
        """Character offset where each token of ``text`` starts."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return [start for start, _ in enc["offset_mapping"]]
        # Slow tokenizers have no offsets: approximate them with decoded token lengths (the
        # cut is re-rendered and measured anyway, so a shifted cut never overflows).
        starts, at = [], 0
        for token in self._ids([text])[0]:
            starts.append(min(at, len(text)))
            at += len(self.tokenizer.decode([token]))
        return starts

    def _render(self, messages: Messages, add_generation_prompt: bool, source: str, line: int) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ChatTemplateError(
                "the tokenizer has no chat template but the data has chat messages; set "
                "model.chat_template to a Jinja template file, or use text (standard) rows"
            )
        try:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except jinja2.TemplateError as err:  # e.g. raise_exception("roles must alternate")
            raise BadRowError(source, line, f"the chat template rejected this row: {err}") from err

    def _response_text(self, prompt: Messages, response: Messages, prompt_text: str,
                       source: str, line: int) -> str:
        full = self._render(tuple(prompt) + tuple(response), False, source, line)
        if not full.startswith(prompt_text):
            at = next(
                (i for i, (a, b) in enumerate(zip(prompt_text, full)) if a != b),
                min(len(prompt_text), len(full)),
            )
            raise ChatTemplateError(
                "the chat template is not prefix-stable: rendering prompt+response does not "
                "start with the rendered prompt (add_generation_prompt=True); they differ at "
                f"character {at}: prompt has {prompt_text[at:at + 40]!r}, prompt+response has "
                f"{full[at:at + 40]!r}. Set model.chat_template to a template whose generation "
                "prompt equals the assistant header and that renders earlier turns unchanged"
            )
        return full[len(prompt_text):]

    def _end_with_eos(self, ids: list[int]) -> list[int]:
        if ids and ids[-1] == self.eos_id:
            return ids
        if self.eos_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.eos_id)
            tail = ids[last + 1:]
            if not self.tokenizer.decode(tail).strip():  # e.g. "<|im_end|>" + "\n"
                return ids[:last + 1]
        return ids + [self.eos_id]


def check_row_kind(pair: Pair, config: Any, *, source: str, line: int) -> None:
    """A pair where the loss trains on unpaired examples (``config.unpaired``, KTO) without
    ``config.unpair``, or an unpaired example where it trains on pairs, is a bad row."""
    unpaired = getattr(config, "unpaired", False)
    if pair.label is not None and not unpaired:
        raise BadRowError(source, line, "this row is an unpaired example (completion + label), but the loss "
                                        "trains on preference pairs; use loss.type=kto for labelled examples, "
                                        "or give the row prompt / chosen / rejected")
    if pair.label is None and unpaired and not getattr(config, "unpair", False):
        raise BadRowError(source, line, "this row is a preference pair, but loss.type=kto trains on unpaired "
                                        "examples; set data.unpair=true to split every pair into a desirable "
                                        "(chosen) and an undesirable (rejected) example, or give the row "
                                        "prompt / completion / label")


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS to plain text by itself (Llama does, GPT-2 not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def _check_config(config: Any) -> None:
    problems = []
    for name, valid in (("over_length", OVER_LENGTH_POLICIES), ("on_bad_row", BAD_ROW_POLICIES),
                        ("format", FORMATS)):
        if getattr(config, name, None) not in valid:
            problems.append(f"{name}={getattr(config, name, None)!r} (valid: {', '.join(valid)})")
    for name in ("max_length", "max_prompt_length"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or value <= 0:
            problems.append(f"{name}={value!r} (a positive integer)")
    if problems:
        raise ValueError("invalid data config for tokenization: " + "; ".join(problems))


# --------------------------------------------------------------------------- counters


_EXACT_BELOW = 128
_SUB_BUCKETS = 16  # per power of two above _EXACT_BELOW: values within 1/16 (6.25%)


def _bucket(value: int) -> int:
    if value < _EXACT_BELOW:
        return max(value, 0)
    exp = value.bit_length() - 1
    shift = exp - 4
    sub = (value >> shift) - _SUB_BUCKETS
    return _EXACT_BELOW + (exp - 7) * _SUB_BUCKETS + sub


def _bucket_upper(index: int) -> int:
    if index < _EXACT_BELOW:
        return index
    exp, sub = divmod(index - _EXACT_BELOW, _SUB_BUCKETS)
    shift = exp + 7 - 4
    return ((_SUB_BUCKETS + sub + 1) << shift) - 1


@dataclass
class LengthHistogram:
    """Token lengths in bounded, mergeable buckets: exact below 128, then 16 buckets per
    power of two (a bucket spans at most 6.25% of its values). Percentiles report the
    bucket's upper bound (never above the exact max), so they may overstate a length
    above 128 by at most 6.25%. A few hundred buckets at most, whatever the data size.

    counts: bucket index (a string, so JSON round-trips it) -> count.
    """

    counts: dict[str, int] = field(default_factory=dict)
    n: int = 0
    max: int = 0

    def add(self, value: int) -> None:
        key = str(_bucket(int(value)))
        self.counts[key] = self.counts.get(key, 0) + 1
        self.n += 1
        self.max = max(self.max, int(value))

    def merge(self, other: "LengthHistogram") -> "LengthHistogram":
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        self.n += other.n
        self.max = max(self.max, other.max)
        return self

    def percentile(self, q: float) -> int:
        """Nearest-rank q-th percentile (q in [0, 100]); 0 when empty."""
        if not self.n:
            return 0
        rank = max(1, -(-self.n * q // 100))  # ceil(n * q / 100)
        seen = 0
        for index in sorted(int(k) for k in self.counts):
            seen += self.counts[str(index)]
            if seen >= rank:
                return min(_bucket_upper(index), self.max)
        return self.max

    def summary(self) -> dict[str, int]:
        return {"p50": self.percentile(50), "p90": self.percentile(90),
                "p99": self.percentile(99), "max": self.max, "n": self.n}


LENGTHS = ("prompt", "response", "total")
"""Length histograms of DataCounters, before fitting: prompt tokens, the longer
response's tokens, and their sum (what max_length is compared with)."""


def _by_cause() -> dict[str, int]:
    return {}


@dataclass
class DataCounters:
    """What happened to the rows of a data stage. Pure: per-block counters are summed
    with ``merge``, so ``read == ok + truncated + dropped + skipped`` always holds.

    ``truncated_by`` / ``dropped_by`` / ``skipped_by``: rows per cause (keys of CAUSES).
    Each dropped / skipped row has exactly one cause, so ``sum(dropped_by.values()) ==
    dropped``; a truncated pair counts once under each kind of cut it got (prompt and
    response cut: both), so ``truncated_by`` may sum to more than ``truncated``.
    ``lengths``: LengthHistogram per LENGTHS entry, over every tokenized row (kept or
    dropped; skipped rows never got tokenized).
    ``skip_reasons`` / ``drop_reasons`` keep at most ``max_examples`` messages each.
    """

    read: int = 0
    ok: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    drop_reasons: list[str] = field(default_factory=list)
    max_examples: int = 5
    truncated_by: dict[str, int] = field(default_factory=_by_cause)
    dropped_by: dict[str, int] = field(default_factory=_by_cause)
    skipped_by: dict[str, int] = field(default_factory=_by_cause)
    lengths: dict[str, LengthHistogram] = field(
        default_factory=lambda: {name: LengthHistogram() for name in LENGTHS})

    @property
    def kept(self) -> int:
        """Rows that became training pairs (ok + truncated)."""
        return self.ok + self.truncated

    def add(self, result: TokenizeResult) -> "DataCounters":
        """Count one result (in place); returns self."""
        if result.status not in STATUSES:
            raise ValueError(f"unknown status {result.status!r}; valid: {', '.join(STATUSES)}")
        self.read += 1
        setattr(self, result.status, getattr(self, result.status) + 1)
        if result.status == "skipped":
            self._keep(self.skip_reasons, [result.reason])
        elif result.status == "dropped":
            self._keep(self.drop_reasons, [result.reason])
        by = {"truncated": self.truncated_by, "dropped": self.dropped_by,
              "skipped": self.skipped_by}.get(result.status)
        if by is not None:
            causes = result.causes or ("unspecified",)
            if result.status != "truncated":
                causes = causes[:1]  # exactly one cause per dropped / skipped row
            for cause in dict.fromkeys(causes):
                by[cause] = by.get(cause, 0) + 1
        if result.lengths is not None:
            prompt, response = result.lengths
            for name, value in zip(LENGTHS, (prompt, response, prompt + response)):
                self.lengths[name].add(value)
        return self

    def merge(self, other: "DataCounters") -> "DataCounters":
        """Add another stage's counts (in place); returns self, so it works with reduce."""
        for name in ("read", "ok", "truncated", "dropped", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._keep(self.skip_reasons, other.skip_reasons)
        self._keep(self.drop_reasons, other.drop_reasons)
        for name in ("truncated_by", "dropped_by", "skipped_by"):
            mine = getattr(self, name)
            for cause, count in getattr(other, name).items():
                mine[cause] = mine.get(cause, 0) + count
        for name, histogram in other.lengths.items():
            self.lengths.setdefault(name, LengthHistogram()).merge(histogram)
        return self

    def length_summary(self) -> dict[str, dict[str, int]]:
        """{"prompt" | "response" | "total": {"p50", "p90", "p99", "max", "n"}} in tokens,
        before fitting."""
        return {name: self.lengths[name].summary() for name in LENGTHS if name in self.lengths}

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataCounters":
        data = dict(data)
        if "lengths" in data:
            data["lengths"] = {name: h if isinstance(h, LengthHistogram) else LengthHistogram(**h)
                               for name, h in data["lengths"].items()}
        return cls(**data)

    def _keep(self, examples: list[str], new: list[str]) -> None:
        examples.extend(new[: max(0, self.max_examples - len(examples))])
