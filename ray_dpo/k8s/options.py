"""The renderer's vocabulary: where things live in a pod, the run command, and the options
of ``ray-dpo k8s`` (ClusterShape, Storage, K8sOptions). Pure."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from ray_dpo.config import REMOTE_PREFIXES

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
OBJECT_STORE_REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
HF_KEYS = ("HF_TOKEN",)

EXIT_OK, EXIT_BAD_CONFIG = 0, 2  # same meaning as in ray_dpo.cli

_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


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
