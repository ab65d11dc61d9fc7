"""Render a run config into KubeRay manifests: a ConfigMap plus a RayJob (or a RayCluster).

    ray-dpo k8s CONFIG [--set k=v] --image IMG --storage pvc:CLAIM | s3://... [secrets...]

The ConfigMap holds the *resolved* run config (YAML file + ``--set`` overrides, validated);
every Ray pod mounts it at ``/etc/ray-dpo/config.yaml`` and the RayJob's entrypoint is the
same ``ray-dpo train CONFIG`` command a laptop or ``ray job submit`` runs (`train_command`).

Worker groups are derived from the config, never written by hand, so the cluster and the
run cannot disagree:

    policy      policy.num_workers x policy.num_gpus_per_worker (+ policy.resources labels)
    reference   reference.num_actors x num_gpus_per_actor       (+ reference.resources labels)
                (1 GPU per actor when that is 0 on a GPU run, as ReferenceGroup does;
                 no group of its own with reference.precompute, no resources and no
                 eval.prompts_file: the actors score the data before training on the
                 policy GPUs, then exit; none at all for a reference-free loss, SimPO or
                 ORPO, which starts no reference actor)
    generation  online.num_engines x online.num_gpus_per_engine (+ online.resources labels)
    judge       online.judge.num_actors x num_gpus_per_actor    (+ online.judge.resources labels)
    eval-judge  eval.judge.num_actors x num_gpus_per_actor      (+ eval.judge.resources labels)
                (all: 1 GPU per actor when that is 0 on a GPU run, as GenerationGroup and
                 RewardModelJudge do; generation when online.enabled or eval.prompts_file,
                 a judge group when that judge is a reward model; the roles come from
                 ray_dpo.topology.roles, as the driver's and the local cluster's do)

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

Modules (import the names from ray_dpo.k8s):

    options.py     paths in the pod, the run command, ClusterShape / Storage / K8sOptions
    groups.py      worker groups: GroupPlan, pack_group, plan_groups
    manifests.py   pod templates, the RayClusterSpec, the ConfigMap and RayJob / RayCluster
    cli.py         render (checks + documents) and its YAML text, the ray-dpo k8s command

Pure: imports neither ray, deepspeed nor vllm.
"""

from ray_dpo.k8s.cli import Rendered, add_arguments, load_for_cluster, main, options_from_args, render
from ray_dpo.k8s.groups import RESOURCES_KEYS, GroupPlan, pack_group, plan_groups, uses_gpu
from ray_dpo.k8s.manifests import cluster_spec, documents, k8s_name
from ray_dpo.k8s.options import (CONFIG_DIR, CONFIG_KEY, CONFIG_PATH, DEFAULT_IMAGE, DEFAULT_STORAGE_MOUNT,
                                 EXIT_BAD_CONFIG, EXIT_OK, GPU_TOLERATION_KEY, HF_KEYS, MLFLOW_KEYS,
                                 OBJECT_STORE_KEYS, RAY_VERSION, ClusterShape, K8sError, K8sOptions, Storage,
                                 entrypoint, submit_command, train_command)

__all__ = [
    "CONFIG_DIR", "CONFIG_KEY", "CONFIG_PATH", "DEFAULT_IMAGE", "DEFAULT_STORAGE_MOUNT", "EXIT_BAD_CONFIG",
    "EXIT_OK", "GPU_TOLERATION_KEY", "HF_KEYS", "MLFLOW_KEYS", "OBJECT_STORE_KEYS", "RAY_VERSION",
    "RESOURCES_KEYS", "ClusterShape", "GroupPlan", "K8sError", "K8sOptions", "Rendered", "Storage",
    "add_arguments", "cluster_spec", "documents", "entrypoint", "k8s_name", "load_for_cluster", "main",
    "options_from_args", "pack_group", "plan_groups", "render", "submit_command", "train_command", "uses_gpu",
]
