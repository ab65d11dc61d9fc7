"""Render a run config into KubeRay manifests: a ConfigMap plus a RayJob (or a RayCluster).

    ray-dpo k8s CONFIG [--set k=v] --image IMG --storage pvc:CLAIM | s3://... [secrets...]

The ConfigMap holds the *resolved* run config (YAML file + ``--set`` overrides, validated);
every Ray pod mounts it at ``/etc/ray-dpo/config.yaml`` and the RayJob's entrypoint is the
same ``ray-dpo train CONFIG`` command a laptop or ``ray job submit`` runs (`train_command`).

Worker groups are derived from the config, never written by hand, so the cluster and the
run cannot disagree:

    policy      policy.num_workers x policy.gpus_per_worker     (+ policy.resources labels)
    reference   reference.num_actors x num_gpus_per_actor       (+ reference.resources labels)
                (1 GPU per actor when that is 0 on a GPU run, as ReferenceGroup does;
                 no group of its own with reference.precompute, no resources and no
                 eval.prompts_file: the actors score the data before training on the
                 policy GPUs, then exit; none at all for a reference-free loss, SimPO or
                 ORPO, which starts no reference actor)
    generation  online.num_engines x online.gpus_per_engine     (+ online.resources labels)
    judge       online.judge.num_actors x num_gpus_per_actor    (+ online.judge.resources labels)
                (both: 1 GPU per actor when that is 0 on a GPU run, as GenerationGroup and
                 RewardModelJudge do; generation when online.enabled or eval.prompts_file,
                 judge when that judge is a reward model)

A GPU group whose actors request no custom resource is not pinned: its actors may take a
free GPU of another group's pods. With more than one GPU group, the render warns about each
such group and names the resources key that pins it.

Each group packs its actors into identical pods of at most ``--gpus-per-node`` GPUs, choosing
the largest pod size that divides the actor count, so no pod holds an idle GPU.

Secrets: the renderer never reads secret values. Credentials (MLflow, object store, Hugging
Face) reach pods only as ``env[].valueFrom.secretKeyRef`` to Secrets you create; the Ray
dashboard stays behind a ClusterIP service; Ray token auth stays on (``authOptions.mode:
token``: KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret in every Ray
container, the job submitter included).

Pure: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ray_dpo.config import REMOTE_PREFIXES, ConfigError, RunConfig, load_config, to_yaml
from ray_dpo.loss_rules import needs_reference
from ray_dpo.resources import gpus_per_actor

RAY_VERSION = "2.60.0"
"""Ray in the image (deploy/Dockerfile) and pyproject.toml; KubeRay needs it >= 2.52 for token auth."""
CONFIG_DIR = "/etc/ray-dpo"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
DEFAULT_IMAGE = "ray-dpo:0.1.0"
DEFAULT_STORAGE_MOUNT = "/mnt/ray-dpo"
GPU_TOLERATION_KEY = "nvidia.com/gpu"

# Secret keys (= env var names) the pods read; see docs/deploy.md for `kubectl create secret`.
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")
OBJECT_STORE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                     "AWS_REGION", "AWS_ENDPOINT_URL")
_OBJECT_STORE_REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
HF_KEYS = ("HF_TOKEN",)

EXIT_OK, EXIT_BAD_CONFIG = 0, 2  # same meaning as in ray_dpo.cli

_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_NAME = 40  # KubeRay appends "-<group>-worker-<hash>" to pod names (63-char limit)


class K8sError(ValueError):
    """The config cannot be laid out on pods as asked; the message says how to fix it."""


# --------------------------------------------------------------------------- the command


def train_command(config_path: str = CONFIG_PATH) -> list[str]:
    """The one command that runs a config: on a laptop, under ``ray job submit``, in a RayJob."""
    return ["ray-dpo", "train", config_path]


def submit_command(address: str, config_path: str = CONFIG_PATH) -> list[str]:
    """``ray job submit`` of `train_command` (e.g. to a RayCluster rendered with --kind raycluster)."""
    return ["ray", "job", "submit", "--address", address, "--", *train_command(config_path)]


def entrypoint(config_path: str = CONFIG_PATH) -> str:
    """`train_command` as the shell string a RayJob's spec.entrypoint holds."""
    return shlex.join(train_command(config_path))


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ClusterShape:
    """How actors are packed into pods and how big each pod is."""

    gpus_per_node: int = 8
    """Most GPUs one pod may request (the GPUs of one node)."""
    cpus_per_gpu: int = 8
    """CPU request per GPU of a GPU pod (data tasks and model loading use them)."""
    memory_per_gpu_gi: int = 64
    """Memory request (GiB) per GPU of a GPU pod: ZeRO-3 model loading and the object store."""
    cpus_per_node: int = 16
    """Most CPUs one CPU-only worker pod packs actors onto."""
    memory_per_cpu_gi: int = 4
    head_cpus: int = 8
    head_memory_gi: int = 32
    gpu_resource: str = "nvidia.com/gpu"
    """Kubernetes extended resource name of a GPU (amd.com/gpu on AMD nodes)."""


@dataclass(frozen=True)
class Storage:
    """Where run.storage_path lives: a PersistentVolumeClaim mounted in every pod, or a URI."""

    pvc: Optional[str] = None
    uri: Optional[str] = None
    mount: str = DEFAULT_STORAGE_MOUNT

    @classmethod
    def parse(cls, value: Optional[str], *, mount: str = DEFAULT_STORAGE_MOUNT) -> "Storage":
        """``pvc:CLAIM`` or an object-store URI (s3://, gs://, ...); None keeps the config's."""
        if not value:
            return cls(mount=mount)
        if value.startswith("pvc:"):
            claim = value[4:]
            if not _DNS1123.fullmatch(claim):
                raise K8sError(f"--storage {value!r}: the claim name must be a DNS-1123 name")
            return cls(pvc=claim, mount=mount.rstrip("/"))
        if value.startswith(REMOTE_PREFIXES):
            return cls(uri=value, mount=mount)
        raise K8sError(f"--storage {value!r}: use pvc:CLAIM (a ReadWriteMany volume claim) "
                       f"or an object-store URI ({', '.join(REMOTE_PREFIXES[:3])} ...)")

    def storage_path(self, current: str) -> Optional[str]:
        """The run.storage_path the cluster run must use, or None to keep ``current``."""
        if self.uri:
            return self.uri
        if self.pvc:
            inside = current == self.mount or current.startswith(self.mount + "/")
            return None if inside else f"{self.mount}/runs"
        return None


@dataclass(frozen=True)
class K8sOptions:
    image: str = DEFAULT_IMAGE
    namespace: Optional[str] = None
    name: Optional[str] = None
    """Name of the RayJob / RayCluster; default: run.name made DNS-safe."""
    kind: str = "rayjob"
    storage: Storage = field(default_factory=Storage)
    mlflow_secret: Optional[str] = None
    object_store_secret: Optional[str] = None
    hf_secret: Optional[str] = None
    auth_secret: Optional[str] = None
    """Secret with key auth_token for Ray token auth (KubeRay >= 1.6); default: KubeRay makes one."""
    service_account: Optional[str] = None
    image_pull_policy: str = "IfNotPresent"
    ttl_seconds: int = 600
    """Seconds the finished RayJob's cluster stays up for logs before KubeRay deletes it."""
    retries: int = 2
    """RayJob backoffLimit: a failed job (e.g. a preempted node) runs again on a new cluster
    with the same config, so it resumes from its last checkpoint."""
    shape: ClusterShape = field(default_factory=ClusterShape)


# --------------------------------------------------------------------------- worker groups


@dataclass(frozen=True)
class GroupPlan:
    """One KubeRay worker group: `replicas` identical pods of `per_pod` actors each."""

    name: str
    sizing: str
    """Human-readable arithmetic, e.g. "policy.num_workers=16 x policy.gpus_per_worker=1"."""
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
    online = _runs_engines(cfg) and (cfg.online.gpus_per_engine > 0 or cfg.online.judge.num_gpus_per_actor > 0)
    reference = needs_reference(cfg) and cfg.reference.num_gpus_per_actor > 0
    return cfg.policy.gpus_per_worker > 0 or reference or online


def plan_groups(cfg: RunConfig, shape: ClusterShape) -> tuple[list[GroupPlan], list[str]]:
    """The worker groups a run needs, each sized from its own config section."""
    gpu = uses_gpu(cfg)
    pol, ref, onl = cfg.policy, cfg.reference, cfg.online
    groups, warnings = [], []

    def add(plan_and_warnings):
        groups.append(plan_and_warnings[0])
        warnings.extend(plan_and_warnings[1])

    pol_gpus = pol.gpus_per_worker if gpu else 0.0
    add(pack_group("policy", f"policy.num_workers={pol.num_workers} x policy.gpus_per_worker={pol_gpus:g}",
                   count=pol.num_workers, gpus_each=pol_gpus, cpus_each=pol.cpus_per_worker,
                   resources_each=pol.resources, shape=shape))
    # ReferenceGroup gives each actor num_gpus_per_actor GPUs, or 1 when that is 0, on a GPU run.
    ref_gpus = gpus_per_actor(ref.num_gpus_per_actor, use_gpu=gpu)
    sizing = f"reference.num_actors={ref.num_actors} x {ref_gpus:g} GPU"
    if not needs_reference(cfg):
        pass  # SimPO / ORPO: the run starts no reference actor, so it gets no pods
    elif _reference_time_shared(cfg):
        _check_time_shared(groups[0], ref.num_actors, ref_gpus, ref.num_cpus_per_actor)
    else:
        add(pack_group("reference", sizing, count=ref.num_actors, gpus_each=ref_gpus,
                       cpus_each=ref.num_cpus_per_actor, resources_each=ref.resources, shape=shape))
    if _runs_engines(cfg):
        # GenerationGroup and RewardModelJudge give each actor its GPUs, or 1 when that is 0, on a GPU run.
        gen_gpus = gpus_per_actor(onl.gpus_per_engine, use_gpu=gpu)
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


# --------------------------------------------------------------------------- rendering


def k8s_name(text: str) -> str:
    """A DNS-1123 label from a run name: lower case, [-a-z0-9], at most 40 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:_MAX_NAME].strip("-")
    if not name:
        raise K8sError(f"cannot make a Kubernetes name from {text!r}; pass --name")
    return name


def _quantity_gi(gi: int) -> str:
    return f"{gi}Gi"


def _secret_env(names: tuple[str, ...], secret: str, *, required: tuple[str, ...] = ()) -> list[dict]:
    """Env vars whose values live in a Secret (keys = env names); never a literal value."""
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         "optional": key not in required}}}
            for key in names]


def _ray_resources_param(resources: dict[str, int]) -> str:
    # KubeRay passes rayStartParams to `ray start` through a shell; custom resources must be
    # a double-quoted JSON string with escaped quotes, as in KubeRay's samples.
    return '"' + json.dumps(resources, sort_keys=True).replace('"', '\\"') + '"'


@dataclass
class _Pods:
    """Everything the pod templates share, computed once from the options."""

    opts: K8sOptions
    name: str
    mlflow_uri_in_config: bool

    def env(self, *, head: bool) -> list[dict]:
        o = self.opts
        env: list[dict] = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
                           {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
                           {"name": "HF_HOME", "value": "/home/ray/.cache/huggingface"}]
        if o.object_store_secret:
            env += _secret_env(OBJECT_STORE_KEYS, o.object_store_secret, required=_OBJECT_STORE_REQUIRED)
        if o.hf_secret:
            env += _secret_env(HF_KEYS, o.hf_secret, required=HF_KEYS)
        # Only the driver (head) talks to MLflow: workers report through Ray Train.
        if head and o.mlflow_secret:
            required = () if self.mlflow_uri_in_config else ("MLFLOW_TRACKING_URI",)
            env += _secret_env(MLFLOW_KEYS, o.mlflow_secret, required=required)
        return env

    def template(self, *, group: str, head: bool, gpus: int, cpus: int, memory_gi: int) -> dict:
        o = self.opts
        limits = {"cpu": str(cpus), "memory": _quantity_gi(memory_gi)}
        if gpus:
            limits[o.shape.gpu_resource] = str(gpus)
        mounts = [{"name": "ray-dpo-config", "mountPath": CONFIG_DIR, "readOnly": True},
                  {"name": "dshm", "mountPath": "/dev/shm"},
                  {"name": "cache", "mountPath": "/home/ray/.cache"}]
        volumes = [{"name": "ray-dpo-config",
                    "configMap": {"name": f"{self.name}-config", "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
                   # NCCL and the Ray object store need more shared memory than the runtime's 64 MiB.
                   {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                   {"name": "cache", "emptyDir": {}}]
        if o.storage.pvc:
            mounts.append({"name": "storage", "mountPath": o.storage.mount})
            volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": o.storage.pvc}})
        container: dict[str, Any] = {
            "name": "ray-head" if head else "ray-worker",
            "image": o.image,
            "imagePullPolicy": o.image_pull_policy,
            "env": self.env(head=head),
            "resources": {"requests": dict(limits), "limits": dict(limits)},
            "volumeMounts": mounts,
        }
        if head:
            container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                                  {"containerPort": 8265, "name": "dashboard"},
                                  {"containerPort": 10001, "name": "client"}]
        spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
        if gpus:
            spec["tolerations"] = [{"key": GPU_TOLERATION_KEY, "operator": "Exists", "effect": "NoSchedule"}]
        if o.service_account:
            spec["serviceAccountName"] = o.service_account
        labels = {"app.kubernetes.io/name": "ray-dpo", "app.kubernetes.io/instance": self.name,
                  "ray-dpo/group": group}
        return {"metadata": {"labels": labels}, "spec": spec}


def _metadata(name: str, opts: K8sOptions, *, instance: str) -> dict:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = {"app.kubernetes.io/name": "ray-dpo", "app.kubernetes.io/instance": instance}
    return meta


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (the config in the ConfigMap) as | blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def cluster_spec(groups: list[GroupPlan], pods: _Pods) -> dict:
    """The RayClusterSpec shared by the RayJob and the RayCluster."""
    shape = pods.opts.shape
    auth: dict[str, Any] = {"mode": "token"}
    if pods.opts.auth_secret:
        auth["secretName"] = pods.opts.auth_secret
    head = {
        # ClusterIP only: reach the dashboard with `kubectl port-forward`, never from outside.
        "serviceType": "ClusterIP",
        "enableIngress": False,
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": str(shape.head_cpus), "num-gpus": "0"},
        "template": pods.template(group="head", head=True, gpus=0, cpus=shape.head_cpus,
                                  memory_gi=shape.head_memory_gi),
    }
    workers = []
    for g in groups:
        params = {"num-cpus": str(g.cpus_per_pod), "num-gpus": str(g.gpus_per_pod)}
        if g.ray_resources:
            params["resources"] = _ray_resources_param(g.ray_resources)
        workers.append({
            "groupName": g.name,
            # Fixed size: the run needs exactly these pods, no autoscaling.
            "replicas": g.replicas, "minReplicas": g.replicas, "maxReplicas": g.replicas,
            "rayStartParams": params,
            "template": pods.template(group=g.name, head=False, gpus=g.gpus_per_pod,
                                      cpus=g.cpus_per_pod, memory_gi=g.memory_gi),
        })
    return {"rayVersion": RAY_VERSION, "authOptions": auth, "enableInTreeAutoscaling": False,
            "headGroupSpec": head, "workerGroupSpecs": workers}


@dataclass
class Rendered:
    documents: list[dict]
    groups: list[GroupPlan]
    warnings: list[str]
    config: RunConfig
    """The resolved config the ConfigMap holds (storage_path as the cluster sees it)."""

    def text(self, *, source: str) -> str:
        """Multi-document YAML with a comment header that shows the resource arithmetic."""
        lines = [f"# Rendered by `ray-dpo k8s` from {source}; do not edit, render again.",
                 f"# entrypoint: {entrypoint()}"]
        for g in self.groups:
            lines.append(f"# worker group {g.name}: {g.sizing} -> {g.replicas} pod(s) of {g.per_pod}, "
                         f"each {g.gpus_per_pod} GPU / {g.cpus_per_pod} CPU / {g.memory_gi}Gi")
        if not needs_reference(self.config):
            lines.append(f"# reference: none, loss.type={self.config.loss.type} is reference-free "
                         f"(no reference actors, no worker group)")
        elif not any(g.name == "reference" for g in self.groups):
            ref = self.config.reference
            lines.append(f"# reference: reference.precompute, {ref.num_actors} actor(s) score the data on the "
                         f"policy pods before training, then exit (no worker group of its own)")
        lines += [f"# warning: {w}" for w in self.warnings]
        body = yaml.dump_all(self.documents, Dumper=_Dumper, sort_keys=False, width=100)
        return "\n".join(lines) + "\n---\n" + body


def render(cfg: RunConfig, opts: K8sOptions) -> Rendered:
    """ConfigMap + RayJob (or RayCluster) for a validated config; raises K8sError."""
    if opts.kind not in ("rayjob", "raycluster"):
        raise K8sError(f"--kind must be rayjob or raycluster, got {opts.kind!r}")
    _check_storage(cfg, opts.storage)
    _check_no_inline_credentials(cfg)
    name = k8s_name(opts.name or cfg.run.name)
    groups, warnings = plan_groups(cfg, opts.shape)
    warnings += _path_warnings(cfg, opts.storage)
    pods = _Pods(opts=opts, name=name, mlflow_uri_in_config=bool(cfg.tracking.mlflow.tracking_uri))
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": _metadata(f"{name}-config", opts, instance=name),
                  "data": {CONFIG_KEY: to_yaml(cfg)}}
    spec = cluster_spec(groups, pods)
    if opts.kind == "rayjob":
        ray_obj = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(name, opts, instance=name),
                   "spec": {"entrypoint": entrypoint(),
                            "submissionMode": "K8sJobMode",
                            "shutdownAfterJobFinishes": True,
                            "ttlSecondsAfterFinished": opts.ttl_seconds,
                            "backoffLimit": opts.retries,
                            "rayClusterSpec": spec}}
    else:
        ray_obj = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(name, opts, instance=name),
                   "spec": spec}
    return Rendered(documents=[config_map, ray_obj], groups=groups, warnings=warnings, config=cfg)


def _check_storage(cfg: RunConfig, storage: Storage) -> None:
    path = cfg.run.storage_path
    if storage.pvc and not (path == storage.mount or path.startswith(storage.mount + "/")):
        raise K8sError(f"run.storage_path {path!r} is not under the volume mounted at {storage.mount}")
    if not storage.pvc and not path.startswith(REMOTE_PREFIXES):
        raise K8sError(f"run.storage_path {path!r} would live on one pod's disk, but every worker writes "
                       f"checkpoints there; pass --storage pvc:CLAIM (a ReadWriteMany volume) or "
                       f"--storage s3://bucket/prefix")


def _check_no_inline_credentials(cfg: RunConfig) -> None:
    uri = cfg.tracking.mlflow.tracking_uri or ""
    if re.match(r"^[a-z][a-z0-9+.-]*://[^/@]+:[^/@]*@", uri):
        raise K8sError("tracking.mlflow.tracking_uri holds a password, which would land in a ConfigMap; "
                       "put the URI and credentials in the Secret named by --mlflow-secret "
                       f"(keys {', '.join(MLFLOW_KEYS)}) and drop them from the config")


def _path_warnings(cfg: RunConfig, storage: Storage) -> list[str]:
    """Paths that will not mean, inside a pod, what they meant on the machine that rendered."""
    paths = [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
             ("model.chat_template", cfg.model.chat_template), ("reference.model", cfg.reference.model),
             ("eval.prompts_file", cfg.eval.prompts_file)]
    paths += [(f"data.train_files[{i}]", p) for i, p in enumerate(cfg.data.train_files)]
    paths += [(f"data.eval_files[{i}]", p) for i, p in enumerate(cfg.data.eval_files)]
    warnings = [f"{key} {path!r} is relative: in a pod it resolves against the job's working directory; "
                f"use a mounted absolute path, an object-store URI or a hub id"
                for key, path in paths if path and path.startswith(("./", "../", "~"))]
    cache = cfg.reference.cache_dir
    if cache and not cache.startswith(REMOTE_PREFIXES) and not (storage.pvc and cache.startswith(storage.mount + "/")):
        warnings.append(f"reference.cache_dir {cache!r} is not on the shared storage: a retried job "
                        f"recomputes the reference; leave it unset (<storage_path>/reference_cache)")
    return warnings


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The k8s subcommand's options (CONFIG and --set come from ray_dpo.cli)."""
    d, s = K8sOptions(), ClusterShape()
    p.add_argument("--kind", choices=("rayjob", "raycluster"), default="rayjob",
                   help="rayjob: runs the config and deletes its cluster when done (default); "
                        "raycluster: a long-lived cluster for interactive `ray job submit`")
    p.add_argument("--image", default=d.image, help=f"ray_dpo image built from deploy/Dockerfile (default {d.image})")
    p.add_argument("--namespace", help="namespace of every object (default: kubectl's current one)")
    p.add_argument("--name", help="RayJob/RayCluster name (default: run.name)")
    p.add_argument("--storage", metavar="pvc:CLAIM|URI",
                   help="where run.storage_path lives: pvc:CLAIM mounts a ReadWriteMany claim in every "
                        "pod (storage_path moves under it unless already there), or s3://... / gs://...")
    p.add_argument("--storage-mount", default=DEFAULT_STORAGE_MOUNT, help="mount path of the PVC")
    p.add_argument("--mlflow-secret", metavar="NAME",
                   help=f"Secret with the MLflow keys {', '.join(MLFLOW_KEYS)} (driver only)")
    p.add_argument("--object-store-secret", metavar="NAME",
                   help=f"Secret with {', '.join(OBJECT_STORE_KEYS)} for s3:// data and storage")
    p.add_argument("--hf-secret", metavar="NAME", help="Secret with HF_TOKEN for gated hub models")
    p.add_argument("--auth-secret", metavar="NAME",
                   help="Secret with key auth_token for Ray token auth (KubeRay >= 1.6); "
                        "default: KubeRay generates one per cluster")
    p.add_argument("--service-account", metavar="NAME", help="pod service account (e.g. for cloud IAM)")
    p.add_argument("--ttl", type=int, default=d.ttl_seconds, dest="ttl_seconds",
                   help=f"seconds a finished RayJob's cluster is kept (default {d.ttl_seconds})")
    p.add_argument("--retries", type=int, default=d.retries,
                   help=f"RayJob backoffLimit: reruns on a new cluster resume from the last checkpoint "
                        f"(default {d.retries})")
    p.add_argument("--gpus-per-node", type=int, default=s.gpus_per_node)
    p.add_argument("--cpus-per-gpu", type=int, default=s.cpus_per_gpu)
    p.add_argument("--memory-per-gpu-gi", type=int, default=s.memory_per_gpu_gi)
    p.add_argument("--cpus-per-node", type=int, default=s.cpus_per_node, help="CPU-only worker pods")
    p.add_argument("--memory-per-cpu-gi", type=int, default=s.memory_per_cpu_gi)
    p.add_argument("--head-cpus", type=int, default=s.head_cpus)
    p.add_argument("--head-memory-gi", type=int, default=s.head_memory_gi)
    p.add_argument("--gpu-resource", default=s.gpu_resource)


def options_from_args(args: argparse.Namespace) -> K8sOptions:
    shape = ClusterShape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterShape)})
    for key in ("gpus_per_node", "cpus_per_gpu", "cpus_per_node", "head_cpus", "memory_per_gpu_gi",
                "memory_per_cpu_gi", "head_memory_gi"):
        if getattr(shape, key) < 1:
            raise K8sError(f"--{key.replace('_', '-')} must be >= 1")
    if args.ttl_seconds < 0 or args.retries < 0:
        raise K8sError("--ttl and --retries must be >= 0")
    return K8sOptions(image=args.image, namespace=args.namespace, name=args.name, kind=args.kind,
                      storage=Storage.parse(args.storage, mount=args.storage_mount),
                      mlflow_secret=args.mlflow_secret, object_store_secret=args.object_store_secret,
                      hf_secret=args.hf_secret, auth_secret=args.auth_secret,
                      service_account=args.service_account, ttl_seconds=args.ttl_seconds,
                      retries=args.retries, shape=shape)


def load_for_cluster(path: str, overrides: list[str], storage: Storage) -> RunConfig:
    """Load and validate a config as the cluster will run it.

    Local files are not checked here: model and data paths name the pods' filesystem.
    The storage option becomes one more override, so validation sees the final path.
    """
    cfg = load_config(path, overrides, check_files=False)
    moved = storage.storage_path(cfg.run.storage_path)
    if moved is not None:
        cfg = load_config(path, [*overrides, f"run.storage_path={moved}"], check_files=False)
    return cfg


def main(args: argparse.Namespace) -> int:
    """``ray-dpo k8s``: print the manifests to stdout, warnings and errors to stderr."""
    try:
        opts = options_from_args(args)
        cfg = load_for_cluster(args.config, args.overrides, opts.storage)
        rendered = render(cfg, opts)
    except (ConfigError, K8sError) as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_CONFIG
    for w in rendered.warnings:
        print(f"[ray_dpo k8s] warning: {w}", file=sys.stderr)
    sys.stdout.write(rendered.text(source=args.config))
    return EXIT_OK
