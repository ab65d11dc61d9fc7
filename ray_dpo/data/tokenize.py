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

Text pairs: prompt tokens (with BOS when the tokenizer adds one), response tokens + EOS.

Every response ends with exactly one EOS unless it was truncated. Templates that emit
whitespace after their end-of-turn token (``"<|im_end|>\\n"``) get that tail cut, since
generation stops at EOS and never produces it.

Length policy (``data.over_length``); both limits count tokens:
    truncate_prompt    prompt longer than max_prompt_length keeps its last
                       max_prompt_length tokens (a leading BOS stays in front, in place
                       of the oldest kept token: models degrade without it); then
                       responses are cut from the right to max_length - len(prompt).
    truncate_response  the prompt is never cut: a prompt longer than max_prompt_length
                       drops the pair; responses are cut from the right to
                       max_length - len(prompt).
    drop               a pair over either limit is dropped, nothing is ever cut.
A pair whose responses tokenize identically, become identical after cutting, or have no
room left is dropped: identical responses give the DPO loss no gradient.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import jinja2

from ray_dpo.data.formats import FORMATS, BadRowError, Messages, Pair, normalize_row

OVER_LENGTH_POLICIES = ("truncate_prompt", "truncate_response", "drop")
BAD_ROW_POLICIES = ("error", "skip")
STATUSES = ("ok", "truncated", "dropped", "skipped")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be split into prompt and response.

    Not a bad row: it is a property of the template, so it is raised even with
    ``on_bad_row=skip``. Fix it with ``model.chat_template`` (a prefix-stable template).
    """


@dataclass(frozen=True)
class TokenizeResult:
    """Outcome of tokenizing one row.

    row: the tokenized pair row (CONTRACTS.md), or None when dropped / skipped.
    status: one of STATUSES. reason: why it was truncated / dropped / skipped ("" if ok).
    """

    row: Optional[dict]
    status: str
    reason: str = ""


# --------------------------------------------------------------------------- length policy


@dataclass(frozen=True)
class _Fitted:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    status: str  # "ok" | "truncated" | "dropped"
    reason: str = ""


def fit_lengths(
    prompt: Sequence[int],
    chosen: Sequence[int],
    rejected: Sequence[int],
    *,
    max_length: int,
    max_prompt_length: int,
    policy: str,
    bos_id: Optional[int] = None,
) -> _Fitted:
    """Apply the over-length policy (module docstring) to one tokenized pair.

    ``bos_id``: when the prompt starts with it, left truncation keeps it as token 0.
    """
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    longest = max(len(chosen), len(rejected))
    prompt_over = len(prompt) > max_prompt_length
    total_over = len(prompt) + longest > max_length
    if chosen == rejected:  # e.g. texts that differ only in unknown words or whitespace
        return _Fitted([], [], [], "dropped", "chosen and rejected tokenize to the same ids")
    if not prompt_over and not total_over:
        return _Fitted(prompt, chosen, rejected, "ok")
    sizes = f"prompt {len(prompt)} + longest response {longest} tokens"
    if policy == "drop":
        return _Fitted([], [], [], "dropped", (
            f"{sizes} exceeds max_prompt_length={max_prompt_length} / "
            f"max_length={max_length} (over_length=drop)"
        ))
    notes = []
    if prompt_over:
        if policy == "truncate_response":
            return _Fitted([], [], [], "dropped", (
                f"prompt has {len(prompt)} tokens > max_prompt_length={max_prompt_length} "
                "and over_length=truncate_response never cuts prompts (use truncate_prompt)"
            ))
        notes.append(f"prompt cut from {len(prompt)} to {max_prompt_length}")
        prompt = prompt_tail(prompt, max_prompt_length, bos_id)
    budget = max_length - len(prompt)
    if budget <= 0:
        return _Fitted([], [], [], "dropped", (
            f"prompt of {len(prompt)} tokens leaves no room for responses "
            f"under max_length={max_length}"
        ))
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if len(ids) > budget:
            notes.append(f"{name} cut from {len(ids)} to {budget}")
    chosen, rejected = chosen[:budget], rejected[:budget]
    if chosen == rejected:
        return _Fitted([], [], [], "dropped", (
            f"chosen and rejected are identical within the first {budget} response tokens"
        ))
    return _Fitted(prompt, chosen, rejected, "truncated" if notes else "ok", "; ".join(notes))


def prompt_tail(prompt: list[int], limit: int, bos_id: Optional[int]) -> list[int]:
    """The last ``limit`` tokens of a prompt (the end is closest to the answer); a leading BOS
    stays in front, in place of the oldest kept token. Shorter prompts come back as they are."""
    if len(prompt) <= limit:
        return prompt
    if bos_id is not None and prompt[0] == bos_id and limit > 1:
        return prompt[:1] + prompt[len(prompt) - limit + 1:]
    return prompt[-limit:]


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
        """Tokenize one pair; ``row["pair_id"]`` is ``f"{source}:{line}"``.

        Raises BadRowError when the chat template rejects the row's messages (e.g. a
        system turn the template does not support) and ChatTemplateError when the
        template is not prefix-stable.
        """
        if pair.is_chat:
            prompt, chosen, rejected = self._encode_chat(pair, source, line)
        else:
            prompt, chosen, rejected = self._encode_text(pair)
        fitted = fit_lengths(
            prompt, chosen, rejected,
            max_length=self.config.max_length,
            max_prompt_length=self.config.max_prompt_length,
            policy=self.config.over_length,
            bos_id=self.tokenizer.bos_token_id,
        )
        if fitted.status == "dropped":
            return TokenizeResult(None, "dropped", f"{source}:{line}: {fitted.reason}")
        row = {
            "pair_id": f"{source}:{line}",
            "prompt_ids": fitted.prompt,
            "chosen_ids": fitted.chosen,
            "rejected_ids": fitted.rejected,
            "truncated": fitted.status == "truncated",
        }
        return TokenizeResult(row, fitted.status, fitted.reason)

    def tokenize_raw_row(self, raw_row: Any, *, source: str, line: int) -> TokenizeResult:
        """Normalise (``config.format``) and tokenize one raw row.

        A malformed row raises BadRowError with ``on_bad_row=error`` and returns status
        "skipped" (reason = the error message) with ``on_bad_row=skip``.
        """
        try:
            pair = normalize_row(raw_row, self.config.format, source=source, line=line)
            return self(pair, source=source, line=line)
        except BadRowError as err:
            if self.config.on_bad_row == "error":
                raise
            return TokenizeResult(None, "skipped", str(err))

    def encode_prompt(self, prompt: Any, *, source: str = "<unknown>", line: int = 0) -> list[int]:
        """Token ids of a prompt alone, exactly as pair rows start (for sampling from it).

        ``prompt``: a string, or chat messages (rendered with the generation prompt). A prompt
        over max_prompt_length keeps its last tokens (and a leading BOS), as truncate_prompt does.
        """
        if isinstance(prompt, str):
            ids = self._bos_prefix + self._ids([prompt])[0]
        else:
            ids = self._ids([self._render(tuple(prompt), True, source, line)])[0]
        return prompt_tail(ids, self.config.max_prompt_length, self.tokenizer.bos_token_id)

    # ---- encoding

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # Special tokens come from the template (chat) or are added explicitly (text).
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode_text(self, pair: Pair) -> tuple[list[int], list[int], list[int]]:
        prompt, chosen, rejected = self._ids([pair.prompt, pair.chosen, pair.rejected])
        return self._bos_prefix + prompt, chosen + [self.eos_id], rejected + [self.eos_id]

    def _encode_chat(self, pair: Pair, source: str, line: int):
        prompt_text = self._render(pair.prompt, True, source, line)
        responses = [
            self._response_text(pair.prompt, response, prompt_text, source, line)
            for response in (pair.chosen, pair.rejected)
        ]
        prompt, chosen, rejected = self._ids([prompt_text, *responses])
        return prompt, self._end_with_eos(chosen), self._end_with_eos(rejected)

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


@dataclass
class DataCounters:
    """What happened to the rows of a data stage. Pure: per-block counters are summed
    with ``merge``, so ``read == ok + truncated + dropped + skipped`` always holds.

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
        return self

    def merge(self, other: "DataCounters") -> "DataCounters":
        """Add another stage's counts (in place); returns self, so it works with reduce."""
        for name in ("read", "ok", "truncated", "dropped", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._keep(self.skip_reasons, other.skip_reasons)
        self._keep(self.drop_reasons, other.drop_reasons)
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataCounters":
        return cls(**data)

    def _keep(self, examples: list[str], new: list[str]) -> None:
        examples.extend(new[: max(0, self.max_examples - len(examples))])
