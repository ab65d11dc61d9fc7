"""The online schedule on stand-in roles: does a round take no more than the longer of its
generation and its training (target: <= 1.10x)?

On 2 shared cores the engine, the reference and the trainer slow each other down, so the
overlap cannot be measured with real roles (BENCHMARKS.md, "Held-out eval and online rounds
beside training"). Here they sleep instead (ray_dpo.testing.schedule): the engine sleeps
gen_s a round, the reference ref_s a batch of one step's pairs, the trainer train_s a step,
through the real OnlineCoordinator, RoundProducer, RoundFeeder, BatchFeeder, round store and
GenerationGroup (its engines in Ray actors). The wall time is then the schedule's alone.

For each generation/training ratio: 4 rounds of 4 steps, online.overlap on, and off for the
serial baseline. Round 0 is reported apart: nothing comes before it to overlap its
generation with, so it takes gen + train by construction. Per case: each later round's wall
time over max(gen, train) (the target applies to these), the whole run against the ideal
pipeline (gen + train + (rounds - 1) * max(gen, train)), and what the trainer waited on.
"bound" (bound_s) is max(gen, train) + weight load, or steps x reference if longer: the round
time the extra cases (a weight load, a slow reference) show with one engine and one reference.

    .venv/bin/python benchmarks/online_schedule.py [--train-s 0.5] [--ref-s 0.05] [--record]   # ~5 min
    # the slow-reference case alone, 7 times in one process (~2 min):
    .venv/bin/python benchmarks/online_schedule.py --ratios --extras reference --repeat 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from _common import record, table  # noqa: E402

RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)  # generation / training per round
TARGET = 1.10


def ideal_s(case) -> float:
    """The run's wall time if every round after the first took max(gen, train)."""
    gen, train = case.gen_s, case.round_train_s
    return gen + train + (case.rounds - 1) * max(gen, train)


def bound_s(case) -> float:
    """What a later round takes with one engine and one reference actor: the longer of
    generation and training, plus the weight load (the trainer waits for it in advance; the
    engine loads between two rounds' samples), unless a round's reference batches take longer."""
    return max(max(case.gen_s, case.round_train_s) + case.load_s, case.steps_per_round * case.ref_s)


def summarize(run) -> dict:
    from ray_dpo.testing.schedule_trace import rounds

    timings = rounds(run.events, run.case.steps_per_round)
    later = timings[1:]
    return {"round0": timings[0], "later": later, "worst": max(later, key=lambda t: t.ratio),
            "run_ratio": run.seconds / ideal_s(run.case), "run_s": run.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-s", type=float, default=0.5, help="seconds of one optimizer step")
    parser.add_argument("--ref-s", type=float, default=0.05, help="seconds of one reference batch (a step's pairs)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS), help="none: no ratio grid")
    parser.add_argument("--no-serial", action="store_true", help="skip the online.overlap=false baseline")
    parser.add_argument("--extras", choices=("all", "none", "load", "reference"), default="all",
                        help="the extra cases: weight load (two), slow reference (one), both or none")
    parser.add_argument("--no-extras", action="store_const", const="none", dest="extras", help="--extras none")
    parser.add_argument("--repeat", type=int, default=1, help="run every case this many times")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()

    import ray

    from ray_dpo.testing.assets import make_tiny_assets
    from ray_dpo.testing.schedule import ScheduleCase, run_schedule

    work = tempfile.mkdtemp(prefix="online_schedule-")
    assets = make_tiny_assets(os.path.join(work, "assets"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    train_round = args.train_s * args.steps_per_round
    base = dict(train_s=args.train_s, ref_s=args.ref_s, steps_per_round=args.steps_per_round, rounds=args.rounds)
    cases = [(f"{ratio:g}", ScheduleCase(gen_s=ratio * train_round, **base), not args.no_serial)
             for ratio in args.ratios]
    # What the grid leaves at ~0: an engine's weight load, and a reference slower than training.
    load, slow_ref = 0.1 * train_round, 1.5 * args.train_s
    if args.extras in ("all", "load"):
        cases += [(f"0.5, weight load {load:g} s", ScheduleCase(gen_s=0.5 * train_round, load_s=load, **base), False),
                  (f"2, weight load {load:g} s", ScheduleCase(gen_s=2 * train_round, load_s=load, **base), False)]
    if args.extras in ("all", "reference"):
        cases += [(f"0.5, reference {slow_ref:g} s a step",
                   ScheduleCase(gen_s=0.5 * train_round, **{**base, "ref_s": slow_ref}), False)]
    if args.repeat > 1:
        cases = [(f"{label} (run {k + 1})", case, serial) for label, case, serial in cases for k in range(args.repeat)]
    rows, detail = [], []
    for n, (label, case, serial) in enumerate(cases):
        on = summarize(run_schedule(case, workdir=os.path.join(work, f"on-{n}"), assets=assets))
        off = None
        if serial:
            off = summarize(run_schedule(dataclasses.replace(case, overlap=False),
                                         workdir=os.path.join(work, f"off-{n}"), assets=assets))
        worst = on["worst"]
        rows.append([label, f"{case.gen_s:.2f}", f"{case.round_train_s:.2f}", f"{on['round0'].wall_s:.2f}",
                     " / ".join(f"{t.wall_s:.2f}" for t in on["later"]), f"{worst.bound_s:.2f}",
                     f"**{worst.ratio:.3f}x**", f"{on['run_ratio']:.3f}x",
                     f"{off['worst'].ratio:.2f}x" if off else "-", worst.waited_on,
                     f"{bound_s(case):.2f}", f"{worst.wall_s / bound_s(case):.3f}x"])
        for t in on["later"]:
            detail.append([label, t.round, f"{t.wall_s:.3f}", f"{t.gen_s:.3f}", f"{t.train_s:.3f}",
                           f"{t.ratio:.3f}x", t.waited_on])
        print(f"{label}: worst later round {worst.ratio:.3f}x ({worst.wall_s / bound_s(case):.3f}x of the bound), "
              f"round 0 {on['round0'].wall_s:.2f} s, run {on['run_s']:.2f} s = {on['run_ratio']:.3f}x of ideal",
              flush=True)
    ray.shutdown()

    headers = ["gen/train (extra)", "gen s", "train s", "round 0 s", "rounds 1.. s", "max(gen, train) s",
               f"worst round / max (target <= {TARGET:.2f})", "run / ideal", "overlap off: worst round / max",
               "worst round waited on", "bound s", "worst round / bound"]
    body = table(headers, rows)
    body += "\n\nEvery later round (overlap on):\n\n" + table(
        ["gen/train (extra)", "round", "wall s", "gen s", "train s", "wall / max", "waited on"], detail)
    notes = (f"Settings: {args.rounds} rounds of {args.steps_per_round} steps, train {args.train_s} s a step, "
             f"reference {args.ref_s} s a step's batch, 1 engine, weight load ~0 s unless the row says.")
    if args.ratios:
        worst = max(float(r[6].strip("*x")) for r in rows[:len(args.ratios) * args.repeat])
        notes += (f" Worst later round of the ratio grid: {worst:.3f}x max(gen, train) "
                  f"({'meets' if worst <= TARGET else 'misses'} the {TARGET:.2f}x target).")
    if args.record:
        record("The online schedule on stand-in roles: round time against max(generation, training)", body,
               packages=("ray",), notes=notes)
    else:
        print(body)
        print(notes)


if __name__ == "__main__":
    main()
