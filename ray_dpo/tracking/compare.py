"""Compare the runs of one MLflow experiment: a side-by-side table and PNG plots.

    compare(tracking_uri=, experiment=, out_dir=, paired=, step=) -> CompareReport(table, files, notes, paired)
        load_runs(client, experiment)            RunData per run (final values + histories, sweep tags)
        format_table(runs) -> str                metrics as rows, runs side by side (pure)
        plot_metrics(runs, path)                 one subplot per metric against step, a line per run
        plot_frontier(runs, path)                eval/judge_score against eval/kl, a line per run
                                                 (the DPO paper's reward/KL frontier)
        plot_sweep(trials, name, path)           a sweep's trials: final judge score against KL,
                                                 a line along the swept value (sweep_lines)
        paired_comparison(client, runs, a, b)    two runs' held-out records, paired by prompt (paired.py)

Held-out points carry +-1 standard error bars (eval/judge_score_se, eval/kl_se: the spread
of the samples / sqrt(samples)) where the run logged them: two runs whose bars overlap
widely are not shown apart by that eval. ``--paired`` gives the test that says so.

Used by ``ray-dpo compare``. Plots use matplotlib's object API (Figure + Agg canvas), never
pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ray_dpo.tracking.paired import PairedError  # noqa: F401 - what `ray-dpo compare --paired` refuses with

MODE_TAG = "ray_dpo.mode"
LOSS_TAG = "ray_dpo.loss"

# Rows of the table, in order; a metric no run has is left out.
TABLE_METRICS = (
    "train/loss", "train/rewards/accuracies", "train/rewards/margins",
    "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
    "eval/judge_score", "eval/kl",
    "online/judge_score_mean", "online/pairs_kept", "online/gen_tokens_per_s",
    "sync/max_logprob_diff", "sync/seconds", "perf/tokens_per_s",
)
PLOT_METRICS = (
    "train/loss", "train/rewards/accuracies", "train/rewards/margins",
    "eval/loss", "eval/rewards/accuracies", "eval/judge_score", "eval/kl", "online/judge_score_mean",
)
JUDGE_KEY, KL_KEY = "eval/judge_score", "eval/kl"
# The standard error of each held-out mean (runs logged before they existed have none).
SE_KEYS = {JUDGE_KEY: "eval/judge_score_se", KL_KEY: "eval/kl_se"}
# Tags of `ray-dpo sweep` (ray_dpo/sweep/runner.py): the sweep's name on the parent and its
# trials, "1" on the parent, a trial's overrides (JSON object) and outcome.
SWEEP_TAG, PARENT_TAG = "ray_dpo.sweep", "ray_dpo.sweep.parent"
OVERRIDES_TAG, SWEEP_STATUS_TAG = "ray_dpo.sweep.overrides", "ray_dpo.sweep.status"
UNFINISHED = ("stopped", "failed")  # trial outcomes drawn hollow: the last point is not the trial's end
# Params that define the held-out measurement: runs differing in one of them do not give
# comparable eval/judge_score or eval/kl (e.g. KL is summed over sampled tokens, so longer
# max_new_tokens alone raises it).
EVAL_PARAMS = ("eval.prompts_file", "eval.num_prompts", "eval.samples_per_prompt", "eval.max_new_tokens",
               "eval.judge.function", "eval.judge.reward_model")


def heldout_params(params: dict[str, str]) -> dict[str, str]:
    """A run's EVAL_PARAMS as the run used them: eval.max_new_tokens and eval.judge fall back
    to online.sampling.max_new_tokens and online.judge when unset (runs logged before eval
    had them too)."""
    unset = ("None", "")
    out = {k: params[k] for k in EVAL_PARAMS[:3] if k in params}
    tokens = params.get("eval.max_new_tokens", "None")
    out["eval.max_new_tokens"] = tokens if tokens not in unset else params.get("online.sampling.max_new_tokens", "None")
    kinds = ("function", "reward_model")
    own = any(params.get(f"eval.judge.{kind}", "None") not in unset for kind in kinds)
    for kind in kinds:
        out[f"eval.judge.{kind}"] = params.get(f"{'eval' if own else 'online'}.judge.{kind}", "None")
    return out


@dataclass
class RunData:
    run_id: str
    name: str
    mode: str
    status: str
    final: dict[str, float] = field(default_factory=dict)
    """Last logged value of every metric."""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """(step, value) sorted by step, for the metrics that are tabled or plotted."""
    params: dict[str, str] = field(default_factory=dict)
    """The run's EVAL_PARAMS (as logged; absent keys left out)."""
    loss: str = "?"
    """loss.type (the ray_dpo.loss tag, else the logged param): train/rewards/* and
    eval/rewards/* keep their names for every loss, but what a reward is depends on it."""
    sweep: Optional[str] = None
    """The sweep this run is a trial of (None: not a trial)."""
    overrides: dict = field(default_factory=dict)
    """A trial's overrides, {dotted key: value}."""
    sweep_status: Optional[str] = None
    """A trial's outcome: finished | stopped (early, by the scheduler) | failed."""

    @property
    def steps(self) -> int:
        """The largest step any loaded metric was logged at (0 without metrics)."""
        return max((s for points in self.history.values() for s, _ in points), default=0)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.mode})"


@dataclass
class CompareReport:
    table: str
    files: list[str]
    notes: list[str]
    paired: str = ""
    """The --paired comparisons, printed after the table (empty without --paired)."""


class ExperimentNotFound(LookupError):
    pass


# --------------------------------------------------------------------------- loading (mlflow)


def load_runs(client, experiment: str) -> list[RunData]:
    """Every run of ``experiment``, oldest first, except sweep parents (a sweep's trials are
    the runs; the parent only groups them); ExperimentNotFound lists the existing ones."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ExperimentNotFound(f"no MLflow experiment named {experiment!r} in this store; "
                                 f"experiments: {', '.join(names) or '(none)'}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    wanted = set(TABLE_METRICS) | set(PLOT_METRICS) | set(SE_KEYS.values())
    out = []
    for run in runs:
        tags = run.data.tags
        if tags.get(PARENT_TAG) == "1":
            continue
        final = dict(run.data.metrics)
        history = {}
        for key in sorted(wanted & set(final)):
            points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            history[key] = points
        out.append(RunData(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                           mode=run.data.tags.get(MODE_TAG, "?"), status=run.info.status,
                           loss=run.data.tags.get(LOSS_TAG, run.data.params.get("loss.type", "?")),
                           final=final, history=history, params=heldout_params(run.data.params),
                           sweep=tags.get(SWEEP_TAG), overrides=parse_overrides(tags.get(OVERRIDES_TAG)),
                           sweep_status=tags.get(SWEEP_STATUS_TAG)))
    return out


def parse_overrides(text: Optional[str]) -> dict:
    """The overrides tag as a dict ({} when absent or not a JSON object: the run still compares)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def comparability_notes(runs: Sequence[RunData]) -> list[str]:
    """A note per EVAL_PARAM that differs among the runs with held-out metrics."""
    measured = [r for r in runs if r.history.get(JUDGE_KEY) or r.history.get(KL_KEY)]
    notes = []
    for key in EVAL_PARAMS:
        values = {r.name: r.params.get(key, "None") for r in measured}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{name}={value}" for name, value in values.items())
            notes.append(f"{JUDGE_KEY} / {KL_KEY} are not comparable across these runs: {key} differs ({shown})")
    return notes


# --------------------------------------------------------------------------- table (pure)


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() and 2 <= abs(value) < 1e9:  # counts; 0 and 1 are often rates
        return str(int(value))
    if value and abs(value) < 1e-3:
        return f"{value:.2e}"  # e.g. sync/max_logprob_diff: 0.0000 would hide it
    return f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"


def table_rows(runs: Sequence[RunData], metrics: Sequence[str] = TABLE_METRICS) -> list[list[str]]:
    """Header row then one row per field: run, run id, mode, loss, status, steps, then each metric
    that at least one run has (its final value, '-' where a run lacks it)."""
    rows = [["run"] + [r.name for r in runs],
            ["run id"] + [r.run_id[:8] for r in runs],
            ["mode"] + [r.mode for r in runs],
            ["loss"] + [r.loss for r in runs],
            ["status"] + [r.status for r in runs]]
    if any(r.sweep for r in runs):  # what each trial set, and how it ended
        rows += [["sweep"] + [r.sweep or "-" for r in runs],
                 ["overrides"] + [format_overrides(r.overrides) for r in runs],
                 ["trial"] + [r.sweep_status or "-" for r in runs]]
    rows.append(["steps"] + [str(r.steps) for r in runs])
    for key in metrics:
        if any(key in r.final for r in runs):
            rows.append([key] + [_fmt(r.final.get(key)) for r in runs])
    return rows


def format_value(value: Any) -> str:
    """An override value as the config would say it: true, 0.1, online (no spaces)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def format_overrides(overrides: dict) -> str:
    """key=value pairs joined by ';' ('-' for none): one table cell."""
    return ";".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "-"


def format_table(runs: Sequence[RunData], metrics: Sequence[str] = TABLE_METRICS) -> str:
    rows = table_rows(runs, metrics)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figure(nrows: int, ncols: int, *, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def se_at(run: RunData, key: str) -> dict[int, float]:
    """{step: standard error} of a held-out metric ({} when the run logged none)."""
    return dict(run.history.get(SE_KEYS.get(key, ""), ()))


def _errors(points: Sequence[tuple[int, float]], se: dict[int, float]) -> Optional[list[float]]:
    """Error bar lengths along ``points``: NaN (no bar) where a step has no SE; None when none has."""
    if not any(step in se for step, _ in points):
        return None
    return [se.get(step, math.nan) for step, _ in points]


def metrics_figure(runs: Sequence[RunData], metrics: Sequence[str] = PLOT_METRICS):
    """One subplot per metric (value against step), a line per run; the held-out metrics
    with +-1 SE bars. None when no run has a history of any of ``metrics``."""
    present = [k for k in metrics if any(r.history.get(k) for r in runs)]
    if not present:
        return None
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.2 * ncols, height=3.2 * nrows)
    colors = _colors(len(runs))
    last_step = max(r.steps for r in runs)
    for i, key in enumerate(present):
        ax = axes[i // ncols][i % ncols]
        for run, color in zip(runs, colors):
            points = run.history.get(key)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=color, label=run.label, linestyle="-" if run.mode != "online" else "--",
                        marker="o" if len(points) < 30 else None, markersize=3)
                errors = _errors(points, se_at(run, key))
                if errors is not None:
                    ax.errorbar(steps, values, yerr=errors, fmt="none", ecolor=color, elinewidth=1, capsize=2,
                                alpha=0.7)
        ax.set_title(key + (" (±1 SE)" if key in SE_KEYS and any(se_at(r, key) for r in runs) else ""), fontsize=10)
        ax.set_xlim(-1, last_step + 1)  # one step axis for every panel
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for j in range(len(present), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = {lab for lab in labels}
    for ax in (a for row in axes for a in row):  # a run may be absent from the first subplot
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=9)
    fig.suptitle("metrics against step")
    return fig


def plot_metrics(runs: Sequence[RunData], path: str, metrics: Sequence[str] = PLOT_METRICS) -> Optional[str]:
    """Write metrics_figure to ``path``. Returns a note instead of writing when no run has a
    history of any of ``metrics``."""
    fig = metrics_figure(runs, metrics)
    if fig is None:
        return f"skipped {os.path.basename(path)}: no run logged any of {', '.join(metrics)}"
    fig.savefig(path, dpi=100)
    return None


@dataclass(frozen=True)
class FrontierPoint:
    step: int
    kl: float
    score: float
    kl_se: float = math.nan
    """NaN: not logged at this step (no bar)."""
    score_se: float = math.nan


def frontier_points(run: RunData) -> list[FrontierPoint]:
    """The steps where both eval/kl and eval/judge_score were logged, with their SEs."""
    kl = dict(run.history.get(KL_KEY, ()))
    kl_se, score_se = se_at(run, KL_KEY), se_at(run, JUDGE_KEY)
    return [FrontierPoint(s, kl[s], v, kl_se.get(s, math.nan), score_se.get(s, math.nan))
            for s, v in run.history.get(JUDGE_KEY, ()) if s in kl]


def _error_bars(ax, points: Sequence[FrontierPoint], color) -> None:
    """+-1 SE on both axes where logged; nothing for runs logged before the SEs were."""
    has_x = any(not math.isnan(p.kl_se) for p in points)
    has_y = any(not math.isnan(p.score_se) for p in points)
    if has_x or has_y:
        ax.errorbar([p.kl for p in points], [p.score for p in points],
                    xerr=[p.kl_se for p in points] if has_x else None,
                    yerr=[p.score_se for p in points] if has_y else None,
                    fmt="none", ecolor=color, elinewidth=1, capsize=2, alpha=0.7)


def frontier_figure(runs: Sequence[RunData]):
    """eval/judge_score against eval/kl, a line per run through its eval steps (each point
    annotated with its step, +-1 SE bars where logged). None when no run has both metrics."""
    series = [(run, frontier_points(run)) for run in runs]
    series = [(run, pts) for run, pts in series if pts]
    if not series:
        return None
    fig, axes = _figure(1, 1, width=6.5, height=4.8)
    ax = axes[0][0]
    colors = dict(zip([r.run_id for r in runs], _colors(len(runs))))
    for run, pts in series:
        color = colors[run.run_id]
        ax.plot([p.kl for p in pts], [p.score for p in pts], color=color, marker="o", markersize=4, label=run.label,
                linestyle="-" if run.mode != "online" else "--")
        _error_bars(ax, pts, color)
        for i, p in enumerate(pts):  # every point: the order along a line shows
            ax.annotate(f"step {p.step}" if i == len(pts) - 1 else str(p.step), (p.kl, p.score),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.margins(x=0.12, y=0.08)  # room for the step annotations at the right end
    ax.set_xlabel(f"{KL_KEY} (nats, KL to the reference on held-out samples)")
    ax.set_ylabel(JUDGE_KEY)
    ax.set_title("judge score against KL (reward/KL frontier; bars ±1 SE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def plot_frontier(runs: Sequence[RunData], path: str) -> Optional[str]:
    """Write frontier_figure to ``path``. Returns a note instead of writing when no run has
    both metrics, or naming the runs left out."""
    fig = frontier_figure(runs)
    if fig is None:
        return (f"skipped {os.path.basename(path)}: no run logged both {JUDGE_KEY} and {KL_KEY} "
                "at the same step (set eval.prompts_file and a judge)")
    fig.savefig(path, dpi=100)
    missing = [r.name for r in runs if not frontier_points(r)]
    if missing:
        return f"{os.path.basename(path)}: no {JUDGE_KEY}/{KL_KEY} for run(s) {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------- sweeps


def sweeps(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """{sweep name: its trials}, in the order the sweeps first appear."""
    out: dict[str, list[RunData]] = {}
    for run in runs:
        if run.sweep:
            out.setdefault(run.sweep, []).append(run)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def order_key(trials: Sequence[RunData]) -> Optional[str]:
    """The swept numeric key with the most distinct values (ties: the first in name order),
    the one a line runs along (e.g. loss.beta); None when no override is a number."""
    values: dict[str, set] = {}
    for run in trials:
        for key, value in run.overrides.items():
            if _is_number(value):
                values.setdefault(key, set()).add(value)
    if not values:
        return None
    return min(values, key=lambda k: (-len(values[k]), k))


@dataclass(frozen=True)
class SweepLine:
    label: str
    """The other overrides this line's trials share ('' when there are none)."""
    runs: list
    """Its trials, ordered by the order key's value."""
    points: list
    """Each trial's last FrontierPoint, in the same order."""


def sweep_lines(trials: Sequence[RunData]) -> tuple[Optional[str], list[SweepLine], list[str]]:
    """(order key, a line per combination of the other overrides, trials left out for lack
    of a held-out point). A trial's point is its last step with both eval/kl and eval/judge_score."""
    key = order_key(trials)
    groups: dict[str, list[RunData]] = {}
    missing = []
    for run in trials:
        if not frontier_points(run):
            missing.append(run.name)
            continue
        others = {k: v for k, v in run.overrides.items() if k != key}
        groups.setdefault(format_overrides(others) if others else "", []).append(run)

    def position(run: RunData):
        value = run.overrides.get(key)
        return (0, value, run.name) if _is_number(value) else (1, 0, run.name)

    lines = []
    for label, members in groups.items():
        members = sorted(members, key=position)
        lines.append(SweepLine(label, members, [frontier_points(r)[-1] for r in members]))
    return key, lines, missing


def _point_label(run: RunData, key: Optional[str]) -> str:
    """'beta=0.1' (the order key's last dotted part), or every override without a numeric key."""
    if key is None:
        return format_overrides(run.overrides)
    value = run.overrides.get(key)
    return f"{key.rsplit('.', 1)[-1]}={format_value(value) if value is not None else '?'}"


def sweep_figure(trials: Sequence[RunData], name: str):
    """A sweep's trials on the judge/KL plane: each trial's final (eval/kl, eval/judge_score)
    with +-1 SE bars, joined along the order key, one line per combination of the other
    overrides; trials that did not finish (stopped early or failed) hollow. None when no
    trial has a held-out point."""
    key, lines, _ = sweep_lines(trials)
    if not lines:
        return None
    fig, axes = _figure(1, 1, width=6.5, height=4.8)
    ax = axes[0][0]
    for line, color in zip(lines, _colors(len(lines))):
        pts = line.points
        ax.plot([p.kl for p in pts], [p.score for p in pts], color=color, label=line.label or name)
        _error_bars(ax, pts, color)
        for hollow in (False, True):
            chosen = [(r, p) for r, p in zip(line.runs, pts) if (r.sweep_status in UNFINISHED) == hollow]
            if chosen:
                ax.plot([p.kl for _, p in chosen], [p.score for _, p in chosen], linestyle="none", marker="o",
                        markersize=6, color=color, markerfacecolor="none" if hollow else color)
        for run, p in zip(line.runs, pts):
            ax.annotate(_point_label(run, key), (p.kl, p.score), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel(f"{KL_KEY} (nats), last held-out eval of each trial")
    ax.set_ylabel(JUDGE_KEY)
    along = f" along {key}" if key else ""
    ax.set_title(f"sweep {name}: judge score against KL{along}\n(bars ±1 SE; hollow: stopped early or failed)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if any(line.label for line in lines):
        ax.legend(fontsize=9)
    return fig


def sweep_file(name: str) -> str:
    """sweep_<name>_frontier.png, the name made safe for a file name."""
    return f"sweep_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}_frontier.png"


def plot_sweep(trials: Sequence[RunData], name: str, path: str) -> Optional[str]:
    """Write sweep_figure to ``path``; a note when no trial (or not every one) has a held-out point."""
    fig = sweep_figure(trials, name)
    if fig is None:
        return (f"skipped {os.path.basename(path)}: no trial of sweep {name!r} logged both {JUDGE_KEY} and "
                f"{KL_KEY} (set eval.prompts_file and a judge)")
    fig.savefig(path, dpi=100)
    _, _, missing = sweep_lines(trials)
    if missing:
        return f"{os.path.basename(path)}: no {JUDGE_KEY}/{KL_KEY} for trial(s) {', '.join(missing)}"
    return None


def write_csv(runs: Sequence[RunData], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(table_rows(runs))


# --------------------------------------------------------------------------- paired


def paired_comparison(client, runs: Sequence[RunData], ref_a: str, ref_b: str, *, step: Optional[int] = None):
    """A paired.Comparison of runs ``ref_a`` and ``ref_b`` (names or run-id prefixes) at
    ``step`` (None: each run's last held-out step). Raises paired.PairedError when a run is
    unknown, ambiguous or has no record there, or the two records do not pair."""
    from ray_dpo.tracking import paired

    a, b = paired.resolve_run(runs, ref_a), paired.resolve_run(runs, ref_b)
    step_a, step_b = paired.pick_step(client, a, step), paired.pick_step(client, b, step)
    record_a, record_b = paired.load_record(client, a.run_id, step_a), paired.load_record(client, b.run_id, step_b)
    try:
        results = paired.paired_metrics(record_a, record_b)
    except paired.PairedError as err:
        raise paired.PairedError(f"--paired {a.name} {b.name}: refusing to pair step {step_a} of A with step "
                                 f"{step_b} of B: {err}") from None
    notes = [f"--paired {a.name} {b.name}: {note}" for note in comparability_notes([a, b])]
    return paired.Comparison(a=a, b=b, step_a=step_a, step_b=step_b, record=record_a, results=results, notes=notes)


# --------------------------------------------------------------------------- all together


def _fresh(path: str) -> str:
    """``path`` with an older file of that name gone: a file skipped now must not leave a stale one behind."""
    if os.path.exists(path):
        os.remove(path)
    return path


def compare(*, tracking_uri: str, experiment: str, out_dir: str, paired: Sequence[tuple[str, str]] = (),
            step: Optional[int] = None) -> CompareReport:
    """Load the experiment's runs, and write summary.csv, metrics_vs_step.png, judge_vs_kl.png
    and a sweep_<name>_frontier.png per sweep (each plot skipped with a note when the runs
    lack its metrics); with ``paired`` [(A, B)], paired.csv and the paired tests. The pairs
    are checked before anything is written (PairedError)."""
    from ray_dpo.tracking.mlflow_sink import mlflow_client
    from ray_dpo.tracking.paired import format_paired, write_paired_csv

    client = mlflow_client(tracking_uri)
    runs = load_runs(client, experiment)
    if not runs:
        return CompareReport(table="", files=[], notes=[f"experiment {experiment!r} has no runs"])
    comparisons = [paired_comparison(client, runs, a, b, step=step) for a, b in paired]
    os.makedirs(out_dir, exist_ok=True)
    files, notes = [], []
    csv_path = os.path.join(out_dir, "summary.csv")
    write_csv(runs, csv_path)
    files.append(csv_path)
    plots = [("metrics_vs_step.png", plot_metrics), ("judge_vs_kl.png", plot_frontier)]
    plots += [(sweep_file(name), lambda rs, path, trials=trials, name=name: plot_sweep(trials, name, path))
              for name, trials in sweeps(runs).items()]
    for name, plot in plots:
        path = _fresh(os.path.join(out_dir, name))
        note = plot(runs, path)
        if os.path.exists(path):
            files.append(path)
        if note:
            notes.append(note)
    notes += comparability_notes(runs)
    paired_path = _fresh(os.path.join(out_dir, "paired.csv"))
    if comparisons:
        write_paired_csv(comparisons, paired_path)
        files.append(paired_path)
        notes += [note for c in comparisons for note in c.notes]
    return CompareReport(table=format_table(runs), files=files, notes=notes, paired=format_paired(comparisons))
