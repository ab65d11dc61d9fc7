"""Compare the runs of one MLflow experiment: a side-by-side table and PNG plots.

    compare(tracking_uri=, experiment=, out_dir=) -> CompareReport(table, files, notes)
        load_runs(client, experiment)            RunData per run (final values + histories)
        format_table(runs) -> str                metrics as rows, runs side by side (pure)
        plot_metrics(runs, path)                 one subplot per metric against step, a line per run
        plot_frontier(runs, path)                eval/judge_score against eval/kl, a line per run
                                                 (the DPO paper's reward/KL frontier)

Used by ``ray-dpo compare``. Plots use matplotlib's object API (Figure + Agg canvas), never
pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

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


class ExperimentNotFound(LookupError):
    pass


# --------------------------------------------------------------------------- loading (mlflow)


def load_runs(client, experiment: str) -> list[RunData]:
    """Every run of ``experiment``, oldest first; ExperimentNotFound lists the existing ones."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ExperimentNotFound(f"no MLflow experiment named {experiment!r} in this store; "
                                 f"experiments: {', '.join(names) or '(none)'}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    wanted = set(TABLE_METRICS) | set(PLOT_METRICS)
    out = []
    for run in runs:
        final = dict(run.data.metrics)
        history = {}
        for key in sorted(wanted & set(final)):
            points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            history[key] = points
        out.append(RunData(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                           mode=run.data.tags.get(MODE_TAG, "?"), status=run.info.status,
                           loss=run.data.tags.get(LOSS_TAG, run.data.params.get("loss.type", "?")),
                           final=final, history=history,
                           params=heldout_params(run.data.params)))
    return out


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
            ["status"] + [r.status for r in runs],
            ["steps"] + [str(r.steps) for r in runs]]
    for key in metrics:
        if any(key in r.final for r in runs):
            rows.append([key] + [_fmt(r.final.get(key)) for r in runs])
    return rows


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


def plot_metrics(runs: Sequence[RunData], path: str, metrics: Sequence[str] = PLOT_METRICS) -> Optional[str]:
    """Write one subplot per metric (value against step), a line per run. Returns a note
    instead of writing when no run has a history of any of ``metrics``."""
    present = [k for k in metrics if any(r.history.get(k) for r in runs)]
    if not present:
        return f"skipped {os.path.basename(path)}: no run logged any of {', '.join(metrics)}"
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
        ax.set_title(key, fontsize=10)
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
    fig.savefig(path, dpi=100)
    return None


def frontier_points(run: RunData) -> list[tuple[int, float, float]]:
    """(step, kl, judge_score) at the steps where both eval/kl and eval/judge_score were logged."""
    kl = dict(run.history.get(KL_KEY, ()))
    return [(s, kl[s], v) for s, v in run.history.get(JUDGE_KEY, ()) if s in kl]


def plot_frontier(runs: Sequence[RunData], path: str) -> Optional[str]:
    """Write eval/judge_score against eval/kl, a line per run through its eval steps (each
    point annotated with its step). Returns a note instead of writing when no run has both metrics."""
    series = [(run, frontier_points(run)) for run in runs]
    series = [(run, pts) for run, pts in series if pts]
    if not series:
        return (f"skipped {os.path.basename(path)}: no run logged both {JUDGE_KEY} and {KL_KEY} "
                "at the same step (set eval.prompts_file and a judge)")
    fig, axes = _figure(1, 1, width=6.5, height=4.8)
    ax = axes[0][0]
    colors = dict(zip([r.run_id for r in runs], _colors(len(runs))))
    for run, pts in series:
        steps, kls, scores = zip(*pts)
        ax.plot(kls, scores, color=colors[run.run_id], marker="o", markersize=4, label=run.label,
                linestyle="-" if run.mode != "online" else "--")
        for i, (step, kl, score) in enumerate(pts):  # every point: the order along a line shows
            ax.annotate(f"step {step}" if i == len(pts) - 1 else str(step), (kl, score),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=colors[run.run_id])
    ax.margins(x=0.12, y=0.08)  # room for the step annotations at the right end
    ax.set_xlabel(f"{KL_KEY} (nats, KL to the reference on held-out samples)")
    ax.set_ylabel(JUDGE_KEY)
    ax.set_title("judge score against KL (reward/KL frontier)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.savefig(path, dpi=100)
    plotted = {run.run_id for run, _ in series}
    missing = [r.name for r in runs if r.run_id not in plotted]
    if missing:
        return f"{os.path.basename(path)}: no {JUDGE_KEY}/{KL_KEY} for run(s) {', '.join(missing)}"
    return None


def write_csv(runs: Sequence[RunData], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(table_rows(runs))


# --------------------------------------------------------------------------- all together


def compare(*, tracking_uri: str, experiment: str, out_dir: str) -> CompareReport:
    """Load the experiment's runs, and write summary.csv, metrics_vs_step.png and
    judge_vs_kl.png (each plot skipped with a note when the runs lack its metrics)."""
    from ray_dpo.tracking.mlflow_sink import mlflow_client

    runs = load_runs(mlflow_client(tracking_uri), experiment)
    if not runs:
        return CompareReport(table="", files=[], notes=[f"experiment {experiment!r} has no runs"])
    os.makedirs(out_dir, exist_ok=True)
    files, notes = [], []
    csv_path = os.path.join(out_dir, "summary.csv")
    write_csv(runs, csv_path)
    files.append(csv_path)
    for name, plot in (("metrics_vs_step.png", plot_metrics), ("judge_vs_kl.png", plot_frontier)):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)  # a plot skipped now must not leave an older one behind
        note = plot(runs, path)
        if os.path.exists(path):
            files.append(path)
        if note:
            notes.append(note)
    notes += comparability_notes(runs)
    return CompareReport(table=format_table(runs), files=files, notes=notes)
