"""Held-out evaluation that never stops training: sample at step k, score while step k+1 runs.

At an eval point the engines already hold (and have verified) the policy of step k. The
evaluator queues the held-out prompts on them right away — an engine runs its calls in
order, so a weight sync sent later cannot change these samples — and returns; a thread
then collects the samples, judges them, scores their KL to the reference and logs
``eval/*`` at step k, plus the per-sample record ``heldout/step_{k:06d}.json`` as an
artifact of the run (what ``ray-dpo compare --paired`` tests differences on). The policy
workers go on training meanwhile. ``wait()`` returns once every eval started has been
logged (the run's end needs its last one).

The maths (judge score, KL estimate, which prompts) is in engines/evaluation.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Sequence

from ray_dpo.config import EvalConfig, SamplingConfig
from ray_dpo.seams import ReferenceRows, RunLog, Scorer

logger = logging.getLogger("ray_dpo.engines")

EVAL_SEED_OFFSET = 7919  # every eval samples with the same seed: differences come from the policy


class HeldOutEvaluator:
    """eval/judge_score and eval/kl of the policy at eval points, off the training path.

    config: the eval section (every_steps, samples_per_prompt). prompts: [(prompt as the
    judge reads it, prompt token ids)]. generation: GenerationGroup whose engines follow
    the policy. scorer: the eval's judge (seams.Scorer). reference: the ReferenceGroup that
    scores the samples for the KL (seams.ReferenceRows). run: where metrics, the per-sample
    record (run.log_artifact; None: not kept) and a failed eval go.
    """

    def __init__(self, config: EvalConfig, *, prompts: Sequence[tuple[Any, list[int]]], generation: Any,
                 scorer: Scorer, reference: ReferenceRows, sampling: SamplingConfig, seed: int, run: RunLog):
        from ray_dpo.engines.evaluation import eval_sampling

        self.config = config
        self.prompts = list(prompts)
        self.generation = generation
        self.scorer = scorer
        self.reference = reference
        self.sampling = eval_sampling(sampling)
        self.seed = seed + EVAL_SEED_OFFSET
        self._run = run
        self._threads: list[threading.Thread] = []
        self._sampling: set[int] = set()

    def points(self, total_steps: int) -> list[int]:
        """Steps to evaluate at: 0, every eval.every_steps, the last (none without prompts)."""
        from ray_dpo.engines.evaluation import eval_points

        return eval_points(total_steps, self.config.every_steps) if self.prompts else []

    def start(self, step: int) -> None:
        """Queue the held-out prompts on the engines now (the weights of ``step``); judge,
        score and log in a thread."""
        self._sampling.add(step)
        chunks = self.generation.submit([ids for _, ids in self.prompts], n=self.config.samples_per_prompt,
                                        sampling=self.sampling, seed=self.seed)
        thread = threading.Thread(target=self._finish, args=(step, chunks), name=f"heldout-eval-{step}",
                                  daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def still_sampling(self) -> list[int]:
        """Steps whose held-out samples the engines have not all returned yet (a weight sync
        sent now waits behind them)."""
        return sorted(self._sampling)

    def wait(self, timeout_s: Optional[float] = None) -> None:
        """Until every eval started has been logged."""
        for thread in list(self._threads):
            thread.join(timeout_s)

    def _finish(self, step: int, chunks: list) -> None:
        try:
            try:
                completions = self.generation.collect(chunks)
            finally:
                self._sampling.discard(step)
            metrics, record = self._score(step, completions)
            self._run.log(metrics, step)
            self._keep(record, step)
            print(f"[ray_dpo] step {step}: held-out eval/judge_score {metrics['eval/judge_score']:.4f}, "
                  f"eval/kl {metrics['eval/kl']:.4f} ({len(self.prompts)} prompts x "
                  f"{self.config.samples_per_prompt})", flush=True)
        except BaseException as err:  # noqa: BLE001 - the run must hear of it, not a dead thread
            logger.error("held-out eval at step %d failed: %s", step, err)
            self._run.on_error(err)

    def _keep(self, record: dict, step: int) -> None:
        """Write the per-sample record. A store that refuses it costs the paired comparison of
        this step, not the run: warn and go on (the eval/* means are logged already)."""
        import json

        from ray_dpo.engines.evaluation import heldout_artifact_path

        if self._run.log_artifact is None:
            return
        path = heldout_artifact_path(step)
        try:
            self._run.log_artifact(json.dumps(record), path)
        except Exception as err:  # noqa: BLE001 - e.g. an artifact store this process cannot reach
            logger.warning("held-out eval at step %d: could not write %s to the run (%s: %s); "
                           "`ray-dpo compare --paired` will not find this step", step, path, type(err).__name__, err)

    def _score(self, step: int, completions: list) -> tuple[dict[str, float], dict]:
        """(eval/* metrics, the per-sample record) of the collected samples."""
        from ray_dpo.engines.evaluation import as_pair_rows, eval_metrics, heldout_record

        n = self.config.samples_per_prompt
        flat = [c for comps in completions for c in comps]
        prompts = [p for p, _ in self.prompts for _ in range(n)]
        scores = self.scorer.score(prompts, self.scorer.texts(flat))
        rows = as_pair_rows([ids for _, ids in self.prompts for _ in range(n)], [c.token_ids for c in flat])
        scored = self.reference.score(rows)
        samples = dict(scores=scores, policy_logps=[c.logprob_sum for c in flat],
                       ref_logps=[r["ref_chosen_logp"] for r in scored],
                       response_lengths=[len(c.token_ids) for c in flat])
        metrics = eval_metrics(**samples)  # first: it refuses non-finite log-probs, which JSON cannot hold
        record = heldout_record(step=step, samples_per_prompt=n, seed=self.seed,
                                prompts=[p for p, _ in self.prompts], max_new_tokens=self.sampling.max_new_tokens,
                                **samples)
        return metrics, record
