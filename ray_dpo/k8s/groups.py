"""Worker groups: each role's actors laid out on identical pods, sized from its config section. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray_dpo.config import RunConfig
from ray_dpo.k8s.options import ClusterShape, K8sError
from ray_dpo.topology import BEFORE_TRAINING, roles


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
    """Whether the rendered cluster has GPUs (what the driver's run.device=auto then sees):
    run.device, or with auto, whether any role's section asks for a GPU."""
    if cfg.run.device != "auto":
        return cfg.run.device == "cuda"
    sections = {"policy": cfg.policy.num_gpus_per_worker, "reference": cfg.reference.num_gpus_per_actor,
                "online": cfg.online.num_gpus_per_engine, "online.judge": cfg.online.judge.num_gpus_per_actor,
                "eval.judge": cfg.eval.judge.num_gpus_per_actor}
    return any(sections[role.key] > 0 for role in roles(cfg, use_gpu=False))


def plan_groups(cfg: RunConfig, shape: ClusterShape) -> tuple[list[GroupPlan], list[str]]:
    """One worker group per role the run starts (ray_dpo.topology.roles), each sized from its
    own config section. A reference that lives before training only, with no resources of
    its own, borrows the policy pods instead (reference.precompute)."""
    groups, warnings = [], []
    for role in roles(cfg, use_gpu=uses_gpu(cfg)):
        sizing = (f"{role.key}.{COUNT_KEYS[role.name]}={role.count} x "
                  + (f"{role.key}.num_gpus_per_worker={role.gpus:g}" if role.name == "policy" else f"{role.gpus:g} GPU"))
        if role.name == "reference" and role.when == BEFORE_TRAINING and not role.resources:
            _check_time_shared(groups[0], role.count, role.gpus, role.cpus)
            continue
        plan, more = pack_group(role.name, sizing, count=role.count, gpus_each=role.gpus, cpus_each=role.cpus,
                                resources_each=role.resources, shape=shape)
        groups.append(plan)
        warnings.extend(more)
    loose = [g.name for g in groups if g.gpus_per_pod and not g.ray_resources]
    if loose and sum(1 for g in groups if g.gpus_per_pod) > 1:
        keys = ", ".join(f"{RESOURCES_KEYS[name]} (e.g. {{{name}_node: 0.01}})" for name in loose)
        warnings.append(f"GPU group(s) {', '.join(loose)} are not pinned by Ray resources: their actors can "
                        f"take any free GPU, another group's included, if they start before that group's "
                        f"actors; set {keys}")
    return groups, warnings


COUNT_KEYS = {"policy": "num_workers", "reference": "num_actors", "generation": "num_engines",
              "judge": "num_actors", "eval-judge": "num_actors"}
"""The count key of each role's section (the sizing line names it)."""

RESOURCES_KEYS = {"policy": "policy.resources", "reference": "reference.resources",
                  "generation": "online.resources", "judge": "online.judge.resources",
                  "eval-judge": "eval.judge.resources"}
"""The config key whose custom Ray resources pin each worker group's actors to its pods."""


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
