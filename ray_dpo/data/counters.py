"""What became of the rows of a data stage: TokenizeResult per row, DataCounters per split.

Every result says why it is not "ok" with stable short keys (``TokenizeResult.causes``,
described in CAUSES) and carries the pair's token lengths before fitting, so
``DataCounters`` can report per-reason counts and length percentiles.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

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


@dataclass(frozen=True)
class TokenizeResult:
    """Outcome of tokenizing one row.

    row: the tokenized pair row (CONTRACTS.md), or None when dropped / skipped.
    status: one of STATUSES. reason: why it was truncated / dropped / skipped ("" if ok),
    for people. causes: the same as stable keys of CAUSES (one for dropped / skipped, one
    per kind of cut for truncated). lengths: (prompt, longest response) tokens before
    fitting; None when the row never got tokenized (skipped). example: the row was an
    unpaired example (KTO), not a pair, even when it was dropped. prompt_only: the row was a
    prompt without responses (online DPO; its row has empty chosen_ids / rejected_ids).
    """

    row: Optional[dict]
    status: str
    reason: str = ""
    causes: tuple[str, ...] = ()
    lengths: Optional[tuple[int, int]] = None
    example: bool = False
    prompt_only: bool = False


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
    ``prompt_only``: rows read that were prompts without responses (online DPO), whatever
    their status (a refused one is skipped as a bad row, and not counted here).
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
    prompt_only: int = 0

    @property
    def kept(self) -> int:
        """Rows that became training pairs (ok + truncated)."""
        return self.ok + self.truncated

    def add(self, result: TokenizeResult) -> "DataCounters":
        """Count one result (in place); returns self."""
        if result.status not in STATUSES:
            raise ValueError(f"unknown status {result.status!r}; valid: {', '.join(STATUSES)}")
        self.read += 1
        self.prompt_only += result.prompt_only
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
        for name in ("read", "ok", "truncated", "dropped", "skipped", "prompt_only"):
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
