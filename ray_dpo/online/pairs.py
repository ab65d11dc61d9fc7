"""ScoredPair strategies for online DPO: scored candidates of one prompt -> at most one pair.

    Candidate(response, score)                   one scored response; ``response`` is opaque
                                                 (token ids, text, a Completion)
    PromptGroup(prompt_id, prompt, samples, chosen=None)
                                                 a prompt's policy samples, and the data set's
                                                 chosen response scored by the same judge
    ScoredPair(pair_id, prompt, chosen, rejected, chosen_score, rejected_score)
    register_pair_strategy(name, needs_chosen=, min_samples=) / PAIR_STRATEGIES / pair_strategy_names()
    make_pairs(groups, strategy=, min_margin=0.0, id_prefix="") -> (pairs, counters)
                                                 (None: it may), asked of the strategies' facts

Strategies (both keep a pair only when chosen_score - rejected_score > min_margin; a pair
without such a margin teaches nothing but noise, so it is dropped and counted):
  regenerate_rejected  keep the data set's chosen; rejected = the lowest-scoring policy
                       sample, if it scores below the chosen.
  best_vs_worst        chosen = the best of the policy's samples, rejected = the worst.
Ties go to the earliest sample, so the result is deterministic for a given input order.

counters: {"candidates": prompt groups seen, "kept": pairs made, "dropped_no_margin": the rest};
candidates == kept + dropped_no_margin.

Pure: no ray, torch or vllm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ray_dpo.registry import Registry


@dataclass(frozen=True)
class Candidate:
    response: Any
    """The response: token ids, text or a Completion; pair selection never looks inside."""
    score: float
    """The judge's score; higher is better."""


@dataclass
class PromptGroup:
    prompt_id: str
    """Stable id of the prompt (e.g. the data set row's pair_id)."""
    prompt: Any
    """The prompt as the pair rows need it (e.g. prompt token ids)."""
    samples: list[Candidate] = field(default_factory=list)
    """The policy's samples for this prompt, scored."""
    chosen: Optional[Candidate] = None
    """The data set's chosen response, scored by the same judge (regenerate_rejected)."""


@dataclass(frozen=True)
class ScoredPair:
    pair_id: str
    prompt: Any
    chosen: Any
    rejected: Any
    chosen_score: float
    rejected_score: float

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


# A strategy picks (chosen, rejected) candidates of one group, or None when it cannot.
PairStrategy = Callable[[PromptGroup], Optional[tuple[Candidate, Candidate]]]


@dataclass(frozen=True)
class PairStrategySpec:
    """A registered pair strategy and its facts.

    pick: the PairStrategy itself.
    needs_chosen: the data set's chosen response must be scored too (PromptGroup.chosen).
    min_samples: policy samples per prompt it needs to ever make a pair
        (online.samples_per_prompt below this is a config error).
    """

    name: str
    pick: PairStrategy
    needs_chosen: bool = False
    min_samples: int = 1


PAIR_STRATEGIES: Registry[PairStrategySpec] = Registry("strategy", key="online.pair_strategy")
"""Every strategy online.pair_strategy may name."""


def register_pair_strategy(name: str, *, needs_chosen: bool = False,
                           min_samples: int = 1) -> Callable[[PairStrategy], PairStrategy]:
    """Decorator: register a PairStrategy under ``name`` with its facts (see PairStrategySpec)."""

    def deco(fn: PairStrategy) -> PairStrategy:
        PAIR_STRATEGIES.add(name, PairStrategySpec(name, fn, needs_chosen=needs_chosen, min_samples=min_samples))
        return fn

    return deco


def pair_strategy_names() -> list[str]:
    """Sorted names of the registered strategies."""
    return PAIR_STRATEGIES.names()


def get_pair_strategy(name: str) -> PairStrategy:
    """The strategy ``name``; ValueError naming the valid ones if there is none."""
    return PAIR_STRATEGIES.get(name).pick


def _worst(samples: Sequence[Candidate]) -> Candidate:
    return min(samples, key=lambda c: c.score)  # min/max return the first of ties


def _best(samples: Sequence[Candidate]) -> Candidate:
    return max(samples, key=lambda c: c.score)


@register_pair_strategy("regenerate_rejected", needs_chosen=True)
def regenerate_rejected(group: PromptGroup) -> Optional[tuple[Candidate, Candidate]]:
    if group.chosen is None:
        raise ValueError(f"regenerate_rejected needs the data set's chosen response; prompt "
                         f"{group.prompt_id!r} has none (use pair_strategy best_vs_worst for prompt-only data)")
    if not group.samples:
        return None
    return group.chosen, _worst(group.samples)


@register_pair_strategy("best_vs_worst", min_samples=2)
def best_vs_worst(group: PromptGroup) -> Optional[tuple[Candidate, Candidate]]:
    if len(group.samples) < 2:
        return None
    return _best(group.samples), _worst(group.samples)


def make_pairs(groups: Sequence[PromptGroup], *, strategy: str, min_margin: float = 0.0,
               id_prefix: str = "") -> tuple[list[ScoredPair], dict[str, int]]:
    """One pair per group that has a margin, in group order; plus the counters.

    min_margin: a pair is kept only if chosen_score - rejected_score > min_margin (>= 0).
    id_prefix: prepended to each prompt_id to form pair_id, e.g. "online-r2:" so pairs of
    different rounds never share an id.
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    pick = get_pair_strategy(strategy)
    pairs: list[ScoredPair] = []
    for group in groups:
        picked = pick(group)
        if picked is None:
            continue
        chosen, rejected = picked
        if chosen.score - rejected.score > min_margin:
            pairs.append(ScoredPair(pair_id=f"{id_prefix}{group.prompt_id}", prompt=group.prompt,
                              chosen=chosen.response, rejected=rejected.response,
                              chosen_score=chosen.score, rejected_score=rejected.score))
    counters = {"candidates": len(groups), "kept": len(pairs), "dropped_no_margin": len(groups) - len(pairs)}
    return pairs, counters


def group_samples(prompt_ids: Sequence[str], prompts: Sequence[Any], responses: Sequence[Sequence[Any]],
                  scores: Sequence[float], *, chosen: Optional[Sequence[Candidate]] = None) -> list[PromptGroup]:
    """Build PromptGroups from flat judge scores.

    responses[i] holds prompt i's samples; ``scores`` is flat, in the same order (prompt 0's
    samples, then prompt 1's, ...), as a judge returns them for the flattened samples.
    chosen: the data set's scored chosen response per prompt (regenerate_rejected).
    """
    if not len(prompt_ids) == len(prompts) == len(responses):
        raise ValueError(f"{len(prompt_ids)} ids, {len(prompts)} prompts, {len(responses)} response lists")
    total = sum(len(r) for r in responses)
    if len(scores) != total:
        raise ValueError(f"{len(scores)} scores for {total} responses")
    if chosen is not None and len(chosen) != len(prompts):
        raise ValueError(f"{len(chosen)} chosen responses for {len(prompts)} prompts")
    groups, k = [], 0
    for i, (pid, prompt, resp) in enumerate(zip(prompt_ids, prompts, responses)):
        samples = [Candidate(r, float(s)) for r, s in zip(resp, scores[k:k + len(resp)])]
        k += len(resp)
        groups.append(PromptGroup(pid, prompt, samples, chosen[i] if chosen is not None else None))
    return groups
