"""The online round modules on fakes, without Ray or engines: build_round (judge -> pairs ->
rows), RoundFeeder (steps wait for their round, empty steps, read-back from the round store,
errors reach the waiters, the round being trained gets the reference first), RoundProducer (submits once, builds in a thread, says how stale its
samples are), and the typed seams every feeder and follower must match."""

from __future__ import annotations

import inspect
import threading
import time
from types import SimpleNamespace

import pytest

from ray_dpo.config import DataConfig, OnlineConfig, SamplingConfig
from ray_dpo.engines.generation import Completion
from ray_dpo.online.rounds import RoundPlan
from ray_dpo.seams import PolicySync, Scorer, StepSource

EOS = 2


def _rows(n: int) -> list[dict]:
    return [{"pair_id": f"d.jsonl:{i + 1}", "prompt_ids": [1, 10 + i], "chosen_ids": [20, EOS],
             "rejected_ids": [21, EOS], "truncated": False} for i in range(n)]


def _completions(n: int, samples: int) -> list[list[Completion]]:
    """Prompt i's sample j has j + 1 tokens; the last prompt's samples are all alike (no margin)."""
    out = []
    for i in range(n):
        same = i == n - 1
        out.append([Completion([30 + (0 if same else j)] * (1 if same else j + 1) + [EOS], -1.0 - j, None, "stop")
                    for j in range(samples)])
    return out


def _scorer() -> Scorer:
    """Scores a text by its length: longer samples win."""
    judge = SimpleNamespace(score=lambda prompts, texts: [float(len(t)) for t in texts])
    return Scorer(judge, decode=lambda ids: " ".join(map(str, ids)))


def test_build_round_pairs_best_against_worst_and_counts_every_prompt():
    from ray_dpo.online.round_builder import build_round

    online = OnlineConfig(pair_strategy="best_vs_worst", samples_per_prompt=3)
    built = build_round(1, rows=_rows(4), completions=_completions(4, 3), scorer=_scorer(), online=online,
                        data=DataConfig(max_length=64, max_prompt_length=16), bos_id=1, gen_seconds=2.0,
                        rounds_run=3)
    assert [row["pair_id"] for row in built.rows] == ["online-r1:d.jsonl:1", "online-r1:d.jsonl:2",
                                                      "online-r1:d.jsonl:3"]
    for row in built.rows:  # the longest sample against the shortest
        assert (row["chosen_ids"], row["rejected_ids"]) == ([32, 32, 32, EOS], [30, EOS])
    m = built.metrics
    assert (m["online/round"], m["online/pairs_kept"], m["online/pairs_dropped_no_margin"]) == (1, 3, 1)
    assert m["online/pairs_kept"] + m["online/pairs_dropped_no_margin"] + m["online/pairs_dropped_length"] == 4
    assert m["online/samples"] == 12 and m["online/gen_tokens_per_s"] == pytest.approx(sum(
        len(c.token_ids) for comps in _completions(4, 3) for c in comps) / 2.0)
    assert "online round 2/3: 12 samples" in built.summary and "3 pairs kept, 1 without margin" in built.summary


class _Feeder:
    """A round's BatchFeeder stand-in: one pair a step."""

    train_sent = None

    def __init__(self, rows, after=None):
        self.rows, self.closed = rows, False

    def total_steps(self):
        return len(self.rows)

    def num_pairs_in_step(self, step):
        return 1

    def get_step(self, step, rank, world=None):
        return [[self.rows[step]]]

    def get_eval(self, rank, world=None):
        return []

    def close(self):
        self.closed = True


def _round_feeder(tmp_path, fingerprint=None):
    from ray_dpo.online.round_feeder import RoundFeeder
    from ray_dpo.online.round_store import RoundStore

    plan = RoundPlan(rounds=3, steps_per_round=4, total_steps=12)
    return RoundFeeder(plan, store=RoundStore(str(tmp_path), fingerprint or {"seed": 0}), make_feeder=_Feeder,
                       accumulation=lambda world: 2)


def test_a_step_waits_for_its_round_and_steps_past_its_pairs_are_empty(tmp_path):
    feeder = _round_feeder(tmp_path)
    got = []
    waiter = threading.Thread(target=lambda: got.append(feeder.get_step(5, rank=0)))
    waiter.start()
    time.sleep(0.3)
    assert not got, "round 1 is not there yet"
    assert feeder.claim(1)
    feeder.install(1, _rows(2))
    waiter.join(5)
    assert got == [[[_rows(2)[1]]]]  # step 5 = round 1's second step
    assert feeder.get_step(6, rank=0) == [[], []]  # past the 2 pairs round 1 kept: empty, one list per micro-batch
    assert feeder.num_pairs_in_step(7) == 0
    assert not feeder.claim(1), "a round already here is not made twice"


def test_a_saved_round_is_read_back_instead_of_made_again_and_errors_reach_waiters(tmp_path):
    first = _round_feeder(tmp_path)
    first.store.save(0, _rows(3), {"online/round": 0.0})
    second = _round_feeder(tmp_path)  # e.g. a restarted coordinator
    assert not second.claim(0), "read back, not claimed for generation"
    assert second.get_step(2, rank=0) == [[_rows(3)[2]]]
    other = _round_feeder(tmp_path, fingerprint={"seed": 1})  # another run's settings: not reused
    assert other.claim(0)
    other.release(0)
    errors = []

    def wait():
        try:
            other.get_step(9, rank=1)
        except RuntimeError as err:
            errors.append(err)

    waiter = threading.Thread(target=wait)
    waiter.start()
    other.fail(RuntimeError("probe check failed"))
    waiter.join(5)
    assert [str(e) for e in errors] == ["probe check failed"]


def test_the_round_being_trained_gets_the_reference_before_the_next_round(tmp_path):
    """online.overlap installs round 1 while round 0 trains: round 1's feeder prefetches only
    once round 0's has sent its last pair, so the reference scores round 0 first. A step
    of round 1 asked for before that would still be scored (BatchFeeder's prefetch_after)."""
    from ray_dpo.feeder import BatchFeeder, BatchPlan
    from ray_dpo.online.round_feeder import RoundFeeder
    from ray_dpo.online.round_store import RoundStore
    from ray_dpo.testing.feeder_fakes import FakeReference, make_rows

    reference = FakeReference(delay=0.01)
    plan = BatchPlan(num_workers=1, micro_batch_size=2, gradient_accumulation_steps=1, num_epochs=1, seed=0,
                     shuffle=False)
    made = []

    def make_feeder(rows, after):
        made.append(after)
        return BatchFeeder(rows, plan, reference=reference, prefetch_after=after)

    rounds = RoundFeeder(RoundPlan(rounds=2, steps_per_round=4, total_steps=8), store=RoundStore(str(tmp_path), {}),
                         make_feeder=make_feeder, accumulation=plan.accumulation)
    rows = {r: make_rows(8, seed=r, prefix=f"r{r}") for r in range(2)}
    rounds.install(0, rows[0])
    first = rounds.get_step(0, rank=0)  # round 0 trains; its prefetch scores its steps 0..2
    rounds.install(1, rows[1])  # round 1 arrives meanwhile
    assert made[0] is None and made[1] is not None, "round 1 waits on round 0's train_sent"
    time.sleep(0.3)
    assert sorted(reference.scored) == sorted(r["pair_id"] for r in rows[0][:6]), "round 1 is held"
    served = [first] + [rounds.get_step(step, rank=0) for step in range(1, 8)]
    assert [pid.split(":")[0] for pid in reference.scored] == ["r0"] * 8 + ["r1"] * 8
    assert [row["pair_id"] for step in served for mb in step for row in mb] == \
        [r["pair_id"] for r in rows[0] + rows[1]], "every pair once, in order"
    rounds.close()


class _Generation:
    def __init__(self, samples, sampled_from=None):
        self.samples, self.submitted, self.version = samples, [], sampled_from

    def submit(self, prompts, *, seed):
        self.submitted.append((len(prompts), seed))
        return [prompts]

    def collect(self, chunks):
        return _completions(len(chunks[0]), self.samples)

    def sampled_from(self, chunks):
        return self.version


@pytest.mark.parametrize("sampled_from, staleness", [(None, 4), (4, 4), (8, 0)])
def test_the_producer_submits_a_round_once_and_says_how_stale_its_samples_are(tmp_path, capsys, sampled_from,
                                                                              staleness):
    """Submitted at step 4 for a round starting at step 8: 4 steps stale, unless the engines
    say the samples came from newer weights (a restarted engine's chunk, sent again after
    the sync at step 8), or say nothing (then the submit step counts)."""
    from ray_dpo.online.round_builder import RoundProducer

    rounds = _round_feeder(tmp_path)
    online = OnlineConfig(pair_strategy="best_vs_worst", samples_per_prompt=2, prompts_per_round=4,
                          sampling=SamplingConfig())
    spec = SimpleNamespace(online=online, data=DataConfig(max_length=64, max_prompt_length=16), seed=5)
    logged = []
    generation = _Generation(samples=2, sampled_from=sampled_from)

    class Prompts:
        def __len__(self):
            return 6

        def row(self, i):
            return _rows(6)[i]

    producer = RoundProducer(rounds=rounds, prompt_rows=Prompts(), generation=generation, scorer=_scorer(),
                             spec=spec, bos_id=1, log=lambda m, step: logged.append((step, m)))
    producer.ensure(2, step=4)  # online.overlap: round 2 (starting at step 8) from step 4's weights
    producer.ensure(2, step=4)
    assert generation.submitted == [(4, 5 + 1_000_003 * 3)], "submitted once, seeded by round"
    rounds.get_step(8, rank=0)  # waits for the round
    (step, metrics), = logged
    assert step == 8 and metrics["online/sample_staleness_steps"] == staleness
    assert rounds.store.load(2).rows, "kept in the round store before it is served"
    assert "online round 3/3" in capsys.readouterr().out


def _params(fn) -> list[str]:
    """Parameter names, without the ``_ray_trace_ctx`` Ray adds to an actor class's methods
    once the class has been made an actor in this process."""
    return [p for p in inspect.signature(fn).parameters if not p.startswith("_ray")]


def _members(protocol) -> dict[str, list[str]]:
    return {name: _params(getattr(protocol, name))
            for name in dir(protocol) if not name.startswith("_") and callable(getattr(protocol, name))}


@pytest.mark.parametrize("protocol,classes", [
    (StepSource, ["ray_dpo.feeder.batch_feeder:BatchFeeder", "ray_dpo.online.round_feeder:RoundFeeder",
                  "ray_dpo.online.coordinator:OnlineCoordinator"]),
    (PolicySync, ["ray_dpo.engines.follower:PolicyFollower", "ray_dpo.online.coordinator:OnlineCoordinator"]),
])
def test_feeders_and_followers_match_their_seams(protocol, classes):
    import importlib

    for spec in classes:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        for member, params in _members(protocol).items():
            assert hasattr(cls, member), f"{name} lacks {protocol.__name__}.{member}"
            assert _params(getattr(cls, member)) == params, f"{name}.{member}"
