"""Run a command with the policy workers on some CPU cores and everything else on the others.

    .venv/bin/python benchmarks/pin_cores.py --train 0 --rest 1 -- examples/sentiment/run.sh ...

What it is for: measuring whether a role beside training (held-out eval, online round
generation) stalls it, on a machine too small to give that role CPUs of its own. The command
and every process it starts (Ray's raylet, its actors: engines, reference, judge, feeder,
coordinator) run on the ``--rest`` cores; each Ray Train worker process
(``ray::RayTrainWorker``) is moved, all its threads, to the ``--train`` cores as soon as it
appears. The training then runs on cores nothing else uses, in the run with the extra role and
in the run without it, so their wall-time ratio is what the role costs training when it has
spare CPUs (the ``--rest`` cores) -- the situation of a GPU cluster, where the engine and the
reference have devices of their own.

Linux only (/proc and sched_setaffinity). Keep the policy's threads within its cores:
``policy.num_cpus_per_worker`` equal to the number of ``--train`` cores (Ray sets the worker's
OMP_NUM_THREADS from it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

TRAIN_TITLE = "ray::RayTrainWorker"


def cores(text: str) -> set[int]:
    """'0' or '0,1' or '0-3' -> a set of core numbers."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _title(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _pin_threads(pid: str, where: set[int]) -> bool:
    """Every thread of ``pid`` to ``where``; False if the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), where)
        except OSError:
            pass  # the thread ended meanwhile
    return True


def watch(train: set[int], stop: threading.Event, moved: set[str]) -> None:
    """Every 0.2 s: move new Ray Train worker processes (and threads they started since) to ``train``."""
    while not stop.is_set():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if _title(pid).startswith(TRAIN_TITLE):
                if _pin_threads(pid, train) and pid not in moved:
                    moved.add(pid)
                    print(f"[pin_cores] {TRAIN_TITLE} pid {pid} -> cores {sorted(train)}", file=sys.stderr, flush=True)
        stop.wait(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="cores of the Ray Train workers, e.g. 0 or 0-3")
    parser.add_argument("--rest", required=True, help="cores of everything else, e.g. 1")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give it after --")
    train, rest = cores(args.train), cores(args.rest)
    if train & rest:
        parser.error(f"--train {sorted(train)} and --rest {sorted(rest)} share cores")
    os.sched_setaffinity(0, rest)  # inherited by the command and all it starts
    stop, moved = threading.Event(), set()
    watcher = threading.Thread(target=watch, args=(train, stop, moved), daemon=True)
    watcher.start()
    try:
        code = subprocess.call(command)
    finally:
        stop.set()
        watcher.join()
    print(f"[pin_cores] moved {len(moved)} train worker process(es) to cores {sorted(train)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
