"""Paired comparison of two runs' held-out evals: `ray-dpo compare --paired A B`.

    resolve_run(runs, ref) -> run             a run name or run-id prefix (PairedError lists the runs)
    heldout_steps(client, run_id) -> [step]   the steps of the run's heldout/step_*.json records
    load_record(client, run_id, step)         one record, read and checked (evaluation.read_heldout_record)
    record_mismatch(a, b) -> str | None       why two records do not pair (prompts, samples, seed, tokens)
    paired_metrics(a, b) -> [(metric, Paired)] eval/judge_score and eval/kl, paired by prompt (pure)
    format_paired(comparisons) -> str; write_paired_csv(comparisons, path)

eval/judge_score and eval/kl are means over samples; two runs' means differ by the noise of
the sampling alone. Both runs scored the same prompts, so the per-prompt means pair up and a
paired t-test (stats.paired_difference) says whether the difference is more than that noise.
The prompt (the unit that is independent) is what is paired; several samples of one prompt
are not independent draws, so they are averaged first.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ray_dpo.engines.evaluation import HELDOUT_DIR, heldout_artifact_path, prompt_means, read_heldout_record
from ray_dpo.tracking.stats import Paired, paired_difference

# metric -> the record field whose per-prompt means it is the mean of
PAIRED_METRICS = (("eval/judge_score", "scores"), ("eval/kl", "log_ratios"))
_STEP_FILE = re.compile(r"step_(\d+)\.json$")


class PairedError(ValueError):
    """A paired comparison that cannot be made (unknown run, no records, records that differ)."""


@dataclass
class Comparison:
    a: Any  # RunData
    b: Any
    step_a: int
    step_b: int
    record: dict  # a's (prompts, samples_per_prompt and seed are b's too)
    results: list[tuple[str, Paired]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- finding runs and records


def resolve_run(runs: Sequence[Any], ref: str) -> Any:
    """The one run whose name is ``ref`` or whose run id starts with it."""
    matches = [r for r in runs if r.name == ref or r.run_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(f"{r.name} ({r.run_id[:8]})" for r in (matches or runs))
    if not matches:
        raise PairedError(f"--paired: no run named {ref!r} or with a run id starting with it; runs: {listed}")
    raise PairedError(f"--paired: {ref!r} matches {len(matches)} runs: {listed}; pass a run-id prefix")


def heldout_steps(client, run_id: str) -> list[int]:
    """Steps with a held-out record, ascending (empty: none written)."""
    steps = []
    for info in client.list_artifacts(run_id, HELDOUT_DIR):
        match = _STEP_FILE.search(info.path)
        if match and not info.is_dir:
            steps.append(int(match.group(1)))
    return sorted(steps)


def load_record(client, run_id: str, step: int) -> dict:
    """The run's record at ``step``, checked (PairedError when it is not one)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar
    path = heldout_artifact_path(step)
    with tempfile.TemporaryDirectory(prefix="ray_dpo-heldout-") as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        with open(local, encoding="utf-8") as f:
            text = f.read()
    try:
        return read_heldout_record(text)
    except ValueError as err:
        raise PairedError(f"{path} of run {run_id[:8]}: {err}") from None


def pick_step(client, run: Any, step: Optional[int]) -> int:
    """``step`` if the run has a record there, else (step None) its last held-out step."""
    steps = heldout_steps(client, run.run_id)
    if not steps:
        raise PairedError(f"run {run.name} ({run.run_id[:8]}) has no held-out records ({HELDOUT_DIR}/step_*.json): "
                          "it ran without eval.prompts_file or before the records were written")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise PairedError(f"run {run.name} has no held-out record at step {step}; its steps: "
                          f"{', '.join(map(str, steps))}")
    return step


# --------------------------------------------------------------------------- pairing (pure)


def _prompt_keys(record: dict) -> list[tuple[str, int]]:
    """A key per prompt: its text (canonical JSON) and which repeat of that text it is."""
    seen: dict[str, int] = {}
    keys = []
    for entry in record["prompts"]:
        text = json.dumps(entry["prompt"], sort_keys=True, ensure_ascii=False)
        seen[text] = seen.get(text, 0) + 1
        keys.append((text, seen[text]))
    return keys


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def record_mismatch(a: dict, b: dict) -> Optional[str]:
    """What keeps two records from pairing, None when they evaluated the same prompts with
    the same samples_per_prompt, sampling seed and (when both say) max_new_tokens."""
    for key in ("samples_per_prompt", "seed", "max_new_tokens"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            return f"{key} differs (A {a[key]}, B {b[key]})"
    keys_a, keys_b = _prompt_keys(a), _prompt_keys(b)
    if set(keys_a) != set(keys_b):
        only_a = [k for k in keys_a if k not in set(keys_b)]
        only_b = [k for k in keys_b if k not in set(keys_a)]
        first = f"A only: {_short(only_a[0][0])}" if only_a else f"B only: {_short(only_b[0][0])}"
        return (f"the prompts differ (A {len(keys_a)}, B {len(keys_b)}; {len(only_a)} only in A, "
                f"{len(only_b)} only in B; {first})")
    return None


def paired_metrics(a: dict, b: dict, *, level: float = 0.95) -> list[tuple[str, Paired]]:
    """Per PAIRED_METRICS, the paired test of a's per-prompt means against b's, prompts
    matched by text (the records' order does not matter). Raises PairedError on a mismatch."""
    problem = record_mismatch(a, b)
    if problem:
        raise PairedError(problem)
    index_b = {key: i for i, key in enumerate(_prompt_keys(b))}
    order = [index_b[key] for key in _prompt_keys(a)]
    out = []
    for metric, name in PAIRED_METRICS:
        means_a, means_b = prompt_means(a, name), prompt_means(b, name)
        try:
            out.append((metric, paired_difference(means_a, [means_b[i] for i in order], level=level)))
        except ValueError as err:
            raise PairedError(f"{metric}: {err}") from None
    return out


# --------------------------------------------------------------------------- output


def _num(value: float) -> str:
    return f"{value:+.4f}" if abs(value) >= 1e-4 or value == 0 else f"{value:+.2e}"


def _p(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def verdict(result: Paired) -> str:
    level = f"{result.level * 100:g}%"
    return f"significant at {level}" if result.significant else "not significant (inside the noise)"


def format_paired(comparisons: Sequence[Comparison]) -> str:
    """A header line per comparison, then a line per metric: both means, A-B +- SE, t, p, CI, verdict."""
    lines = []
    for c in comparisons:
        record = c.record
        lines.append(f"# paired: A = {c.a.name} (step {c.step_a}), B = {c.b.name} (step {c.step_b}); "
                     f"{len(record['prompts'])} prompts x {record['samples_per_prompt']} samples, "
                     f"eval seed {record['seed']}; SE and t over prompts")
        width = max(len(metric) for metric, _ in c.results)
        for metric, r in c.results:
            lines.append(f"{metric.ljust(width)}  A {r.mean_a:.4f}  B {r.mean_b:.4f}  A-B {_num(r.mean_diff)} "
                         f"± {r.se:.4f}  t {r.t:.2f}  p {_p(r.p)}  {r.level * 100:g}% CI "
                         f"[{_num(r.ci_low)}, {_num(r.ci_high)}]  {verdict(r)}")
    return "\n".join(lines)


CSV_COLUMNS = ("a", "b", "a_run_id", "b_run_id", "step_a", "step_b", "metric", "prompts", "samples_per_prompt",
               "mean_a", "mean_b", "diff", "se", "t", "df", "p", "ci_low", "ci_high", "level", "significant")


def write_paired_csv(comparisons: Sequence[Comparison], path: str) -> None:
    """One row per comparison and metric, full precision."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for c in comparisons:
            for metric, r in c.results:
                writer.writerow([c.a.name, c.b.name, c.a.run_id, c.b.run_id, c.step_a, c.step_b, metric,
                                 r.n, c.record["samples_per_prompt"], r.mean_a, r.mean_b, r.mean_diff, r.se, r.t,
                                 r.df, r.p, r.ci_low, r.ci_high, r.level, r.significant])


def remove_stale(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
