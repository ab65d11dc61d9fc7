"""The Kubernetes objects: pod templates, the RayClusterSpec, the ConfigMap and the RayJob or
RayCluster around them. Pure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ray_dpo.config import RunConfig, to_yaml
from ray_dpo.k8s.groups import GroupPlan
from ray_dpo.k8s.options import (CONFIG_DIR, CONFIG_KEY, GPU_TOLERATION_KEY, HF_KEYS, MLFLOW_KEYS,
                                 OBJECT_STORE_KEYS, OBJECT_STORE_REQUIRED, RAY_VERSION, K8sError, K8sOptions,
                                 entrypoint)

_MAX_NAME = 40  # KubeRay appends "-<group>-worker-<hash>" to pod names (63-char limit)


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
            env += _secret_env(OBJECT_STORE_KEYS, o.object_store_secret, required=OBJECT_STORE_REQUIRED)
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


def documents(cfg: RunConfig, opts: K8sOptions, *, name: str, groups: list[GroupPlan]) -> list[dict]:
    """[ConfigMap with the resolved config, RayJob or RayCluster (opts.kind)] named ``name``."""
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
    return [config_map, ray_obj]
