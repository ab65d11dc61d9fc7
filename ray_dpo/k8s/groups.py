"""Worker groups: each role's actors laid out on identical pods, sized from its config section. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray_dpo.config import RunConfig
from ray_dpo.resources import gpus_per_actor
from ray_dpo.k8s.options import ClusterShape, K8sError
from ray_dpo.loss_rules import needs_reference_group


@dataclass(frozen=True)
class GroupPlan:
    """One KubeRay worker group: `replicas` identical pods of `per_pod` actors each."""

    name: str
    sizing: str
    """Human-readable arithmetic, e.g. "policy.num_workers=16 x policy.num_gpus_per_worker=1"."""
    count: int
    per_pod: int
    replicas: int
    gpus_per_pod: int
    cpus_per_pod: int
    memory_gi: int
    ray_resources: dict[str, int]
    """Custom Ray resources each pod advertises (capacity for per_pod actors' requests)."""

    @property
    def total_gpus(self) -> int:
        return self.replicas * self.gpus_per_pod


def _pod_size(count: int, each: float, cap: float) -> int:
    """Largest divisor d of count with d * each <= cap (every pod identical, none idle)."""
    if each <= 0:
        return count
    return max(d for d in range(1, count + 1) if count % d == 0 and d * each <= cap + 1e-9)


def pack_group(name: str, sizing: str, *, count: int, gpus_each: float, cpus_each: float,
               resources_each: dict[str, float], shape: ClusterShape) -> tuple[GroupPlan, list[str]]:
    """Lay `count` actors needing (gpus_each, cpus_each, resources_each) onto pods.

    Returns the plan and warnings. Raises K8sError when one actor does not fit one pod.
    """
    warnings: list[str] = []
    if gpus_each > 0:
        if gpus_each > shape.gpus_per_node + 1e-9:
            raise K8sError(f"{sizing}: one actor needs {gpus_each:g} GPUs but a pod has at most "
                           f"--gpus-per-node {shape.gpus_per_node}; raise --gpus-per-node or lower it")
        per_pod = _pod_size(count, gpus_each, shape.gpus_per_node)
        fewest = math.ceil(count * gpus_each / shape.gpus_per_node - 1e-9)
    else:
        per_pod = _pod_size(count, cpus_each, shape.cpus_per_node)
        fewest = math.ceil(count * cpus_each / shape.cpus_per_node - 1e-9) if cpus_each > 0 else 1
    replicas = count // per_pod
    if replicas > fewest:
        warnings.append(f"{name}: {count} actors do not split evenly into full pods, so they run as "
                        f"{replicas} pods of {per_pod}; a count that is a multiple of the actors per "
                        f"node (or another --gpus-per-node) uses fewer, larger pods")
    gpus = math.ceil(per_pod * gpus_each - 1e-9)
    cpus = max(math.ceil(per_pod * cpus_each - 1e-9) + 1, gpus * shape.cpus_per_gpu)
    memory = max(gpus * shape.memory_per_gpu_gi, cpus * shape.memory_per_cpu_gi)
    labels = {k: max(1, math.ceil(per_pod * v - 1e-9)) for k, v in sorted(resources_each.items())}
    plan = GroupPlan(name=name, sizing=sizing, count=count, per_pod=per_pod, replicas=replicas,
                     gpus_per_pod=gpus, cpus_per_pod=cpus, memory_gi=memory, ray_resources=labels)
    return plan, warnings


def uses_gpu(cfg: RunConfig) -> bool:
    """Whether the rendered cluster has GPUs (what the driver's run.device=auto then sees)."""
    if cfg.run.device != "auto":
        return cfg.run.device == "cuda"
    online = _runs_engines(cfg) and (cfg.online.num_gpus_per_engine > 0 or cfg.online.judge.num_gpus_per_actor > 0)
    reference = needs_reference_group(cfg) and cfg.reference.num_gpus_per_actor > 0
    return cfg.policy.num_gpus_per_worker > 0 or reference or online


def plan_groups(cfg: RunConfig, shape: ClusterShape) -> tuple[list[GroupPlan], list[str]]:
    """The worker groups a run needs, each sized from its own config section."""
    gpu = uses_gpu(cfg)
    pol, ref, onl = cfg.policy, cfg.reference, cfg.online
    groups, warnings = [], []

    def add(plan_and_warnings):
        groups.append(plan_and_warnings[0])
        warnings.extend(plan_and_warnings[1])

    pol_gpus = pol.num_gpus_per_worker if gpu else 0.0
    add(pack_group("policy", f"policy.num_workers={pol.num_workers} x policy.num_gpus_per_worker={pol_gpus:g}",
                   count=pol.num_workers, gpus_each=pol_gpus, cpus_each=pol.num_cpus_per_worker,
                   resources_each=pol.resources, shape=shape))
    # ReferenceGroup gives each actor num_gpus_per_actor GPUs, or 1 when that is 0, on a GPU run.
    ref_gpus = gpus_per_actor(ref.num_gpus_per_actor, use_gpu=gpu)
    sizing = f"reference.num_actors={ref.num_actors} x {ref_gpus:g} GPU"
    if not needs_reference_group(cfg):
        pass  # SimPO / ORPO, LoRA with adapters_off: the run starts no reference actor, so no pods
    elif _reference_time_shared(cfg):
        _check_time_shared(groups[0], ref.num_actors, ref_gpus, ref.num_cpus_per_actor)
    else:
        add(pack_group("reference", sizing, count=ref.num_actors, gpus_each=ref_gpus,
                       cpus_each=ref.num_cpus_per_actor, resources_each=ref.resources, shape=shape))
    if _runs_engines(cfg):
        # GenerationGroup and RewardModelJudge give each actor its GPUs, or 1 when that is 0, on a GPU run.
        gen_gpus = gpus_per_actor(onl.num_gpus_per_engine, use_gpu=gpu)
        add(pack_group("generation", f"online.num_engines={onl.num_engines} x {gen_gpus:g} GPU",
                       count=onl.num_engines, gpus_each=gen_gpus, cpus_each=onl.num_cpus_per_engine,
                       resources_each=onl.resources, shape=shape))
        if onl.judge.reward_model:
            judge_gpus = gpus_per_actor(onl.judge.num_gpus_per_actor, use_gpu=gpu)
            add(pack_group("judge", f"online.judge.num_actors={onl.judge.num_actors} x {judge_gpus:g} GPU",
                           count=onl.judge.num_actors, gpus_each=judge_gpus, cpus_each=onl.judge.num_cpus_per_actor,
                           resources_each=onl.judge.resources, shape=shape))
    loose = [g.name for g in groups if g.gpus_per_pod and not g.ray_resources]
    if loose and sum(1 for g in groups if g.gpus_per_pod) > 1:
        keys = ", ".join(f"{RESOURCES_KEYS[name]} (e.g. {{{name}_node: 0.01}})" for name in loose)
        warnings.append(f"GPU group(s) {', '.join(loose)} are not pinned by Ray resources: their actors can "
                        f"take any free GPU, another group's included, if they start before that group's "
                        f"actors; set {keys}")
    return groups, warnings


RESOURCES_KEYS = {"policy": "policy.resources", "reference": "reference.resources",
                  "generation": "online.resources", "judge": "online.judge.resources"}
"""The config key whose custom Ray resources pin each worker group's actors to its pods."""


def _reference_time_shared(cfg: RunConfig) -> bool:
    """reference.precompute, no reference.resources and no held-out sampling: the reference
    actors score the data on the policy pods before training, then exit. (eval.prompts_file
    starts a second reference group that lives through training, so it needs pods of its own.)"""
    ref = cfg.reference
    return ref.precompute and not ref.resources and not cfg.eval.prompts_file


def _runs_engines(cfg: RunConfig) -> bool:
    """Whether the run starts generation engines (and a judge): online rounds or held-out sampling."""
    return cfg.online.enabled or bool(cfg.eval.prompts_file)


def _check_time_shared(policy: GroupPlan, count: int, gpus_each: float, cpus_each: float) -> None:
    """reference.precompute without resources: the actors borrow the policy pods before training."""
    if gpus_each > 0:
        fits = gpus_each <= policy.gpus_per_pod and count * gpus_each <= policy.total_gpus + 1e-9
        need, have = f"{count} x {gpus_each:g} GPU", f"{policy.total_gpus} policy GPUs"
    else:
        fits = count * cpus_each <= policy.replicas * policy.cpus_per_pod
        need, have = f"{count} x {cpus_each:g} CPU", f"{policy.replicas * policy.cpus_per_pod} policy CPUs"
    if not fits:
        raise K8sError(f"reference.precompute with no reference.resources scores the data on the policy "
                       f"pods before training, but {need} does not fit on {have}; lower "
                       f"reference.num_actors, or set reference.resources (e.g. {{reference_node: 0.01}}) "
                       f"to give the reference its own worker group")
