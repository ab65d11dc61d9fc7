"""Preference row formats: turn one raw JSON row into a normalised ``NormalizedPair``.

Supported formats (``data.format`` in the run config; ``auto`` detects it per row):

standard        TRL "standard": ``{"prompt": str, "chosen": str, "rejected": str}``.
conversational  TRL "conversational": ``prompt`` is a list of ``{"role", "content"}``
                messages, ``chosen`` / ``rejected`` lists of assistant messages.
                Lenient on purpose: a string prompt becomes one user message, a string
                (or a single message object) response becomes one assistant message.
sharegpt        ``conversations``: list of ``{"from", "value"}`` with ``from`` in
                human / gpt / system (mapped to user / assistant / system; ``user`` and
                ``assistant`` are accepted as well), plus ``chosen`` and ``rejected``, each
                one ``{"from": "gpt", "value": ...}`` message or a list of them.
unpaired        TRL "unpaired preference" (for KTO): ``{"prompt", "completion", "label"}``,
                prompt / completion text or messages as in standard / conversational,
                label a boolean (true = desirable).
sharegpt_kto    LLaMA-Factory's KTO rows (for KTO): ``conversations`` of ``{from, value}``
                (or ``messages`` of ``{role, content}``) ending with the assistant's
                completion, a boolean ``kto_tag`` (``label`` is accepted too), optional
                ``system`` string.
implicit        no ``prompt``: ``chosen`` and ``rejected`` are whole conversations (lists
                of messages). The prompt is their longest common message prefix and the
                responses are the rest, which must be assistant turns only. Plain strings
                with a shared prefix are NOT supported: a character-level split lands
                mid-word (hence mid-token), and the boundary is ambiguous whenever both
                responses start with the same word, so the prompt/response split - the
                only thing DPO's loss mask depends on - would be silently wrong. Give such
                rows an explicit ``prompt`` (standard format) instead.
prompt_only     a prompt without responses, for online DPO (the policy's samples become the
                pairs): ``{"prompt": str}`` (text, as in standard), ``{"prompt": [messages]}``
                or ``{"messages": [messages]}`` (chat, ending with a user turn). ``auto``
                picks it for rows with ``prompt`` or ``messages`` and none of ``chosen``,
                ``rejected``, ``completion``, ``conversations``; set explicitly, it reads
                ``prompt`` (or ``messages``) of any row and ignores the rest. Only online
                runs whose pair strategy makes both responses read it
                (``PROMPT_ONLY_NEEDS_ONLINE``).

Messages are reduced to ``{"role", "content"}``; other keys (``name``, ``tool_calls``,
...) are dropped. Roles are system / user / assistant / tool; content must be a
non-empty string.

Every malformed row raises ``BadRowError`` whose message starts with ``"<source>:<line>: "``
and says how to fix the row, so ``data.on_bad_row=error`` stops with a pointer into the
file and ``data.on_bad_row=skip`` can count and report it.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

PAIRED_FORMATS = ("standard", "conversational", "sharegpt", "implicit")
UNPAIRED_FORMATS = ("unpaired", "sharegpt_kto")  # ray_dpo/data/unpaired.py
PROMPT_FORMATS = ("prompt_only",)  # online DPO: the rounds make the pairs
FORMATS = ("auto",) + PAIRED_FORMATS + UNPAIRED_FORMATS + PROMPT_FORMATS
PROMPT_ONLY_NEEDS_ONLINE = (
    "this row is prompt-only (no chosen / rejected): prompt-only rows are prompts for online DPO, "
    "which samples and judges the responses itself; set online.enabled=true with "
    "online.pair_strategy=best_vs_worst and a judge (online.judge.function or "
    "online.judge.reward_model), or give the row chosen and rejected responses"
)
"""Why a run that trains on given pairs refuses a prompt-only row (its bad-row message)."""
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles. user/assistant appear in many "sharegpt" exports.
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}

Message = dict[str, str]
"""One chat message: ``{"role": str, "content": str}``."""
Messages = tuple[Message, ...]


class BadRowError(ValueError):
    """A preference row that cannot be used; the message reads ``"<source>:<line>: <problem>"``."""

    def __init__(self, source: str, line: int, problem: str):
        self.source = source
        self.line = line
        self.problem = problem
        super().__init__(f"{source}:{line}: {problem}")

    def __reduce__(self):
        # Keep it picklable (Ray ships exceptions between processes); the default
        # reduce would call BadRowError(message) with the wrong arity.
        return (BadRowError, (self.source, self.line, self.problem))


@dataclass(frozen=True)
class NormalizedPair:
    """A normalised preference pair.

    Chat pairs (``is_chat=True``): ``prompt`` is a tuple of messages ending where the
    assistant should answer; ``chosen`` / ``rejected`` are tuples of assistant messages.
    Text pairs: all three are plain strings, concatenated as prompt + response.
    An unpaired example (``label`` not None: True = desirable) has its completion as both
    ``chosen`` and ``rejected``. A prompt-only row (``prompt_only``) has empty ``chosen`` and
    ``rejected`` ("" or ()).
    """

    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages]
    is_chat: bool
    label: Optional[bool] = None
    prompt_only: bool = False


@dataclass(frozen=True)
class _Where:
    """Row location, for error messages."""

    source: str
    line: int

    def error(self, problem: str) -> BadRowError:
        return BadRowError(self.source, self.line, problem)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------- detection


def detect_format(row: Any, *, source: str = "<unknown>", line: int = 0) -> str:
    """Name of the format of ``row`` (one of FORMATS without "auto"), from its keys.

    Raises BadRowError when no format matches, listing what each format needs.
    """
    where = _Where(source, line)
    if not isinstance(row, dict):
        raise where.error(
            f"a row must be a JSON object with preference fields, got {_type_name(row)}"
        )
    if "kto_tag" in row or (("conversations" in row or "messages" in row) and "label" in row):
        return "sharegpt_kto"
    if "completion" in row:
        return "unpaired"
    if "conversations" in row:
        return "sharegpt"
    if ("prompt" in row or "messages" in row) and "chosen" not in row and "rejected" not in row:
        return "prompt_only"
    if "prompt" in row:
        if any(isinstance(row.get(key), (list, dict)) for key in ("prompt", "chosen", "rejected")):
            return "conversational"
        return "standard"
    if "chosen" in row and "rejected" in row:
        return "implicit"
    raise where.error(
        f"unknown row format (keys: {sorted(row)}); expected prompt+chosen+rejected "
        "(standard or conversational), conversations+chosen+rejected (sharegpt), "
        "chosen+rejected whole conversations (implicit), prompt+completion+label (unpaired) or "
        "conversations/messages+kto_tag (sharegpt_kto) or prompt / messages alone (prompt_only, "
        "online runs). Rename the fields or set data.format "
        "explicitly."
    )


def normalize_row(
    row: Any, fmt: str = "auto", *, source: str = "<unknown>", line: int = 0
) -> NormalizedPair:
    """Normalise one raw row into a ``NormalizedPair``.

    Args:
        row: the decoded JSON object (dict) of one line / record.
        fmt: one of FORMATS; "auto" detects the format from the row's keys.
        source, line: where the row came from (file name, 1-based line), for errors.

    Raises:
        BadRowError: the row is malformed (message: ``"<source>:<line>: ..."``).
        ValueError: ``fmt`` is not a known format (a config error, never skipped).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    where = _Where(source, line)
    if fmt == "auto":
        fmt = detect_format(row, source=source, line=line)
    elif not isinstance(row, dict):
        raise where.error(f"a row must be a JSON object, got {_type_name(row)}")
    pair = _NORMALISERS[fmt](row, where)
    if pair.label is None and not pair.prompt_only and pair.chosen == pair.rejected:
        raise where.error(
            "chosen and rejected are identical; a preference pair needs two different "
            "responses (fix one side or remove the row)"
        )
    return pair


# --------------------------------------------------------------------------- field helpers


def _field(row: dict, key: str, where: _Where, fmt: str, needs: str) -> Any:
    if key not in row or row[key] is None:
        raise where.error(
            f"missing field {key!r}: the {fmt} format needs {needs} (row has keys {sorted(row)})"
        )
    return row[key]


def _text(value: Any, what: str, where: _Where, hint: str = "") -> str:
    if not isinstance(value, str):
        raise where.error(f"{what} must be a string, got {_type_name(value)}{hint}")
    if not value.strip():
        raise where.error(f"{what} is empty; give it some text or remove the row")
    return value


def _message(
    value: Any, what: str, where: _Where, *, keys: tuple[str, str], roles: dict[str, str]
) -> Message:
    """Validate one message object; ``keys`` are its (role key, content key)."""
    role_key, content_key = keys
    if not isinstance(value, dict) or role_key not in value or content_key not in value:
        got = f"keys {sorted(value)}" if isinstance(value, dict) else _type_name(value)
        raise where.error(
            f"{what} must be a message object with {role_key!r} and {content_key!r}, got {got}"
        )
    role = value[role_key]
    if role not in roles:
        raise where.error(
            f"{what} has {role_key} {role!r}; expected one of {', '.join(roles)}"
        )
    content = _text(value[content_key], f"{what}.{content_key}", where)
    return {"role": roles[role], "content": content}


def _messages(
    value: Any,
    what: str,
    where: _Where,
    *,
    keys: tuple[str, str] = ("role", "content"),
    roles: dict[str, str] | None = None,
    allow_single: bool = False,
) -> Messages:
    """Validate a non-empty list of messages (or one message object if allow_single)."""
    roles = roles if roles is not None else {r: r for r in ROLES}
    if allow_single and isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise where.error(
            f"{what} must be a list of messages {{{keys[0]!r}, {keys[1]!r}}}, got {_type_name(value)}"
        )
    if not value:
        raise where.error(f"{what} is an empty list; it needs at least one message")
    return tuple(
        _message(item, f"{what}[{i}]", where, keys=keys, roles=roles)
        for i, item in enumerate(value)
    )


def _assistant_only(messages: Messages, what: str, where: _Where, hint: str = "") -> Messages:
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise where.error(
                f"{what}[{i}] is a {message['role']!r} message; responses must be assistant "
                f"messages{hint} (move earlier turns into the prompt)"
            )
    return messages


# --------------------------------------------------------------------------- normalisers


_STANDARD_NEEDS = "string fields 'prompt', 'chosen' and 'rejected'"
_CONV_NEEDS = "'prompt' (list of messages), 'chosen' and 'rejected' (lists of assistant messages)"
_SHAREGPT_NEEDS = "'conversations' (list of {from, value}), 'chosen' and 'rejected'"
_IMPLICIT_NEEDS = "'chosen' and 'rejected', two whole conversations (lists of messages)"


def _standard(row: dict, where: _Where) -> NormalizedPair:
    hint = " (rows with message lists need format 'conversational')"
    texts = [
        _text(_field(row, key, where, "standard", _STANDARD_NEEDS), key, where, hint)
        for key in ("prompt", "chosen", "rejected")
    ]
    return NormalizedPair(prompt=texts[0], chosen=texts[1], rejected=texts[2], is_chat=False)


def _conversational(row: dict, where: _Where) -> NormalizedPair:
    prompt = _field(row, "prompt", where, "conversational", _CONV_NEEDS)
    if isinstance(prompt, str):
        prompt_messages: Messages = ({"role": "user", "content": _text(prompt, "prompt", where)},)
    else:
        prompt_messages = _messages(prompt, "prompt", where)
    responses = []
    for key in ("chosen", "rejected"):
        value = _field(row, key, where, "conversational", _CONV_NEEDS)
        if isinstance(value, str):
            responses.append(({"role": "assistant", "content": _text(value, key, where)},))
        else:
            messages = _messages(value, key, where, allow_single=True)
            responses.append(_assistant_only(messages, key, where))
    return NormalizedPair(prompt=prompt_messages, chosen=responses[0], rejected=responses[1], is_chat=True)


def _sharegpt(row: dict, where: _Where) -> NormalizedPair:
    keys = ("from", "value")
    conversations = _field(row, "conversations", where, "sharegpt", _SHAREGPT_NEEDS)
    prompt = _messages(conversations, "conversations", where, keys=keys, roles=SHAREGPT_ROLES)
    responses = []
    for key in ("chosen", "rejected"):
        value = _field(row, key, where, "sharegpt", _SHAREGPT_NEEDS)
        messages = _messages(
            value, key, where, keys=keys, roles=SHAREGPT_ROLES, allow_single=True
        )
        responses.append(_assistant_only(messages, key, where, hint=" (from 'gpt')"))
    return NormalizedPair(prompt=prompt, chosen=responses[0], rejected=responses[1], is_chat=True)


def _implicit(row: dict, where: _Where) -> NormalizedPair:
    chosen = _field(row, "chosen", where, "implicit", _IMPLICIT_NEEDS)
    rejected = _field(row, "rejected", where, "implicit", _IMPLICIT_NEEDS)
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise where.error(
            "implicit-prompt rows need chosen and rejected as lists of messages; plain "
            "strings with a shared prefix are not split (the boundary would fall mid-word). "
            "Add an explicit 'prompt' field (standard format) instead"
        )
    chosen_m = _messages(chosen, "chosen", where)
    rejected_m = _messages(rejected, "rejected", where)
    k = 0  # length of the longest common message prefix
    while k < min(len(chosen_m), len(rejected_m)) and chosen_m[k] == rejected_m[k]:
        k += 1
    if k == len(chosen_m) == len(rejected_m):
        raise where.error(
            "chosen and rejected are identical; a preference pair needs two different "
            "responses (fix one side or remove the row)"
        )
    if k == 0:
        raise where.error(
            "chosen and rejected share no leading messages, so there is no common prompt; "
            "implicit format needs both conversations to start with the same prompt turns"
        )
    if k in (len(chosen_m), len(rejected_m)):
        shorter = "chosen" if k == len(chosen_m) else "rejected"
        raise where.error(
            f"{shorter} is a prefix of the other conversation, so it has no response of "
            "its own; both must end with their own assistant turn(s)"
        )
    for name, messages in (("chosen", chosen_m), ("rejected", rejected_m)):
        if any(m["role"] != "assistant" for m in messages[k:]):
            raise where.error(
                f"chosen and rejected first differ at message {k}, but {name} has "
                "non-assistant turns after that point; implicit format needs both "
                "conversations identical up to their final assistant response(s)"
            )
    return NormalizedPair(prompt=chosen_m[:k], chosen=chosen_m[k:], rejected=rejected_m[k:], is_chat=True)


_NORMALISERS: dict[str, Callable[[dict, _Where], NormalizedPair]] = {
    "standard": _standard,
    "conversational": _conversational,
    "sharegpt": _sharegpt,
    "implicit": _implicit,
}


# --------------------------------------------------------------------------- unpaired (KTO)


_UNPAIRED_NEEDS = "'prompt', 'completion' and a boolean 'label' (true = desirable)"
_KTO_NEEDS = "'conversations' (or 'messages') ending with the assistant's completion and a boolean 'kto_tag'"


def _label(row: dict, key: str, where: _Where, fmt: str, needs: str) -> bool:
    value = _field(row, key, where, fmt, needs)
    if not isinstance(value, bool):
        raise where.error(f"{key} must be true or false (a JSON boolean: true = desirable, false = "
                          f"undesirable), got {value!r}")
    return value


def _unpaired(row: dict, where: _Where) -> NormalizedPair:
    prompt = _field(row, "prompt", where, "unpaired", _UNPAIRED_NEEDS)
    completion = _field(row, "completion", where, "unpaired", _UNPAIRED_NEEDS)
    label = _label(row, "label", where, "unpaired", _UNPAIRED_NEEDS)
    if isinstance(prompt, str) and isinstance(completion, str):
        return NormalizedPair(prompt=_text(prompt, "prompt", where), chosen=_text(completion, "completion", where),
                    rejected=completion, is_chat=False, label=label)
    if isinstance(prompt, str):
        prompt_messages: Messages = ({"role": "user", "content": _text(prompt, "prompt", where)},)
    else:
        prompt_messages = _messages(prompt, "prompt", where)
    if isinstance(completion, str):
        response: Messages = ({"role": "assistant", "content": _text(completion, "completion", where)},)
    else:
        response = _assistant_only(_messages(completion, "completion", where, allow_single=True), "completion", where)
    return NormalizedPair(prompt=prompt_messages, chosen=response, rejected=response, is_chat=True, label=label)


def _sharegpt_kto(row: dict, where: _Where) -> NormalizedPair:
    key = "conversations" if "conversations" in row else "messages"
    value = _field(row, key, where, "sharegpt_kto", _KTO_NEEDS)
    tag = "kto_tag" if "kto_tag" in row or "label" not in row else "label"
    label = _label(row, tag, where, "sharegpt_kto", _KTO_NEEDS)
    first = value[0] if isinstance(value, list) and value else None
    keys = ("role", "content") if isinstance(first, dict) and "role" in first else ("from", "value")
    messages = _messages(value, key, where, keys=keys, roles=SHAREGPT_ROLES)
    if row.get("system") is not None:
        messages = ({"role": "system", "content": _text(row["system"], "system", where)},) + messages
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise where.error(f"{key} must end with the assistant's completion after at least one prompt "
                          f"message (the last message is the one {tag} judges); got a last "
                          f"{messages[-1]['role']!r} message of {len(messages)}")
    return NormalizedPair(prompt=messages[:-1], chosen=messages[-1:], rejected=messages[-1:], is_chat=True, label=label)


_NORMALISERS["unpaired"] = _unpaired
_NORMALISERS["sharegpt_kto"] = _sharegpt_kto


# --------------------------------------------------------------------------- prompt-only (online)


_PROMPT_ONLY_NEEDS = "'prompt' (a string or a list of messages) or 'messages' (a list of messages)"


def _prompt_only(row: dict, where: _Where) -> NormalizedPair:
    key = "prompt" if "prompt" in row else "messages"
    value = _field(row, key, where, "prompt_only", _PROMPT_ONLY_NEEDS)
    if isinstance(value, str):
        return NormalizedPair(prompt=_text(value, key, where), chosen="", rejected="", is_chat=False, prompt_only=True)
    messages = _messages(value, key, where)
    if messages[-1]["role"] != "user":
        raise where.error(f"{key} must end with a user turn, the one the policy answers; got a last "
                          f"{messages[-1]['role']!r} message (a conversation with its answer is a "
                          "preference or KTO row: give it chosen / rejected, or completion / label)")
    return NormalizedPair(prompt=messages, chosen=(), rejected=(), is_chat=True, prompt_only=True)


_NORMALISERS["prompt_only"] = _prompt_only
