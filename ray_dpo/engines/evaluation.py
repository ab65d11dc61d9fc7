"""Held-out evaluation shared by offline and online runs: judge score and KL to the reference.

Every ``eval.every_steps`` the policy samples completions for a fixed held-out prompt set;
the judge scores them (``eval/judge_score``) and the KL to the reference is estimated on the
same samples (``eval/kl``):

    KL(pi || pi_ref) = E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]
                    ~= mean over samples of (logp_policy - logp_ref)          (nats per sequence)

an unbiased Monte-Carlo estimate only when y is drawn from pi itself: temperature 1 and
top_p 1 (``eval_sampling``), with log-probs under the raw distribution. Single terms can be
negative; their mean converges to a value >= 0. log pi(y|x) comes from a policy-side forward
(or from a generation engine whose weights were synced and verified against the policy:
Completion.logprob_sum), log pi_ref(y|x) from the ReferenceGroup (``as_pair_rows``).

    load_prompts(path, key=) -> list[Prompt]       JSONL ({"prompt": str | messages, ...}) or text lines
    select_prompts(prompts, num=, seed=)           the fixed held-out subset, same for every eval
    eval_sampling(sampling) -> SamplingConfig       temperature 1, top_p 1, same max_new_tokens
    eval_points(total_steps, every_steps) -> steps  0, every eval.every_steps, the last
    as_pair_rows(prompt_ids, completion_ids)        rows a ReferenceActor scores (chosen = rejected)
    kl_estimate(policy_logps, ref_logps) -> float
    eval_metrics(scores=, policy_logps=, ref_logps=, response_lengths=) -> {"eval/judge_score", "eval/kl", ...}
    heldout_record(step=, samples_per_prompt=, seed=, prompts=, scores=, ...) -> dict  the per-sample record
    read_heldout_record(text) -> dict               parsed and checked (ValueError says what is wrong)
    heldout_artifact_path(step) -> "heldout/step_000008.json"; prompt_means(record, field)

Every held-out eval writes its record next to the eval/* means (an MLflow artifact of the
run): the means alone cannot say whether two runs differ by more than the noise, the
per-prompt values can (``ray-dpo compare --paired``).

Pure: no ray, deepspeed or vllm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ray_dpo.config import SamplingConfig

PROMPTS_KEY = "eval.prompts_file"


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    """"<file basename>:<1-based line>": stable across runs, so evals of every run compare."""
    prompt: Any
    """A string, or a list of chat messages ({"role", "content"})."""


def _valid_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def load_prompts(path: str, *, key: str = PROMPTS_KEY) -> list[Prompt]:
    """Prompts from a JSONL file (each row an object with "prompt": a string or chat messages;
    preference rows work as is) or, for any other extension, one prompt per non-empty line.

    Raises ValueError naming ``key``, the file and the line of the first bad row.
    """
    import os

    base = os.path.basename(path)
    prompts = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    jsonl = path.endswith((".jsonl", ".json"))
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(Prompt(f"{base}:{n}", line.strip()))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{key}: {path} line {n}: not valid JSON ({err.msg})") from None
        value = row.get("prompt") if isinstance(row, dict) else None
        if not _valid_prompt(value):
            raise ValueError(f"{key}: {path} line {n}: expected an object with \"prompt\": a non-empty "
                             "string or a list of {role, content} messages")
        prompts.append(Prompt(f"{base}:{n}", value))
    if not prompts:
        raise ValueError(f"{key}: {path} holds no prompt")
    return prompts


def select_prompts(prompts: Sequence[Prompt], *, num: int, seed: int) -> list[Prompt]:
    """A seeded subset of ``num`` prompts (all if fewer), in file order.

    The same for every eval of a run and for every run with the same seed, so offline and
    online runs are scored on the same prompts.
    """
    if num < 1:
        raise ValueError(f"eval.num_prompts must be >= 1, got {num}")
    if len(prompts) <= num:
        return list(prompts)
    keep = sorted(random.Random(f"ray_dpo.eval.{seed}").sample(range(len(prompts)), num))
    return [prompts[i] for i in keep]


def eval_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """Sampling for the held-out eval: draws from pi itself (temperature 1, top_p 1), which
    the KL estimate needs; keeps max_new_tokens."""
    return dataclasses.replace(sampling, temperature=1.0, top_p=1.0)


def eval_points(total_steps: int, every_steps: int) -> list[int]:
    """The completed-step counts a held-out eval samples at: 0, every ``every_steps`` (0: none
    between) and the run's last step."""
    points = {0, total_steps}
    if every_steps:
        points.update(range(every_steps, total_steps, every_steps))
    return sorted(points)


def as_pair_rows(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                 *, id_prefix: str = "eval-sample:") -> list[dict]:
    """Tokenized pair rows (CONTRACTS.md) whose chosen and rejected are the same sample.

    The ReferenceGroup scores pair rows; with chosen = rejected its ref_chosen_logp is
    log pi_ref(sample | prompt). (Twice the compute of a single-sequence API, but eval sets
    are small.)
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    return [{"pair_id": f"{id_prefix}{i}", "prompt_ids": list(p), "chosen_ids": list(c),
             "rejected_ids": list(c), "truncated": False}
            for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]


def kl_estimate(policy_logps: Sequence[float], ref_logps: Sequence[float]) -> float:
    """mean_i (policy_logps[i] - ref_logps[i]): KL(pi || pi_ref) in nats per sequence,
    estimated on samples y_i ~ pi. Inputs: summed response log-probs, one per sample."""
    if len(policy_logps) != len(ref_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs but {len(ref_logps)} reference log-probs")
    if not policy_logps:
        raise ValueError("no samples to estimate the KL on")
    diffs = [float(p) - float(r) for p, r in zip(policy_logps, ref_logps)]
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError("non-finite log-prob: a sample has probability 0 under the policy or the reference")
    return sum(diffs) / len(diffs)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def eval_metrics(*, scores: Sequence[float], policy_logps: Optional[Sequence[float]] = None,
                 ref_logps: Optional[Sequence[float]] = None,
                 response_lengths: Optional[Sequence[int]] = None) -> dict[str, float]:
    """The eval/ metrics of one held-out eval.

    scores: judge scores, one per sample. policy_logps / ref_logps: summed log-probs of the
    same samples (both or neither). response_lengths: tokens per sample.
    Keys: eval/judge_score (mean), eval/judge_score_std, eval/judge_score_se (the standard
    error of that mean, std / sqrt(samples)), eval/samples, and with log-probs eval/kl (nats
    per sequence) and eval/kl_se; with lengths eval/response_len (mean tokens) and, with
    log-probs too, eval/kl_per_token (total log-ratio / total tokens). The standard errors
    treat samples as independent (several samples of one prompt are not quite).
    """
    if not scores:
        raise ValueError("no judge scores")
    mean, std = _mean_std([float(s) for s in scores])
    out = {"eval/judge_score": mean, "eval/judge_score_std": std, "eval/judge_score_se": std / math.sqrt(len(scores)),
           "eval/samples": float(len(scores))}
    if (policy_logps is None) != (ref_logps is None):
        raise ValueError("pass both policy_logps and ref_logps, or neither")
    if policy_logps is not None:
        if len(policy_logps) != len(scores):
            raise ValueError(f"{len(scores)} scores but {len(policy_logps)} log-probs")
        out["eval/kl"] = kl_estimate(policy_logps, ref_logps)
        _, kl_std = _mean_std([float(p) - float(r) for p, r in zip(policy_logps, ref_logps)])
        out["eval/kl_se"] = kl_std / math.sqrt(len(scores))
    if response_lengths is not None:
        if len(response_lengths) != len(scores):
            raise ValueError(f"{len(scores)} scores but {len(response_lengths)} lengths")
        out["eval/response_len"] = sum(response_lengths) / len(response_lengths)
        if policy_logps is not None and sum(response_lengths) > 0:
            out["eval/kl_per_token"] = out["eval/kl"] * len(scores) / sum(response_lengths)
    return out


# --------------------------------------------------------------------------- per-sample records

HELDOUT_DIR = "heldout"
RECORD_FORMAT = 1
RECORD_FIELDS = ("scores", "log_ratios", "response_lengths")
"""Per-prompt lists, one value per sample: the judge score, log pi(y|x) - log pi_ref(y|x)
(what eval/kl averages) and the response length in tokens."""


def heldout_artifact_path(step: int) -> str:
    """Zero-padded so the artifact listing sorts by step."""
    return f"{HELDOUT_DIR}/step_{step:06d}.json"


def heldout_record(*, step: int, samples_per_prompt: int, seed: int, prompts: Sequence[Any],
                   scores: Sequence[float], policy_logps: Sequence[float], ref_logps: Sequence[float],
                   response_lengths: Sequence[int], max_new_tokens: Optional[int] = None) -> dict:
    """The per-sample values of one held-out eval, grouped by prompt (JSON-ready).

    prompts: one per prompt, as the judge reads it (str or chat messages). The other
    sequences are flat, prompt-major: samples_per_prompt values per prompt, in the order
    eval_metrics got them. seed: the eval's sampling seed (two runs sampled with the same
    seed drew their samples from the same random numbers: a paired comparison then has
    less noise). max_new_tokens: the eval's limit (eval/kl is summed over the tokens).
    """
    n = samples_per_prompt
    if n < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {n}")
    flat = {"scores": scores, "policy_logps": policy_logps, "ref_logps": ref_logps,
            "response_lengths": response_lengths}
    for name, values in flat.items():
        if len(values) != len(prompts) * n:
            raise ValueError(f"{len(prompts)} prompts x {n} samples but {len(values)} {name}")
    ratios = [float(p) - float(r) for p, r in zip(policy_logps, ref_logps)]
    return {"format": RECORD_FORMAT, "step": int(step), "samples_per_prompt": n, "seed": int(seed),
            "max_new_tokens": max_new_tokens,
            "prompts": [{"prompt": prompt,
                         "scores": [float(v) for v in scores[i * n:(i + 1) * n]],
                         "log_ratios": ratios[i * n:(i + 1) * n],
                         "response_lengths": [int(v) for v in response_lengths[i * n:(i + 1) * n]]}
                        for i, prompt in enumerate(prompts)]}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"not a held-out record: {what}")


def read_heldout_record(text: str) -> dict:
    """A record heldout_record wrote (as JSON text), checked: every prompt has a valid
    prompt and samples_per_prompt finite values in each RECORD_FIELDS list.

    Raises ValueError saying what is wrong (a record from another tool, a truncated file).
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not a held-out record: invalid JSON ({err.msg})") from None
    _check(isinstance(record, dict), "expected a JSON object")
    for key in ("step", "samples_per_prompt", "seed"):
        _check(isinstance(record.get(key), int) and not isinstance(record.get(key), bool), f"{key} is not an integer")
    _check(record.get("format", RECORD_FORMAT) == RECORD_FORMAT, f"format {record.get('format')} is not "
           f"{RECORD_FORMAT}")
    n = record["samples_per_prompt"]
    _check(n >= 1, "samples_per_prompt < 1")
    prompts = record.get("prompts")
    _check(isinstance(prompts, list) and bool(prompts), "no prompts")
    for i, entry in enumerate(prompts):
        _check(isinstance(entry, dict) and _valid_prompt(entry.get("prompt")), f"prompt {i} has no valid prompt")
        for name in RECORD_FIELDS:
            values = entry.get(name)
            _check(isinstance(values, list) and len(values) == n, f"prompt {i}: {name} does not hold {n} values")
            _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values),
                   f"prompt {i}: {name} holds a non-number")
    record.setdefault("max_new_tokens", None)
    return record


def prompt_means(record: dict, name: str) -> list[float]:
    """Per prompt, the mean over its samples of ``name`` (one of RECORD_FIELDS): the unit a
    paired comparison differences (samples of one prompt are not independent)."""
    if name not in RECORD_FIELDS:
        raise ValueError(f"{name!r} is not one of {RECORD_FIELDS}")
    return [sum(entry[name]) / len(entry[name]) for entry in record["prompts"]]
