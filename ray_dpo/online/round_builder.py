"""One online round from its samples: judge -> pairs -> tokenized pair rows, and its metrics.

A function of its inputs (the round's prompt rows, the engines' completions, a judge), so
the OnlineCoordinator only schedules: it submits the prompts to the engines, hands what
comes back to ``build_round``, and serves the rows through a BatchFeeder.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ray_dpo.config import DataConfig, OnlineConfig
from ray_dpo.online import rounds as rounds_lib
from ray_dpo.seams import Scorer

logger = logging.getLogger("ray_dpo.online")


@dataclass
class BuiltRound:
    rows: list[dict]  # tokenized pair rows, CONTRACTS.md
    metrics: dict[str, float]  # online/* of the round
    summary: str  # one console line


def build_round(r: int, *, rows: Sequence[dict], completions: Sequence[Sequence[Any]], scorer: Scorer,
                online: OnlineConfig, data: DataConfig, bos_id: Optional[int], gen_seconds: float,
                rounds_run: int) -> BuiltRound:
    """Round r's pairs. rows: the sampled prompts' data rows (pair_id, prompt_ids, and
    chosen_ids for regenerate_rejected); completions[i]: prompt i's Completions; scorer:
    the judge and the decoder of token ids."""
    from ray_dpo.online.pairs import PAIR_STRATEGIES, Candidate, group_samples, make_pairs

    prompt_texts = [scorer.decode(row["prompt_ids"]) for row in rows]
    flat = [c for comps in completions for c in comps]
    t0 = time.perf_counter()
    scores = scorer.score([p for p, comps in zip(prompt_texts, completions) for _ in comps], scorer.texts(flat))
    chosen = None
    if PAIR_STRATEGIES.get(online.pair_strategy).needs_chosen:
        chosen_scores = scorer.score(prompt_texts, [scorer.decode(row["chosen_ids"]) for row in rows])
        chosen = [Candidate(row["chosen_ids"], s) for row, s in zip(rows, chosen_scores)]
    judge_seconds = time.perf_counter() - t0
    groups = group_samples([row["pair_id"] for row in rows], [row["prompt_ids"] for row in rows],
                           [[c.token_ids for c in comps] for comps in completions], scores, chosen=chosen)
    pairs, counters = make_pairs(groups, strategy=online.pair_strategy, id_prefix=f"online-r{r}:")
    train_rows, fitted = rounds_lib.pair_rows(pairs, max_length=data.max_length,
                                              max_prompt_length=data.max_prompt_length,
                                              over_length=data.over_length, bos_id=bos_id)
    gen_tokens = sum(len(c.token_ids) for c in flat)
    metrics = {
        "online/round": float(r),
        "online/judge_score_mean": float(np.mean(scores)),
        "online/pairs_kept": float(len(train_rows)),
        "online/pairs_dropped_no_margin": float(counters["dropped_no_margin"]),
        "online/pairs_dropped_length": float(fitted["dropped_length"]),
        "online/pairs_truncated": float(fitted["truncated"]),
        "online/samples": float(len(flat)),
        "online/gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
        "online/gen_seconds": gen_seconds,
        "online/judge_seconds": judge_seconds,
    }
    if chosen is not None:
        metrics["online/judge_score_chosen_mean"] = float(np.mean([c.score for c in chosen]))
    if not train_rows:
        logger.warning("online round %d kept no pair (all %d prompts lacked a margin): its steps train nothing",
                       r, len(groups))
    summary = (f"online round {r + 1}/{rounds_run}: {len(flat)} samples "
               f"({metrics['online/gen_tokens_per_s']:.0f} tok/s), judge mean {metrics['online/judge_score_mean']:.3f}, "
               f"{len(train_rows)} pairs kept, {counters['dropped_no_margin']} without margin, "
               f"{fitted['dropped_length']} over length")
    return BuiltRound(train_rows, metrics, summary)


class RoundProducer:
    """Makes online rounds on the engines: submit a round's prompts now, then in a thread
    collect -> build_round -> the round store -> the RoundFeeder.

    rounds: RoundFeeder. prompt_rows: PairStore the prompts are drawn from. generation:
    GenerationGroup. scorer: the rounds' judge. spec: the follower's (online and data
    sections, seed). bos_id: the tokenizer's BOS. log(metrics, step).
    """

    def __init__(self, *, rounds: Any, prompt_rows: Any, generation: Any, scorer: Scorer, spec: Any,
                 bos_id: Optional[int], log: Callable[[dict, int], None]):
        self.rounds, self.prompt_rows, self.generation = rounds, prompt_rows, generation
        self.scorer = scorer
        self.online, self.data, self.bos_id, self.seed = spec.online, spec.data, bos_id, spec.seed
        self._log = log

    def ensure(self, r: int, *, step: int) -> None:
        """Round r exists, is being made, is read back, or starts now: its prompts go to the
        engines before this returns (so a later weight sync cannot change its samples), the
        rest runs in a thread. ``step``: the policy step whose weights the engines hold."""
        if self.rounds.is_claimed(r) or not self.rounds.claim(r):
            return
        try:
            indices = rounds_lib.round_prompt_indices(len(self.prompt_rows), per_round=self.online.prompts_per_round,
                                                      round_index=r, seed=self.seed)
            chunks = self.generation.submit([self.prompt_rows.row(i)["prompt_ids"] for i in indices],
                                            seed=self.seed + 1_000_003 * (r + 1))
        except BaseException:
            self.rounds.release(r)
            raise
        threading.Thread(target=self._produce, args=(r, step, indices, chunks), name=f"online-round-{r}",
                         daemon=True).start()

    def _produce(self, r: int, step: int, indices: list[int], chunks: list) -> None:
        try:
            t0 = time.perf_counter()
            completions = self.generation.collect(chunks)
            built = build_round(r, rows=[self.prompt_rows.row(i) for i in indices], completions=completions,
                                scorer=self.scorer, online=self.online, data=self.data, bos_id=self.bos_id,
                                gen_seconds=time.perf_counter() - t0, rounds_run=self.rounds.plan.rounds_run)
            start = self.rounds.plan.round_start(r)
            # How many optimizer steps older than the round's first step the sampling policy is:
            # the weights the samples came from, which a restarted engine's resent chunk makes
            # newer than those of the step the round was submitted at.
            sampled_from = self.generation.sampled_from(chunks)
            built.metrics["online/sample_staleness_steps"] = float(start - (step if sampled_from is None
                                                                            else sampled_from))
            self.rounds.store.save(r, built.rows, built.metrics)
            self.rounds.install(r, built.rows)
        except BaseException as err:  # noqa: BLE001 - handed to the ranks waiting for round r
            self.rounds.release(r)
            self.rounds.fail(err)
            return
        print(f"[ray_dpo] {built.summary}", flush=True)
        self._log(built.metrics, start)
