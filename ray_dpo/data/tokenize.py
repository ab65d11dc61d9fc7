"""Tokenize normalised preference pairs into the tokenized pair rows of CONTRACTS.md.

    raw row --normalize_row--> NormalizedPair --PairTokenizer--> {"pair_id", "prompt_ids",
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

Prompt-only rows (online DPO) give the prompt's ids as a pair would have them and empty
``chosen_ids`` / ``rejected_ids``; a run whose settings carry ``refuse_prompt_only`` (a
message; by default ``PROMPT_ONLY_NEEDS_ONLINE``) refuses them as bad rows with it.

Every response ends with exactly one EOS unless it was truncated. Templates that emit
whitespace after their end-of-turn token (``"<|im_end|>\\n"``) get that tail cut, since
generation stops at EOS and never produces it.

The length rules (``data.over_length``) are in ray_dpo.data.fitting; what became of each
row (status, causes, lengths before fitting) in ray_dpo.data.counters.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jinja2

from ray_dpo.data.counters import TokenizeResult
from ray_dpo.data.fitting import OVER_LENGTH_POLICIES, ChatFit, fit_chat_prompt, fit_lengths, prompt_tail
from ray_dpo.data.formats import FORMATS, PROMPT_ONLY_NEEDS_ONLINE, BadRowError, Messages, NormalizedPair, normalize_row

BAD_ROW_POLICIES = ("error", "skip")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be split into prompt and response.

    Not a bad row: it is a property of the template, so it is raised even with
    ``on_bad_row=skip``. Fix it with ``model.chat_template`` (a prefix-stable template).
    """


class PairTokenizer:
    """Callable that turns a ``NormalizedPair`` into a ``TokenizeResult``.

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

    def __call__(self, pair: NormalizedPair, *, source: str = "<unknown>", line: int = 0) -> TokenizeResult:
        """Tokenize one pair; ``row["pair_id"]`` is ``f"{source}:{line}"``. An unpaired
        example (``pair.label`` set) gives a row with its completion as both responses and
        a "label" column.

        Raises BadRowError when the chat template rejects the row's messages (e.g. a
        system turn the template does not support) and ChatTemplateError when the
        template is not prefix-stable.
        """
        result = self._tokenize(pair, source, line)
        if pair.prompt_only:
            return dataclasses.replace(result, prompt_only=True)
        return result if pair.label is None else dataclasses.replace(result, example=True)

    def _tokenize(self, pair: NormalizedPair, source: str, line: int) -> TokenizeResult:
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
            same_response_ok=pair.label is not None or pair.prompt_only,
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
            check_prompt_only(pair, self.config, source=source, line=line)
            check_row_kind(pair, self.config, source=source, line=line)
            return self(pair, source=source, line=line)
        except BadRowError as err:
            return self._bad_row(err, "bad_row")

    def tokenize_json_row(self, raw: Optional[str], *, source: str, line: int,
                          read_error: Optional[str] = None) -> TokenizeResult:
        """``tokenize_raw_row`` for a row as read from a file: its JSON text, or None when it
        could not be read (``read_error`` says why). Such a row and malformed JSON are bad
        rows too, skipped under the causes "unreadable" / "malformed_json"."""
        if raw is None:
            return self._bad_row(BadRowError(source, line, read_error or "the row could not be read"),
                                 "unreadable")
        try:
            record = json.loads(raw)
        except ValueError as err:
            problem = f"malformed JSON ({err}); fix the line so it holds one JSON object"
        else:
            return self.tokenize_raw_row(record, source=source, line=line)
        return self._bad_row(BadRowError(source, line, problem), "malformed_json")

    def _bad_row(self, err: BadRowError, cause: str) -> TokenizeResult:
        """The one place ``data.on_bad_row`` is decided: "error" raises ``err``, "skip"
        returns a "skipped" result (reason = the error message, ``cause`` a key of CAUSES)."""
        if self.config.on_bad_row == "error":
            raise err
        return TokenizeResult(None, "skipped", str(err), (cause,))

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

    def _encode_text(self, pair: NormalizedPair) -> tuple[list[int], list[int], list[int]]:
        if pair.prompt_only:
            return self._bos_prefix + self._ids([pair.prompt])[0], [], []
        prompt, chosen, rejected = self._ids([pair.prompt, pair.chosen, pair.rejected])
        # A response that already ends with the EOS token keeps it, without a second one.
        return self._bos_prefix + prompt, self._end_with_eos(chosen), self._end_with_eos(rejected)

    def _encode_chat(self, pair: NormalizedPair, source: str, line: int):
        """(ChatFit or None, prompt, chosen, rejected); the prompt is fitted (truncate_prompt)."""
        prompt_messages = tuple(pair.prompt)
        if self.config.over_length == "truncate_prompt":
            fit = self._fit_chat(prompt_messages, source, line)
            if not fit.dropped:  # a dropped prompt still measures its responses (the report)
                prompt_messages = fit.messages
        else:
            fit = None
        prompt_text = self._render(prompt_messages, True, source, line)
        fitted = fit is not None and not fit.dropped  # fit.ids are the ids of prompt_text already
        if pair.prompt_only:
            return fit, fit.ids if fitted else self._ids([prompt_text])[0], [], []
        responses = [
            self._response_text(prompt_messages, response, prompt_text, source, line)
            for response in (pair.chosen, pair.rejected)
        ]
        if fitted:
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


def check_row_kind(pair: NormalizedPair, config: Any, *, source: str, line: int) -> None:
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


def check_prompt_only(pair: NormalizedPair, config: Any, *, source: str, line: int) -> None:
    """A prompt-only row where ``config.refuse_prompt_only`` (why, and what to do; missing:
    PROMPT_ONLY_NEEDS_ONLINE, None: they are accepted) refuses them is a bad row."""
    refusal = getattr(config, "refuse_prompt_only", PROMPT_ONLY_NEEDS_ONLINE)
    if pair.prompt_only and refusal:
        raise BadRowError(source, line, refusal)


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
