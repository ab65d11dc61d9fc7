"""The data report for people and for MLflow: what happened to the rows read and why.

``data_report`` gathers the splits' summaries into one JSON-able dict (an MLflow
artifact); ``format_report`` turns that dict into console lines, e.g.

    train: 960 pairs from 1 file(s); read 1000, ok 600, truncated 360, dropped 40, skipped 0; ...
        truncated 360 (36.0% of read): 330 (33.0%) lost the start of the conversation
            (earliest turns dropped) [prompt_turns_dropped]; 45 (4.5%) had a response cut ...
        dropped 40 (4.0% of read): 40 (4.0%) system prompt + role headers + last user ...
        tokens before fitting, p50/p90/p99/max: prompt 610/1490/2380/2950, response ...

(A truncated pair counts under each kind of cut it got, so the truncated causes may add
up to more than the truncated count.)

A split with prompt-only rows (online DPO) counts "rows" and says how many of those read
were prompt-only (``read 512, prompt-only 512, ok 512, ...``).

``data_metrics`` gives the data/* metrics logged at step 0. Cause keys are
``ray_dpo.data.counters.CAUSES``.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ray_dpo.data.counters import CAUSES, DataCounters

if TYPE_CHECKING:  # the pipeline imports ray; the report only reads PairData
    from ray_dpo.data.pipeline import PairData


def data_metrics(counters: DataCounters, prefix: str = "data/") -> dict[str, float]:
    """data/* metrics of one split's counters: data/<status>, data/<status>/<cause> (keys of
    ray_dpo.data.counters.CAUSES), data/tokens/<prompt|response|total>_<p50|p90|p99|max>, and
    data/prompt_only when some rows read were prompt-only. The train split's keys start with
    ``data/``, the eval split's with ``data/eval/``."""
    metrics = {f"{prefix}{name}": float(getattr(counters, name))
               for name in ("read", "ok", "truncated", "dropped", "skipped")}
    if counters.prompt_only:
        metrics[f"{prefix}prompt_only"] = float(counters.prompt_only)
    for status in ("truncated", "dropped", "skipped"):
        for cause, count in getattr(counters, f"{status}_by").items():
            metrics[f"{prefix}{status}/{cause}"] = float(count)
    for part, summary in counters.length_summary().items():
        for stat in ("p50", "p90", "p99", "max"):
            metrics[f"{prefix}tokens/{part}_{stat}"] = float(summary[stat])
    return metrics


KTO_ADVISED = (1.0, 4.0 / 3.0)
"""The range the KTO paper advises for lambda_D n_D / (lambda_U n_U)."""


def kto_balance(labels: dict, *, desirable_weight: float, undesirable_weight: float) -> dict:
    """An unpaired split's desirable / undesirable counts and lambda_D n_D / (lambda_U n_U)
    (None without undesirable examples), with whether it is in KTO_ADVISED."""
    n_d, n_u = labels["desirable"], labels["undesirable"]
    ratio = desirable_weight * n_d / (undesirable_weight * n_u) if n_u and undesirable_weight else None
    return {"desirable": n_d, "undesirable": n_u, "desirable_weight": desirable_weight,
            "undesirable_weight": undesirable_weight, "weighted_ratio": ratio,
            "advised": ratio is not None and KTO_ADVISED[0] <= ratio <= KTO_ADVISED[1] + 1e-9}


def kto_line(balance: dict) -> str:
    ratio = balance["weighted_ratio"]
    shown = f"{ratio:.3f}" if ratio is not None else "undefined (no undesirable example)"
    verdict = "inside" if balance["advised"] else "OUTSIDE"
    return (f"KTO examples: {balance['desirable']} desirable, {balance['undesirable']} undesirable; "
            f"lambda_D*n_D/(lambda_U*n_U) = {balance['desirable_weight']:g}*{balance['desirable']}/"
            f"({balance['undesirable_weight']:g}*{balance['undesirable']}) = {shown}, {verdict} the KTO paper's "
            f"advised [1, 4/3]")


def _share(count: int, read: int) -> str:
    return f"{100.0 * count / read:.1f}%" if read else "0%"


def _by_cause_line(status: str, total: int, by: dict, read: int) -> str:
    parts = [f"{count} ({_share(count, read)}) {CAUSES.get(cause, cause)} [{cause}]"
             for cause, count in sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"    {status} {total} ({_share(total, read)} of read): " + "; ".join(parts)


def format_report(report: dict) -> str:
    """Per split: one summary line, why pairs were truncated / dropped / skipped (with the
    share of the rows read), token length percentiles before fitting, a few examples; then
    the loss line when the report has one (what it trains on, whether a reference runs)."""
    lines = []
    loss = report.get("loss") or {}  # the driver adds what the loss trains on and its reference
    unit = loss.get("rows", "pairs")
    for split in ("train", "eval"):
        part = report.get(split)
        if not part:
            continue
        c = part["counters"]
        read, prompts = c["read"], c.get("prompt_only", 0)
        lines.append(
            f"{split}: {part['num_pairs']} {'rows' if prompts else unit} from {part['num_files']} file(s); "
            f"read {read}, {f'prompt-only {prompts}, ' if prompts else ''}"
            f"ok {c['ok']}, truncated {c['truncated']}, dropped {c['dropped']}, "
            f"skipped {c['skipped']}; fingerprint {part['fingerprint'][:12]}"
        )
        for status in ("truncated", "dropped", "skipped"):
            by = c.get(f"{status}_by") or {}
            if c[status] and by:
                lines.append(_by_cause_line(status, c[status], by, read))
        lengths = part.get("lengths") or {}
        if any(v.get("n") for v in lengths.values()):
            shown = ", ".join(
                f"{name} {v['p50']}/{v['p90']}/{v['p99']}/{v['max']}"
                for name, v in lengths.items()
            )
            lines.append(f"    tokens before fitting, p50/p90/p99/max: {shown}")
        for reason in (c.get("skip_reasons") or [])[:3] + (c.get("drop_reasons") or [])[:3]:
            lines.append(f"    e.g. {reason}")
    if loss.get("summary"):
        lines.append(f"loss: {loss['summary']}")
    if loss.get("kto"):
        lines.append(kto_line(loss["kto"]))
    return "\n".join(lines)


def data_report(train: PairData, eval: Optional[PairData] = None) -> dict:  # noqa: A002
    """JSON-able data report (MLflow artifact, console): per split the counters (with
    per-cause counts and length histograms), pair count, fingerprint, token stats, files
    and ``lengths``: p50 / p90 / p99 / max tokens of prompt, longer response and their
    total before fitting."""
    report = {"train": train.summary(), "eval": eval.summary() if eval is not None else None}
    for split, data in (("train", train), ("eval", eval)):
        if data is not None:
            report[split]["lengths"] = data.counters.length_summary()
    kept = train.counters.kept
    report["train"]["kept_fraction"] = round(kept / train.counters.read, 4) if train.counters.read else 0.0
    return report
