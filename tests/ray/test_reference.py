"""ReferenceActor, ReferenceGroup and the reference cache on a local Ray cluster (CPU).

The model is the tiny random Llama of ray_dpo.testing.assets; pairs are random token ids,
so nothing here depends on the tokenizer or the data pipeline.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import shutil

import pytest

pytestmark = pytest.mark.ray

NUM_PAIRS = 40


@pytest.fixture(scope="module")
def pairs(tiny_assets) -> list[dict]:
    """NUM_PAIRS tokenized pairs of random lengths (prompt 1-12, responses 1-15 tokens)."""
    with open(os.path.join(tiny_assets["model"], "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    rng = random.Random(0)

    def ids(lo, hi):
        return [rng.randrange(7, vocab) for _ in range(rng.randint(lo, hi))]

    return [{"pair_id": f"p{i:03d}", "prompt_ids": ids(1, 12), "chosen_ids": ids(1, 15),
             "rejected_ids": ids(1, 15), "truncated": False} for i in range(NUM_PAIRS)]


@pytest.fixture(scope="module")
def local_actor(tiny_assets):
    """The actor class used in-process (no Ray): the expected values for the group."""
    from ray_dpo.reference import ReferenceActor

    return ReferenceActor(tiny_assets["model"], dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def expected(local_actor, pairs) -> dict[str, tuple[float, float]]:
    out = local_actor.log_probs(pairs)
    return {p["pair_id"]: (c, r) for p, c, r in zip(pairs, out["ref_chosen_logp"], out["ref_rejected_logp"])}


def make_group(model, name_prefix, **config):
    from ray_dpo.config import ReferenceConfig
    from ray_dpo.reference import ReferenceGroup

    return ReferenceGroup(model_path=model, config=ReferenceConfig(**config), dtype="fp32",
                          use_gpu=False, name_prefix=name_prefix, restart_timeout_s=120)


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_assets):
    """Two actors, 2 batches in flight each, 2 restarts each. Shared: actor start-up dominates."""
    g = make_group(tiny_assets["model"], "test-ref-a", num_actors=2, batch_size=4, max_in_flight=2,
                   max_restarts=2)
    yield g
    g.shutdown()


def batches_of(pairs, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(pairs[start:start + size])
        start += size
    assert start == len(pairs)
    return out


SIZES = [4, 5, 3, 0, 4, 6, 2, 4, 8, 4]  # 10 batches, one empty, some bigger than batch_size


def check_scored(batches, scored, expected, num_pairs=NUM_PAIRS):
    """Same batches in the same order, every pair once, values equal to the in-process actor."""
    assert [[r["pair_id"] for r in b] for b in scored] == [[r["pair_id"] for r in b] for b in batches]
    counts = collections.Counter(r["pair_id"] for b in scored for r in b)
    assert len(counts) == num_pairs and set(counts.values()) == {1}
    for b_in, b_out in zip(batches, scored):
        for row_in, row_out in zip(b_in, b_out):
            assert row_out["prompt_ids"] == row_in["prompt_ids"]  # the input columns are kept
            assert (row_out["ref_chosen_logp"], row_out["ref_rejected_logp"]) == pytest.approx(
                expected[row_in["pair_id"]], rel=1e-6, abs=1e-5)


# --------------------------------------------------------------------------- actor


def direct_logp(model, prompt, response) -> float:
    """Sum of log p(response | prompt), one unpadded sequence, log-softmax in float64."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(response))


def test_actor_log_probs_equal_a_direct_computation(tiny_assets, pairs, local_actor, group):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).eval()
    some = pairs[:8]
    want_c = [direct_logp(model, p["prompt_ids"], p["chosen_ids"]) for p in some]
    want_r = [direct_logp(model, p["prompt_ids"], p["rejected_ids"]) for p in some]

    out = local_actor.log_probs(some)
    assert out["ref_chosen_logp"] == pytest.approx(want_c, rel=1e-5, abs=1e-5)
    assert out["ref_rejected_logp"] == pytest.approx(want_r, rel=1e-5, abs=1e-5)
    assert all(type(v) is float for v in out["ref_chosen_logp"] + out["ref_rejected_logp"])
    assert max(want_c + want_r) < 0

    # Through Ray (batch of 8 > batch_size 4, so the actor splits it into two forwards).
    scored = group.score(some)
    assert [r["ref_chosen_logp"] for r in scored] == pytest.approx(want_c, rel=1e-5, abs=1e-5)
    assert [r["ref_rejected_logp"] for r in scored] == pytest.approx(want_r, rel=1e-5, abs=1e-5)


def test_actor_splits_batches_without_changing_results(tiny_assets, pairs, local_actor):
    from ray_dpo.reference import ReferenceActor

    small = ReferenceActor(tiny_assets["model"], micro_batch_size=3, max_tokens_per_forward=60)
    assert len(list(small._chunks(pairs))) > len(pairs) // 3  # the token budget splits further
    split, whole = small.log_probs(pairs), local_actor.log_probs(pairs)
    for column in ("ref_chosen_logp", "ref_rejected_logp"):
        assert split[column] == pytest.approx(whole[column], rel=1e-6, abs=1e-5)
    assert small.log_probs([]) == {"ref_chosen_logp": [], "ref_rejected_logp": []}
    with pytest.raises(ValueError, match="dtype must be one of"):
        ReferenceActor(tiny_assets["model"], dtype="fp8")


# --------------------------------------------------------------------------- group


def test_score_batches_in_order_each_pair_once_with_bounded_window(group, pairs, expected):
    batches = batches_of(pairs, SIZES)
    window = group.num_actors * group.config.max_in_flight
    pulled = []

    def source():
        for b in batches:
            pulled.append(len(pulled))
            yield b

    scored = []
    for out in group.score_batches(source()):
        scored.append(out)
        # Taken from the source but not yet handed out: never more than the window.
        assert len(pulled) - len(scored) <= window - 1
    check_scored(batches, scored, expected)
    assert group.num_retries == 0


def test_killed_actor_mid_stream_is_restarted_and_loses_nothing(group, pairs, expected, caplog):
    batches = batches_of(pairs, SIZES)
    assert group.restarts_per_actor == [0, 0]
    yielded = []

    def source():
        for k, batch in enumerate(batches):
            if k == 6:  # batch 0 is out, batches 2-5 were just sent: most likely some in flight
                assert yielded
                group.kill_actor(0)
            yield batch

    with caplog.at_level(logging.WARNING, logger="ray_dpo"):
        for out in group.score_batches(source()):
            yielded.append(out)
    check_scored(batches, yielded, expected)
    # The restart is seen either through a failed task (then num_retries >= 1) or, if
    # the kill landed between two tasks, through results from a new incarnation.
    assert group.restarts_per_actor == [1, 0]
    assert group.num_retries >= 0
    assert any("was restarted" in r.getMessage() for r in caplog.records)


def test_group_survives_pickling(group, pairs, expected):
    """A feeder actor gets the group by value: handles travel, the copy scores."""
    import ray

    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(group))
    assert copy.names == group.names
    scored = copy.score(pairs[:3])
    check_scored([pairs[:3]], [scored], expected, num_pairs=3)


def test_exhausted_restarts_fail_clearly(ray_cluster, tiny_assets, pairs):
    from ray_dpo.reference import ReferenceActorLostError

    g = make_group(tiny_assets["model"], "test-ref-b", num_actors=1, batch_size=4, max_in_flight=1,
                   max_restarts=0)
    try:
        stream = g.score_batches(batches_of(pairs, [4] * 10))
        assert len(next(stream)) == 4
        g.kill_actor(0)
        with pytest.raises(ReferenceActorLostError,
                           match=r"reference actor 0 \(test-ref-b-0\) died .* 0 restart\(s\) used of "
                                 r"reference\.max_restarts=0"):
            list(stream)
    finally:
        g.shutdown()


def test_actor_that_cannot_start_fails_clearly(ray_cluster, tmp_path):
    from ray_dpo.reference import ReferenceActorLostError

    g = make_group(str(tmp_path / "no-such-model"), "test-ref-c", num_actors=1, max_restarts=2)
    try:
        with pytest.raises(ReferenceActorLostError, match=r"reference actor 0 .* failed to start .*"
                                                          r"FileNotFoundError: .*does not exist"):
            g.wait_ready()
    finally:
        g.shutdown()


def test_names_held_by_a_live_group_get_a_random_infix(group):
    import ray

    from ray_dpo.reference.group import free_actor_names

    assert group.names == ["test-ref-a-0", "test-ref-a-1"]
    assert ray.get(ray.get_actor("test-ref-a-1").ping.remote()) is True
    assert free_actor_names("test-ref-free", 2) == ["test-ref-free-0", "test-ref-free-1"]
    other = free_actor_names("test-ref-a", 2)
    assert other[0] != "test-ref-a-0" and other[0].startswith("test-ref-a-") and other[1].endswith("-1")


def test_score_datasets_scores_each_pair_id_once(group, pairs, expected):
    from ray_dpo.reference import cache

    class FakeData:  # PairData's one attribute that score_datasets uses
        def __init__(self, rows):
            self.dataset = self
            self._rows = rows

        def iter_rows(self):
            return iter(self._rows)

    train, evaluation = FakeData(pairs[:30]), FakeData(pairs[25:])  # 5 pairs in both
    ids, chosen, rejected = cache.score_datasets(group, [train, evaluation], batch_size=7)
    assert ids == [p["pair_id"] for p in pairs]
    assert chosen == pytest.approx([expected[i][0] for i in ids], rel=1e-6, abs=1e-5)
    assert rejected == pytest.approx([expected[i][1] for i in ids], rel=1e-6, abs=1e-5)


# --------------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path, caplog):
    from ray_dpo.reference import cache

    key = "k" * 64
    ids = ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1"]
    chosen, rejected = [-1.5, -20.25, -3.1], [-2.0, -19.0, -7.7]
    assert cache.load(str(tmp_path), key) is None

    path = cache.save(str(tmp_path), key, ids, chosen, rejected, meta={"note": "test"})
    assert path == f"{tmp_path}/{key}/ref_logps.parquet"
    assert sorted(os.listdir(tmp_path / key)) == ["meta.json", "ref_logps.parquet"]  # no temp files
    meta = json.loads((tmp_path / key / "meta.json").read_text())
    assert meta["num_pairs"] == 3 and meta["key"] == key and meta["note"] == "test"

    import numpy as np

    got = cache.load(str(tmp_path), key)
    assert list(got) == ids
    for pid, c, r in zip(ids, chosen, rejected):  # stored as float32, exactly
        assert got[pid] == (float(np.float32(c)), float(np.float32(r)))
    assert cache.load(f"file://{tmp_path}", key) == got  # URIs go through pyarrow.fs

    with pytest.raises(ValueError, match="appears twice"):
        cache.save(str(tmp_path), "dup", ["x", "x"], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="equal lengths"):
        cache.save(str(tmp_path), "len", ["x"], [0.0, 1.0], [0.0])

    (tmp_path / key / "ref_logps.parquet").write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="ray_dpo"):
        assert cache.load(str(tmp_path), key) is None
    assert "unreadable" in caplog.text


def test_cache_key_follows_data_model_and_settings(tiny_assets, tmp_path):
    from ray_dpo.reference import cache_key

    model = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model)
    base = dict(data_fingerprint="abc", model_path=str(model), dtype="fp32", extra={"format": "auto"})
    key = cache_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(**base) == key
    assert cache_key(**{**base, "model_path": str(model) + "/"}) == key  # same resolved path

    assert cache_key(**{**base, "data_fingerprint": "abd"}) != key
    assert cache_key(**{**base, "dtype": "bf16"}) != key
    assert cache_key(**{**base, "extra": {"format": "standard"}}) != key
    assert cache_key(**{**base, "model_path": tiny_assets["model"]}) != key  # another copy

    weights = model / "model.safetensors"
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # re-saved weights
    assert cache_key(**base) != key

    key2 = cache_key(**base)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(config))
    assert cache_key(**base) != key2

    # Files that do not change the numbers (tokenizer: covered by the data fingerprint).
    key3 = cache_key(**base)
    (model / "README.md").write_text("hello")
    assert cache_key(**base) == key3

    with pytest.raises(FileNotFoundError):
        cache_key(**{**base, "model_path": "file://" + str(tmp_path / "missing")})


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout,attn", [("packed", "sdpa"), ("prefix_shared", "sdpa"),
                                         ("prefix_shared", "eager")])
def test_actor_layouts_equal_padded(tiny_assets, pairs, expected, layout, attn):
    """Packed and prefix-shared forwards (several rows, a token budget) give the padded sdpa
    log-probs within 1e-5 (fp32; relative 1e-6 for sums near -75 nats, eager vs sdpa)."""
    from ray_dpo.reference import ReferenceActor

    actor = ReferenceActor(tiny_assets["model"], layout=layout, attn_implementation=attn,
                           micro_batch_size=16, max_tokens_per_forward=300, max_tokens_per_row=64)
    assert len(list(actor._chunks(pairs))) > len(pairs) // 16  # the budget splits some batches
    out = actor.log_probs(pairs)
    want = [expected[p["pair_id"]] for p in pairs]
    assert out["ref_chosen_logp"] == pytest.approx([c for c, _ in want], rel=1e-6, abs=1e-5)
    assert out["ref_rejected_logp"] == pytest.approx([r for _, r in want], rel=1e-6, abs=1e-5)
    with pytest.raises(ValueError, match="layout must be one of"):
        ReferenceActor(tiny_assets["model"], layout="pakced")


def test_group_serves_prefix_shared_layout(ray_cluster, tiny_assets, pairs, expected):
    group = make_group(tiny_assets["model"], "ref-prefix", num_actors=1, batch_size=8, layout="prefix_shared")
    try:
        scored = [row for batch in group.score_batches(batches_of(pairs, [8] * 5)) for row in batch]
    finally:
        group.shutdown()
    assert [r["pair_id"] for r in scored] == [p["pair_id"] for p in pairs]
    for row in scored:
        c, r = expected[row["pair_id"]]
        assert (row["ref_chosen_logp"], row["ref_rejected_logp"]) == pytest.approx((c, r), abs=1e-5)
