"""Stand-in roles that take fixed wall time without using CPU, to measure the online schedule.

Why: the round-overlap target (a round takes at most 1.10x the longer of its generation and
its training) cannot be measured on a 2-core machine, where the engine, the reference and
the trainer share the same CPUs and slow each other down. These stand-ins sleep instead of
computing, so the wall time of a run is the schedule's alone: what waits for what.

Only the work is stood in for. The scheduling is the real code, driven as a run drives it:

    OnlineCoordinator (its RoundProducer, RoundFeeder, RoundStore, a BatchFeeder per round
    with its reference prefetch thread), the real GenerationGroup with its engines as Ray
    actors (one call at a time each, as a real engine: a weight load queues behind the
    samples before it), the function judge, best_vs_worst pairs, rounds.sync_points.

    StandInEngine       a GenerationEngine whose generate() sleeps gen_s per round (split
                        over the engines by prompts), whose weight load takes load_s and
                        whose probe check agrees with the trainer exactly
    SleepingReference   ReferenceGroup.score_batches: ref_s a batch, one batch at a time
                        (one reference actor: the rounds' prefetch threads queue on it)
    train(coordinator, ...)  policy rank 0's loop (ray_dpo.policy.worker._train) with a
                        sleep for the forward/backward/update: get_step and
                        num_pairs_in_step each step, an advance() at every sync point
                        (the weights through the object store, as sync_policy sends them)

What they do not show: contention for CPUs, GPUs or memory bandwidth between the roles, the
size of real weights (a sync here moves an empty state dict, so it costs the Ray calls and
load_s only), several policy ranks (one rank trains; the others would wait in the same
get_step), and judge time (the function judge scores text lengths in microseconds).

    run_schedule(case, workdir=, assets=) -> ScheduleRun (events: schedule_trace.Event)
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from ray_dpo.engines.facts import ENGINES, Engine
from ray_dpo.engines.generation import Completion, GenerationEngine
from ray_dpo.engines.weight_sync import LoadReport
from ray_dpo.online.coordinator import OnlineCoordinator
from ray_dpo.testing.feeder_fakes import fake_logps
from ray_dpo.testing.schedule_trace import Event

BACKEND = "standin"
"""online.backend of the stand-in engine, registered only inside ``standin_engine()``."""
_ENV = "RAY_DPO_STANDIN_ENGINE"  # the engine actor's timing and trace file, as JSON
PAIRS_PER_STEP = 4  # one rank x micro_batch_size 4 x 1 micro-batch


@dataclass(frozen=True)
class ScheduleCase:
    """gen_s: one round's generation on the engines; train_s: one optimizer step;
    ref_s: one reference batch (PAIRS_PER_STEP pairs, i.e. one step's); load_s: one
    engine's weight load. overlap: online.overlap."""

    gen_s: float
    train_s: float
    ref_s: float = 0.0
    steps_per_round: int = 4
    rounds: int = 4
    overlap: bool = True
    load_s: float = 0.0
    num_engines: int = 1

    @property
    def round_train_s(self) -> float:
        return self.steps_per_round * self.train_s


@dataclass
class ScheduleRun:
    case: ScheduleCase
    events: list[Event]
    seconds: float  # the whole run, first sync to last step


class Recorder:
    """Events of the roles in this process, appended from several threads."""

    def __init__(self):
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def add(self, role: str, what: str, index: int, start: float, end: Optional[float] = None) -> None:
        with self._lock:
            self.events.append(Event(role, what, index, start, time.monotonic() if end is None else end))


# --------------------------------------------------------------------------- engine


class StandInEngine(GenerationEngine):
    """A generation engine that sleeps (see the module docstring); it records its calls as
    JSON lines in the trace file named by $RAY_DPO_STANDIN_ENGINE."""

    backend = BACKEND

    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
                 **options: Any):
        settings = json.loads(os.environ[_ENV])
        self._per_prompt, self._load_s = settings["seconds_per_prompt"], settings["load_s"]
        self._trace = settings["trace"]
        self._calls = 0
        self._device = device

    def generate(self, prompts, *, n, sampling, seed=None):
        t0 = time.monotonic()
        time.sleep(self._per_prompt * len(prompts))
        # Sample j of a prompt is j + 1 tokens long: the length judge always finds a margin.
        out = [[Completion([7] * (j + 1) + [2], -1.0 - j, "x" * (j + 1), "stop") for j in range(n)]
               for _ in prompts]
        self._record("generate", self._calls, t0)  # this engine's k-th call is its share of round k
        self._calls += 1
        return out

    def _load_full(self, weights, path, t0):
        start = time.monotonic()
        time.sleep(self._load_s)
        self._record("load", self._calls, start)
        return LoadReport(received=len(weights or {}), seconds=time.perf_counter() - t0)

    def probe_logps(self, probe):
        self._record("probe", self._calls, time.monotonic())
        return [0.0] * len(probe)  # what train() sends as the policy's values

    def _record(self, what: str, index: int, start: float) -> None:
        with open(self._trace, "a", encoding="utf-8") as f:
            f.write(json.dumps([what, index, start, time.monotonic()]) + "\n")


@contextlib.contextmanager
def standin_engine(case: ScheduleCase, trace: str) -> Iterator[None]:
    """online.backend "standin" while inside: the registry entry the run's GenerationGroup
    looks up, with the case's timing in its actors' environment; removed again after."""
    settings = json.dumps({"seconds_per_prompt": case.gen_s / (case.steps_per_round * PAIRS_PER_STEP),
                           "load_s": case.load_s, "trace": trace})
    ENGINES.add(BACKEND, Engine(BACKEND, "ray_dpo.testing.schedule:StandInEngine",
                                actor_env=lambda use_gpu: {_ENV: settings}))
    try:
        yield
    finally:
        ENGINES.remove(BACKEND)


def read_engine_trace(path: str) -> list[Event]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [Event("engine", what, index, start, end) for what, index, start, end in map(json.loads, f)]


# --------------------------------------------------------------------------- reference


class SleepingReference:
    """ReferenceGroup.score_batches that sleeps ``ref_s`` a batch, one batch at a time over all
    callers (one reference actor), with the fake log-probs of feeder_fakes; records each batch
    under the round its pairs came from (their ids start "online-r<round>:")."""

    def __init__(self, ref_s: float, batch_size: int, recorder: Recorder):
        self.ref_s, self.recorder = ref_s, recorder
        self.config = type("ReferenceConfig", (), {"batch_size": batch_size})()
        self._busy = threading.Lock()

    def score_batches(self, batches: Iterable[list[dict]]) -> Iterator[list[dict]]:
        for batch in batches:
            with self._busy:
                t0 = time.monotonic()
                time.sleep(self.ref_s)
                self.recorder.add("reference", "score", _round_of(batch[0]["pair_id"]), t0)
            yield [{**row, "ref_chosen_logp": fake_logps(row)[0], "ref_rejected_logp": fake_logps(row)[1]}
                   for row in batch]


def _round_of(pair_id: str) -> int:
    head = pair_id.split(":", 1)[0]
    return int(head[len("online-r"):]) if head.startswith("online-r") else -1


# --------------------------------------------------------------------------- trainer


def train(coordinator: Any, *, train_s: float, recorder: Recorder) -> None:
    """Policy rank 0's loop (ray_dpo.policy.worker._train) on one rank, each update a sleep.

    As the worker does: the first sync at the start (step 0: nothing to send, the engines
    are verified); each step asks get_step and num_pairs_in_step, trains if the step has
    pairs, then syncs (advance with the weights) when the completed-step count is a sync
    point. Every wait and every update is recorded.
    """
    import ray

    sync_points = set(coordinator.sync_points())
    expected = [0.0] * len(coordinator.probe())  # the stand-in engines agree exactly
    total = coordinator.total_steps()
    t0 = time.monotonic()
    coordinator.advance(0, None, expected)
    recorder.add("trainer", "sync", 0, t0)
    step = 0
    while step < total:
        t0 = time.monotonic()
        coordinator.get_step(step, 0, 1)
        pairs = coordinator.num_pairs_in_step(step)
        recorder.add("trainer", "fetch", step, t0)
        if pairs:
            t0 = time.monotonic()
            time.sleep(train_s)
            recorder.add("trainer", "train", step, t0)
        step += 1
        if step in sync_points:
            t0 = time.monotonic()
            coordinator.advance(step, [ray.put({})], expected)
            recorder.add("trainer", "sync", step, t0)


# --------------------------------------------------------------------------- the run


class RecordedCoordinator(OnlineCoordinator):
    """The OnlineCoordinator, unchanged but for noting when each round is ready: the
    RoundProducer logs a round's metrics right after installing it in the RoundFeeder."""

    recorder: Optional[Recorder] = None

    def log(self, metrics: dict, step: int) -> None:
        if self.recorder is not None and "online/round" in metrics:
            self.recorder.add("coordinator", "built", int(metrics["online/round"]), time.monotonic())
        super().log(metrics, step)


def prompt_rows(n: int) -> list[dict]:
    """n data set rows for the rounds' prompts (token ids of the tiny assets' vocabulary)."""
    return [{"pair_id": f"prompts.jsonl:{i + 1}", "prompt_ids": [1, 10 + i % 50, 11 + i % 40],
             "chosen_ids": [20, 2], "rejected_ids": [21, 2], "truncated": False} for i in range(n)]


def run_config(case: ScheduleCase, *, workdir: str, assets: dict):
    """The RunConfig of an online run of ``case`` on the tiny assets' tokenizer."""
    from ray_dpo.config import from_dict

    return from_dict({
        "run": {"name": "schedule", "storage_path": os.path.join(workdir, "runs"), "device": "cpu"},
        "model": {"name_or_path": assets["model"], "dtype": "fp32"},
        "data": {"train_files": [assets["train_glob"]], "max_length": 64, "max_prompt_length": 32},
        "reference": {"num_actors": 1, "batch_size": PAIRS_PER_STEP},
        "policy": {"num_workers": 1, "micro_batch_size": PAIRS_PER_STEP, "gradient_accumulation_steps": 1,
                   "num_epochs": 1},
        "tracking": {"progress": False},
        "eval": {"every_steps": 0},
        "online": {"enabled": True, "rounds": case.rounds, "prompts_per_round": case.steps_per_round * PAIRS_PER_STEP,
                   "samples_per_prompt": 2, "backend": BACKEND, "num_engines": case.num_engines,
                   "num_cpus_per_engine": 0, "pair_strategy": "best_vs_worst", "overlap": case.overlap,
                   "judge": {"function": "ray_dpo.testing.schedule:longer_is_better"}},
    })


def longer_is_better(prompt: Any, completion: str) -> float:
    """The rounds' function judge: a sample's length (the stand-in engine's samples differ in it)."""
    return float(len(completion))


def run_schedule(case: ScheduleCase, *, workdir: str, assets: dict) -> ScheduleRun:
    """One online run of ``case`` on stand-ins (Ray initialized by the caller); ``workdir``
    must be new (rounds found in its round store would be read back, not generated)."""
    from ray_dpo.engines.follower import FollowerSpec
    from ray_dpo.feeder import BatchPlan

    os.makedirs(workdir, exist_ok=False)
    trace = os.path.join(workdir, "engine_trace.jsonl")
    recorder = Recorder()
    with standin_engine(case, trace):
        cfg = run_config(case, workdir=workdir, assets=assets)
        plan = BatchPlan(num_workers=1, micro_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
                         num_epochs=1, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        coordinator = RecordedCoordinator(
            FollowerSpec.of(cfg), plan, train=prompt_rows(4 * PAIRS_PER_STEP * case.steps_per_round),
            evaluation=None, reference=SleepingReference(case.ref_s, PAIRS_PER_STEP, recorder),
            tracking_uri=None, run_id=None, use_gpu=False)
        coordinator.recorder = recorder  # before the first advance: no round is made before it
        try:
            t0 = time.monotonic()
            train(coordinator, train_s=case.train_s, recorder=recorder)
            seconds = time.monotonic() - t0
        finally:
            coordinator.close()
    return ScheduleRun(case, sorted(recorder.events + read_engine_trace(trace), key=lambda e: e.start), seconds)
