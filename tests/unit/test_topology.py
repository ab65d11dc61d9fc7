"""One answer to "which actors does this config start": ray_dpo.topology.roles, which the
driver prints, the local cluster is sized from and `ray-dpo k8s` lays out as worker groups.
A table over every config in configs/ and its judge variants checks the three agree, and
that the engines' side starts the judges the roles list."""

from __future__ import annotations

import glob
import os

import pytest

from ray_dpo import k8s
from ray_dpo.config import ConfigError, load_config, local_cpu_needs
from ray_dpo.engines.follower import FollowerSpec
from ray_dpo.topology import BEFORE_TRAINING, roles

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))
RM = "/models/reward"  # a reward-model judge (files are not checked here)
VARIANTS = {
    "as written": [],
    "held-out eval, reward-model eval.judge": ["eval.prompts_file=/data/prompts.jsonl", f"eval.judge.reward_model={RM}",
                                               "eval.judge.function=null", "eval.judge.num_actors=2"],
    "held-out eval, no eval.judge": ["eval.prompts_file=/data/prompts.jsonl", "eval.judge.function=null",
                                     "eval.judge.reward_model=null", "online.judge.function=null",
                                     f"online.judge.reward_model={RM}"],
    "reward-model online.judge": ["online.judge.function=null", f"online.judge.reward_model={RM}"],
    "precompute, no held-out eval": ["reference.precompute=true", "eval.prompts_file=null"],
}


def load(path, overrides):
    return load_config(path, overrides, check_files=False)


def cases():
    """Every config with every variant it accepts (precompute is refused for online configs)."""
    for path in CONFIGS:
        for variant, overrides in VARIANTS.items():
            try:
                load(path, overrides)
            except ConfigError:
                continue
            yield pytest.param(path, overrides, id=f"{os.path.basename(path)}: {variant}")


@pytest.mark.parametrize("path, overrides", cases())
def test_the_driver_the_local_cluster_and_k8s_start_the_same_roles(path, overrides):
    cfg = load(path, overrides)
    listed = roles(cfg, use_gpu=False)
    names = [r.name for r in listed]
    # The local cluster counts each role's CPUs once, plus one for Ray Data.
    needs = local_cpu_needs(cfg)
    assert [cpus for _, cpus in needs] == [r.total_cpus for r in listed] + [1.0]
    # k8s: a worker group per role, but a reference that lives before training only (and
    # has no resources of its own) borrows the policy pods.
    storage = k8s.Storage.parse("pvc:runs")
    cluster = k8s.load_for_cluster(path, overrides, storage)
    groups, _ = k8s.plan_groups(cluster, k8s.ClusterShape())
    shared = [r.name for r in roles(cluster, use_gpu=k8s.uses_gpu(cluster))
              if r.name == "reference" and r.when == BEFORE_TRAINING and not r.resources]
    assert [g.name for g in groups] == [n for n in names if n not in shared]
    # The engines' side: the judges it starts reward-model actors for are the roles'.
    if "generation" in names:
        spec = FollowerSpec.of(cfg)
        started = {id(j): j for j in (spec.judge, spec.eval_judge) if j.reward_model}
        assert len(started) == names.count("judge") + names.count("eval-judge")
    else:
        assert "judge" not in names and "eval-judge" not in names


@pytest.mark.parametrize("config, overrides, expected", [
    ("tiny-cpu.yaml", [], ["policy", "reference"]),
    ("tiny-cpu.yaml", VARIANTS["held-out eval, reward-model eval.judge"],
     ["policy", "reference", "generation", "eval-judge"]),
    ("tiny-cpu.yaml", VARIANTS["held-out eval, no eval.judge"], ["policy", "reference", "generation", "judge"]),
    ("tiny-cpu.yaml", ["loss.type=simpo"], ["policy"]),
    ("tiny-cpu-online.yaml", [], ["policy", "reference", "generation"]),
    ("tiny-cpu-online.yaml", VARIANTS["reward-model online.judge"], ["policy", "reference", "generation", "judge"]),
    ("tiny-cpu-online.yaml", VARIANTS["reward-model online.judge"] + VARIANTS["held-out eval, reward-model eval.judge"],
     ["policy", "reference", "generation", "judge", "eval-judge"]),
])
def test_roles_by_hand(config, overrides, expected):
    path = next(p for p in CONFIGS if p.endswith(config))
    assert [r.name for r in roles(load(path, overrides), use_gpu=False)] == expected


def test_an_offline_rayjob_with_a_reward_model_eval_judge_has_its_judge_pods():
    path = next(p for p in CONFIGS if "offline" in os.path.basename(p))
    overrides = VARIANTS["held-out eval, reward-model eval.judge"]
    storage = k8s.Storage.parse("pvc:runs")
    cfg = k8s.load_for_cluster(path, overrides, storage)
    rendered = k8s.render(cfg, k8s.K8sOptions(storage=storage))
    groups = {g.name: g for g in rendered.groups}
    assert "eval-judge" in groups, list(groups)
    judge = groups["eval-judge"]
    assert judge.count == 2 and judge.replicas * judge.per_pod == 2
    assert "eval.judge.num_actors=2" in judge.sizing
    ray_job = next(d for d in rendered.documents if d.get("kind") == "RayJob")
    names = [g["groupName"] for g in ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert "eval-judge" in names
