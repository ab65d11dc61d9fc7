"""``ray-dpo k8s``: render (checks, worker groups, documents) and its YAML text, the command's
options, and loading a config as the cluster will run it. Pure."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import yaml

from ray_dpo.config import REMOTE_PREFIXES, ConfigError, RunConfig, load_config
from ray_dpo.config.secrets import credentials
from ray_dpo.k8s.groups import GroupPlan, plan_groups
from ray_dpo.k8s.manifests import documents, k8s_name
from ray_dpo.k8s.options import (DEFAULT_STORAGE_MOUNT, EXIT_BAD_CONFIG, EXIT_OK, HF_KEYS, MLFLOW_KEYS, OBJECT_STORE_KEYS,
                                 ClusterShape, K8sError, K8sOptions, Storage, entrypoint)
from ray_dpo.loss_rules import needs_reference_group, reference_source


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (the config in the ConfigMap) as | blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)

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
        if reference_source(self.config) == "none":
            lines.append(f"# reference: none, loss.type={self.config.loss.type} is reference-free "
                         f"(no reference actors, no worker group)")
        elif not needs_reference_group(self.config):
            lines.append("# reference: the LoRA policy's base model, scored by the policy workers with the "
                         "adapters off (policy.lora.reference=adapters_off; no reference actors, no worker group)")
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
    return Rendered(documents=documents(cfg, opts, name=name, groups=groups), groups=groups, warnings=warnings,
                    config=cfg)


def _check_storage(cfg: RunConfig, storage: Storage) -> None:
    path = cfg.run.storage_path
    if storage.pvc and not (path == storage.mount or path.startswith(storage.mount + "/")):
        raise K8sError(f"run.storage_path {path!r} is not under the volume mounted at {storage.mount}")
    if not storage.pvc and not path.startswith(REMOTE_PREFIXES):
        raise K8sError(f"run.storage_path {path!r} would live on one pod's disk, but every worker writes "
                       f"checkpoints there; pass --storage pvc:CLAIM (a ReadWriteMany volume) or "
                       f"--storage s3://bucket/prefix")


def _check_no_inline_credentials(cfg: RunConfig) -> None:
    """Refuse a config whose URLs carry credentials: the ConfigMap would publish them to
    anyone who can read the namespace. Each is named with the Secret that carries it instead."""
    found = credentials(cfg)
    if not found:
        return
    lines = [f"  {key} holds {what}; {_secret_for(key)}" for key, what in found]
    raise K8sError("the config holds credentials in URLs, which would land in clear text in the ConfigMap "
                   "(and in MLflow params); drop them from the config:\n" + "\n".join(lines))


def _secret_for(key: str) -> str:
    """Where the credential of config field ``key`` goes instead (the Secrets the pods read)."""
    if key.startswith("tracking.mlflow."):
        return (f"put the URI and credentials in the Secret named by --mlflow-secret (keys {', '.join(MLFLOW_KEYS)}) "
                "and leave tracking_uri unset")
    if key.startswith(("model.", "reference.model")):
        return f"give the plain model id or path, and the hub token in the Secret named by --hf-secret (key {HF_KEYS[0]})"
    return (f"give the plain URI, and the object-store credentials in the Secret named by --object-store-secret "
            f"(keys {', '.join(OBJECT_STORE_KEYS)})")


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
