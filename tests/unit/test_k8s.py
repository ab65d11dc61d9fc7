"""`ray-dpo k8s`: KubeRay manifests rendered from run configs, checked against schemas.

Core objects (ConfigMap, the static Deployment/Service/PVC, and every pod template inside a
RayJob or RayCluster, as io.k8s.api.core.v1.PodTemplateSpec) are validated against the
Kubernetes OpenAPI schemas shipped by the `kubernetes-validate` package, in their strict form
(unknown fields are errors). The ray.io/v1 layers around the pod templates are checked against
a strict schema written here from KubeRay's Go types (apis/ray/v1/rayjob_types.go,
raycluster_types.go), so a misspelled KubeRay field fails too.
"""

from __future__ import annotations

import copy
import glob
import importlib.metadata
import importlib.resources
import json
import math
import os
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from ray_dpo import cli, k8s
from ray_dpo.config import from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
REAL_CONFIGS = [c for c in CONFIGS if os.path.basename(c).startswith("llama3-")]
K8S_VERSION = "1.33"
STORAGE = "pvc:ray-dpo-runs"
SECRET_OPTS = ["--mlflow-secret", "mlflow-credentials", "--object-store-secret", "s3-credentials",
               "--hf-secret", "hf-token"]
# The exact commands deploy/rayjob.yaml and deploy/raycluster.yaml were rendered with.
STATIC = {
    "rayjob.yaml": ["configs/llama3-8b-offline-2x8.yaml", "--namespace", "ray-dpo",
                    "--image", "REGISTRY/ray-dpo:0.1.0", "--storage", STORAGE, *SECRET_OPTS],
    "raycluster.yaml": ["configs/llama3-8b-offline-2x8.yaml", "--kind", "raycluster", "--namespace", "ray-dpo",
                        "--image", "REGISTRY/ray-dpo:0.1.0", "--storage", STORAGE, *SECRET_OPTS],
}


# --------------------------------------------------------------------------- schemas


def _schema_dir() -> Path:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return Path(str(root / f"v{K8S_VERSION}.0-local-strict"))


def _registry() -> Registry:
    d = _schema_dir()
    resources = [Resource.from_contents(json.loads((d / name).read_text()))
                 for name in ("_definitions.json", "podtemplatespec-v1.json")]
    registry = Registry()
    for r in resources:
        registry = r @ registry
    return registry


REGISTRY = _registry()
POD_TEMPLATE = {"$ref": "https://kubernetes.io/api/podtemplatespec/v1"}
OBJECT_META = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def _strict(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# Field names from KubeRay's ray.io/v1 Go types (json tags).
WORKER_GROUP = _strict({
    "suspend": {"type": "boolean"}, "groupName": {"type": "string"}, "replicas": INT32,
    "minReplicas": INT32, "maxReplicas": INT32, "idleTimeoutSeconds": INT32, "rayStartParams": STR_MAP,
    "template": POD_TEMPLATE, "scaleStrategy": {"type": "object"}, "numOfHosts": INT32,
}, required=("groupName", "template", "rayStartParams"))
HEAD_GROUP = _strict({
    "template": POD_TEMPLATE, "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
    "rayStartParams": STR_MAP, "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
}, required=("template", "rayStartParams"))
CLUSTER_SPEC = _strict({
    "upgradeStrategy": {"type": "object"},
    "authOptions": _strict({"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                            "enableK8sTokenAuth": {"type": "boolean"}}),
    "suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "autoscalerOptions": {"type": "object"},
    "headServiceAnnotations": STR_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": {"type": "object"}, "headGroupSpec": HEAD_GROUP,
    "rayVersion": {"type": "string"}, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
}, required=("headGroupSpec",))
RAYJOB_SPEC = _strict({
    "activeDeadlineSeconds": INT32, "backoffLimit": INT32, "rayClusterSpec": CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE, "metadata": STR_MAP, "clusterSelector": STR_MAP,
    "submitterConfig": _strict({"backoffLimit": INT32}), "managedBy": {"type": "string"},
    "deletionStrategy": {"type": "object"}, "entrypoint": {"type": "string"},
    "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
    "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": INT32,
    "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
})


def _ray_schema(kind: str) -> dict:
    spec = RAYJOB_SPEC if kind == "RayJob" else CLUSTER_SPEC
    return _strict({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                    "metadata": OBJECT_META, "spec": spec}, required=("apiVersion", "kind", "metadata", "spec"))


def validate_object(obj: dict) -> None:
    """Raise if `obj` breaks its schema (Kubernetes core kinds, or KubeRay's ray.io/v1)."""
    if obj["apiVersion"] == "ray.io/v1":
        jsonschema.Draft202012Validator(_ray_schema(obj["kind"]), registry=REGISTRY).validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_pod_template(template: dict) -> None:
    jsonschema.Draft202012Validator(POD_TEMPLATE, registry=REGISTRY).validate(template)


# --------------------------------------------------------------------------- helpers


def render_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["k8s", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def ray_object(docs: list[dict]) -> dict:
    (obj,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    return obj


def cluster_of(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> dict[str, dict]:
    spec = cluster_of(obj)
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])})
    return out


def worker_groups(obj: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_of(obj).get("workerGroupSpecs", [])}


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def gpus_of(template: dict) -> int:
    limits = container(template)["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def render_config(path: str, *extra: str) -> list[dict]:
    """Render in-process, through the same argument parsing as `ray-dpo k8s`."""
    args = cli.build_parser().parse_args(["k8s", path, "--storage", STORAGE, *SECRET_OPTS, *extra])
    opts = k8s.options_from_args(args)
    return k8s.render(k8s.load_for_cluster(path, args.overrides, opts.storage), opts).documents


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("kind", ["rayjob", "raycluster"])
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_renders_schema_valid_manifests(path, kind, capsys):
    code, out, err = render_cli([path, "--kind", kind, "--storage", STORAGE, *SECRET_OPTS], capsys)
    assert code == 0, err
    docs = docs_of(out)
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob" if kind == "rayjob" else "RayCluster"]
    for doc in docs:
        validate_object(doc)
    templates = pod_templates(ray_object(docs))
    assert "head" in templates and "policy" in templates
    for template in templates.values():
        validate_pod_template(template)


def test_the_schemas_catch_wrong_fields():
    """The validators above are not vacuous: a misspelled field or a bad type fails each layer."""
    docs = render_config(REAL_CONFIGS[0])
    job = ray_object(docs)
    for path, bad in [(("spec", "shutdownAfterJobFinish"), True),                                      # KubeRay typo
                      (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 2),               # KubeRay typo
                      (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 8),  # not a string
                      (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0,
                        "envFrom"), "x")]:                                                             # core type
        broken = copy.deepcopy(job)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        with pytest.raises(jsonschema.ValidationError):
            validate_object(broken)
    config_map = copy.deepcopy(docs[0])
    config_map["date"] = config_map.pop("data")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(config_map)


# --------------------------------------------------------------------------- sizes


def expected_gpus(path: str) -> dict[str, float]:
    """Each role's GPUs computed straight from the config (independently of ray_dpo.k8s)."""
    return expected_gpus_of(load_config(path, [f"run.storage_path={k8s.DEFAULT_STORAGE_MOUNT}/runs"],
                                        check_files=False))


def expected_gpus_of(cfg) -> dict[str, float]:
    gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and cfg.policy.num_gpus_per_worker > 0)
    out = {"policy": cfg.policy.num_workers * cfg.policy.num_gpus_per_worker if gpu else 0}
    if not (cfg.reference.precompute and not cfg.reference.resources and not cfg.eval.prompts_file):
        out["reference"] = cfg.reference.num_actors * ((cfg.reference.num_gpus_per_actor or 1) if gpu else 0)
    if cfg.online.enabled or cfg.eval.prompts_file:  # engines and judge sample held-out prompts too
        out["generation"] = cfg.online.num_engines * ((cfg.online.num_gpus_per_engine or 1) if gpu else 0)
        if cfg.online.judge.reward_model:
            out["judge"] = cfg.online.judge.num_actors * ((cfg.online.judge.num_gpus_per_actor or 1) if gpu else 0)
    return out


RESOURCES = {"policy": lambda c: c.policy.resources, "reference": lambda c: c.reference.resources,
             "generation": lambda c: c.online.resources, "judge": lambda c: c.online.judge.resources}
COUNTS = {"policy": lambda c: c.policy.num_workers, "reference": lambda c: c.reference.num_actors,
          "generation": lambda c: c.online.num_engines, "judge": lambda c: c.online.judge.num_actors}


def advertised(group: dict) -> dict:
    """The custom Ray resources a rendered worker group's pods advertise (KubeRay quoting undone)."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_replicas_and_gpu_requests_match_the_config(path):
    cfg = load_config(path, [f"run.storage_path={k8s.DEFAULT_STORAGE_MOUNT}/runs"], check_files=False)
    job = ray_object(render_config(path))
    groups = worker_groups(job)
    want = expected_gpus(path)
    assert set(groups) == set(want)
    for name, group in groups.items():
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1
        template = group["template"]
        limits = container(template)["resources"]
        assert limits["requests"] == limits["limits"]
        assert group["rayStartParams"]["num-gpus"] == str(gpus_of(template))
        assert group["rayStartParams"]["num-cpus"] == limits["limits"]["cpu"]
        assert group["replicas"] * gpus_of(template) == math.ceil(want[name]), name
    assert gpus_of(pod_templates(job)["head"]) == 0
    # Every policy worker gets its own CPUs, and each pod of every group advertises the custom
    # resources its actors request (<section>.resources per actor x actors per pod).
    policy = groups["policy"]
    per_pod = cfg.policy.num_workers // policy["replicas"]
    assert per_pod * policy["replicas"] == cfg.policy.num_workers
    assert int(policy["rayStartParams"]["num-cpus"]) >= per_pod * cfg.policy.num_cpus_per_worker
    for name, group in groups.items():
        per_pod = COUNTS[name](cfg) // group["replicas"]
        assert per_pod * group["replicas"] == COUNTS[name](cfg), name
        have, want = advertised(group), RESOURCES[name](cfg)
        assert set(have) == set(want), name
        assert all(have[k] >= per_pod * v for k, v in want.items()), name


def test_the_2x8_config_is_two_full_nodes():
    job = ray_object(render_config(str(ROOT / "configs" / "llama3-8b-offline-2x8.yaml")))
    (policy,) = worker_groups(job).values()
    assert (policy["replicas"], gpus_of(policy["template"])) == (2, 8)
    assert policy["rayStartParams"]["resources"] == '"{\\"policy_node\\": 1}"'  # KubeRay's quoting


def test_the_online_config_fills_a_second_node():
    job = ray_object(render_config(str(ROOT / "configs" / "llama3-8b-online.yaml")))
    sizes = {name: (g["replicas"], gpus_of(g["template"])) for name, g in worker_groups(job).items()}
    assert sizes == {"policy": (1, 8), "reference": (1, 2), "generation": (1, 4), "judge": (1, 2)}


ONLINE = str(ROOT / "configs" / "llama3-8b-online.yaml")
# object_store: the online config must render whatever its weight_sync (checked by config tests).
ONLINE_SETS = ["online.weight_sync=object_store"]
PINNED = ["online.resources={generation_node: 0.01}", "online.judge.resources={judge_node: 0.01}",
          "reference.resources={reference_node: 0.01}", "policy.resources={policy_node: 0.01}"]
UNPINNED = ["online.resources={}", "online.judge.resources={}"]


def render_online(sets: list[str]) -> k8s.Rendered:
    storage = k8s.Storage.parse(STORAGE)
    return k8s.render(k8s.load_for_cluster(ONLINE, [*ONLINE_SETS, *sets], storage), k8s.K8sOptions(storage=storage))


def test_online_groups_with_resources_advertise_them_and_are_not_warned_about():
    rendered = render_online([*PINNED, "online.num_cpus_per_engine=6", "online.judge.num_cpus_per_actor=5"])
    assert not [w for w in rendered.warnings if "pinned" in w]
    groups = worker_groups(ray_object(rendered.documents))
    cfg = rendered.config
    assert advertised(groups["generation"]) == {"generation_node": math.ceil(cfg.online.num_engines * 0.01)}
    assert advertised(groups["judge"]) == {"judge_node": 1}
    # every group advertises its own key only, so no actor can start on another group's pods
    assert [set(advertised(g)) for g in groups.values()] == [{"policy_node"}, {"reference_node"},
                                                              {"generation_node"}, {"judge_node"}]
    # CPUs per pod cover the configured CPUs of every actor on it
    plans = {g.name: g for g in rendered.groups}
    assert plans["generation"].cpus_per_pod >= plans["generation"].per_pod * 6
    assert plans["judge"].cpus_per_pod >= plans["judge"].per_pod * 5
    for doc in rendered.documents:
        validate_object(doc)


def test_unpinned_gpu_groups_are_warned_about_with_the_key_to_set(capsys):
    rendered = render_online(UNPINNED)
    (warning,) = [w for w in rendered.warnings if "pinned" in w]
    assert warning.startswith("GPU group(s) generation, judge are not pinned")
    assert "online.resources" in warning and "online.judge.resources" in warning
    assert "reference.resources" not in warning and "policy.resources" not in warning  # those are pinned
    (warning,) = [w for w in render_online([*UNPINNED, "online.resources={generation_node: 1}"]).warnings
                  if "pinned" in w]
    assert warning.startswith("GPU group(s) judge are not pinned") and "online.judge.resources" in warning
    # the CLI prints it on stderr and as a comment in the manifest
    code, out, err = render_cli([ONLINE, "--storage", STORAGE, *[a for s in [*ONLINE_SETS, *UNPINNED]
                                                                 for a in ("--set", s)]], capsys)
    assert code == 0 and "not pinned" in err and "# warning: GPU group(s) generation, judge" in out


def test_engine_and_judge_actors_request_what_their_pods_advertise():
    """The options GenerationGroup / RewardModelJudge give ray's .options() fit the rendered pods."""
    import ray

    from ray_dpo.engines.generation import engine_actor_options
    from ray_dpo.engines.spec import engine_spec
    from ray_dpo.engines.judges import reward_model_actor_options

    rendered = render_online([*PINNED, "online.num_cpus_per_engine=3", "online.judge.num_cpus_per_actor=2"])
    cfg = rendered.config
    plans = {g.name: g for g in rendered.groups}
    for name, opts in [("generation", engine_actor_options(engine_spec(cfg), use_gpu=True)),
                       ("judge", reward_model_actor_options(cfg.online.judge, use_gpu=True))]:
        ray.remote(type(name, (), {})).options(**opts)  # ray accepts them (validated without a cluster)
        plan = plans[name]
        assert opts["resources"] == RESOURCES[name](cfg) and opts["resources"]
        assert all(plan.ray_resources[k] >= plan.per_pod * v for k, v in opts["resources"].items()), name
        assert plan.gpus_per_pod >= plan.per_pod * opts["num_gpus"] > 0, name
        assert plan.cpus_per_pod >= plan.per_pod * opts["num_cpus"], name
    assert engine_actor_options(engine_spec(cfg), use_gpu=True)["num_cpus"] == 3
    assert engine_actor_options(engine_spec(cfg), use_gpu=False)["num_gpus"] == 0


def test_held_out_sampling_gets_engine_judge_and_reference_groups():
    """An offline run with eval.prompts_file starts engines, a judge and (precompute or not)
    reference actors that live through training: each gets pods of its own."""
    path = str(ROOT / "configs" / "llama3-8b-offline-2x8.yaml")
    storage = k8s.Storage.parse(STORAGE)
    cfg = k8s.load_for_cluster(path, ["eval.prompts_file=s3://b/heldout.jsonl", "online.judge.reward_model=org/rm",
                                      "online.resources={generation_node: 0.01}"], storage)
    assert not cfg.online.enabled and cfg.reference.precompute
    rendered = k8s.render(cfg, k8s.K8sOptions(storage=storage))
    sizes = {g.name: g.total_gpus for g in rendered.groups}
    assert sizes == {k: math.ceil(v) for k, v in expected_gpus_of(cfg).items()}
    assert sizes == {"policy": 16, "reference": cfg.reference.num_actors * (cfg.reference.num_gpus_per_actor or 1),
                     "generation": cfg.online.num_engines, "judge": cfg.online.judge.num_actors}
    (warning,) = [w for w in rendered.warnings if "pinned" in w]
    assert "GPU group(s) reference, judge" in warning  # generation and policy are pinned


@pytest.mark.parametrize("count, per_node, pods, gpus", [(16, 8, 2, 8), (12, 8, 2, 6), (4, 8, 1, 4), (7, 8, 1, 7),
                                                          (11, 8, 11, 1), (16, 4, 4, 4)])
def test_pods_split_evenly_and_never_hold_an_idle_gpu(count, per_node, pods, gpus):
    shape = k8s.ClusterShape(gpus_per_node=per_node)
    plan, warnings = k8s.pack_group("policy", "x", count=count, gpus_each=1.0, cpus_each=4.0,
                                    resources_each={"policy_node": 0.01}, shape=shape)
    assert (plan.replicas, plan.gpus_per_pod) == (pods, gpus)
    assert plan.total_gpus == count
    assert plan.cpus_per_pod >= plan.per_pod * 4 and plan.ray_resources == {"policy_node": 1}
    assert bool(warnings) == (pods > math.ceil(count / per_node))


def test_an_actor_larger_than_a_node_is_an_error():
    with pytest.raises(k8s.K8sError, match="--gpus-per-node 8"):
        k8s.pack_group("generation", "online.num_gpus_per_engine=16", count=1, gpus_each=16, cpus_each=1,
                       resources_each={}, shape=k8s.ClusterShape())


def test_precompute_reference_must_fit_on_the_policy_gpus(tmp_path):
    path = str(ROOT / "configs" / "llama3-8b-offline-2x8.yaml")
    cfg = k8s.load_for_cluster(path, ["reference.num_actors=17"], k8s.Storage.parse(STORAGE))
    with pytest.raises(k8s.K8sError, match="reference.resources"):
        k8s.render(cfg, k8s.K8sOptions(storage=k8s.Storage.parse(STORAGE)))
    # With its own resources the reference gets its own group instead.
    cfg = k8s.load_for_cluster(path, ["reference.resources={reference_node: 0.01}"], k8s.Storage.parse(STORAGE))
    rendered = k8s.render(cfg, k8s.K8sOptions(storage=k8s.Storage.parse(STORAGE)))
    assert [g.name for g in rendered.groups] == ["policy", "reference"]
    assert rendered.groups[1].total_gpus == 16


# --------------------------------------------------------------------------- the command


def test_entrypoint_is_the_shared_train_command():
    for path in REAL_CONFIGS:
        job = ray_object(render_config(path))
        assert job["spec"]["entrypoint"] == shlex.join(k8s.train_command(k8s.CONFIG_PATH))
        assert shlex.split(job["spec"]["entrypoint"]) == k8s.train_command(k8s.CONFIG_PATH)
    # It is a valid `ray-dpo train` invocation, the one `ray job submit` runs too.
    args = cli.build_parser().parse_args(k8s.train_command(k8s.CONFIG_PATH)[1:])
    assert (args.func, args.config, args.overrides) == (cli.cmd_train, k8s.CONFIG_PATH, [])
    submit = k8s.submit_command("http://127.0.0.1:8265")
    assert submit[submit.index("--") + 1:] == k8s.train_command(k8s.CONFIG_PATH)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_configmap_holds_the_resolved_config_mounted_in_every_pod(path):
    docs = render_config(path, "--set", "loss.beta=0.2")
    config_map, job = docs
    cfg = k8s.load_for_cluster(path, ["loss.beta=0.2"], k8s.Storage.parse(STORAGE))
    held = from_dict(yaml.safe_load(config_map["data"][k8s.CONFIG_KEY]), check_files=False)
    assert held == cfg and held.loss.beta == 0.2
    assert held.run.storage_path.startswith(k8s.DEFAULT_STORAGE_MOUNT + "/")
    for name, template in pod_templates(job).items():
        mounts = {m["mountPath"]: m["name"] for m in container(template)["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes[mounts[k8s.CONFIG_DIR]]["configMap"]["name"] == config_map["metadata"]["name"], name
        assert volumes[mounts[k8s.DEFAULT_STORAGE_MOUNT]]["persistentVolumeClaim"]["claimName"] == "ray-dpo-runs"


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=os.path.basename)
def test_a_job_retry_resumes_the_same_run_from_the_shared_volume(path):
    """What a RayJob retry (backoffLimit) needs to resume rather than start over: the same
    command, the same run.name, checkpoints and the MLflow run id on the shared volume."""
    config_map, job = render_config(path, "--retries", "3", "--set", "policy.max_failures=5")
    assert job["spec"]["backoffLimit"] == 3
    assert shlex.split(job["spec"]["entrypoint"]) == k8s.train_command(k8s.CONFIG_PATH)  # no per-attempt args
    held = from_dict(yaml.safe_load(config_map["data"][k8s.CONFIG_KEY]), check_files=False)
    assert held.run_dir.startswith(k8s.DEFAULT_STORAGE_MOUNT + "/")  # checkpoints + mlflow_run_id
    assert held.policy.max_failures == 5  # restarts inside the job come before a job retry
    for template in pod_templates(job).values():
        assert k8s.DEFAULT_STORAGE_MOUNT in {m["mountPath"] for m in container(template)["volumeMounts"]}


def test_storage_options(capsys):
    path = REAL_CONFIGS[0]
    cfg = k8s.load_for_cluster(path, ["tracking.mlflow.tracking_uri=http://mlflow:5000"],
                               k8s.Storage.parse("s3://bucket/runs"))
    rendered = k8s.render(cfg, k8s.K8sOptions(storage=k8s.Storage.parse("s3://bucket/runs")))
    assert rendered.config.run.storage_path == "s3://bucket/runs"
    assert all("persistentVolumeClaim" not in v for t in pod_templates(rendered.documents[1]).values()
               for v in t["spec"]["volumes"])
    # A local storage_path would be one pod's disk: refused, with the fix in the message.
    code, _, err = render_cli([str(ROOT / "configs" / "tiny-cpu.yaml")], capsys)
    assert code == 2 and "--storage pvc:CLAIM" in err
    code, _, err = render_cli([path, "--storage", "nfs:/x"], capsys)
    assert code == 2 and "pvc:CLAIM" in err


def test_bad_config_exits_2(capsys):
    code, out, err = render_cli([REAL_CONFIGS[0], "--storage", STORAGE, "--set", "loss.beta=-1"], capsys)
    assert code == 2 and out == "" and "loss.beta" in err


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=os.path.basename)
def test_real_configs_pass_validate(path, capsys):
    assert cli.main(["validate", path]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- secrets and exposure


PLANTED = {
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-9f3c1e",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-77ab",
    "MLFLOW_TRACKING_URI": "http://planted-user:planted-uri-pw-51d2@mlflow.example:5000",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-0c8e4b",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0000000",
    "HF_TOKEN": "hf_plantedtoken123456",
    "RAY_AUTH_TOKEN": "planted-ray-token-5e6f",
}


@pytest.mark.parametrize("kind", ["rayjob", "raycluster"])
def test_no_secret_value_from_the_environment_is_rendered(kind, monkeypatch, capsys):
    for key, value in PLANTED.items():
        monkeypatch.setenv(key, value)
    for path in CONFIGS:
        code, out, err = render_cli([path, "--kind", kind, "--storage", STORAGE, *SECRET_OPTS,
                                     "--auth-secret", "ray-token"], capsys)
        assert code == 0, err
        for value in [*PLANTED.values(), "planted"]:
            assert value not in out and value not in err, (path, value)
        # Every credential reaches the pods as a secretKeyRef, never as a literal value.
        for name, template in pod_templates(ray_object(docs_of(out))).items():
            for env in container(template)["env"]:
                if env["name"] in (*k8s.MLFLOW_KEYS, *k8s.OBJECT_STORE_KEYS, *k8s.HF_KEYS, "RAY_AUTH_TOKEN"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, env)


def test_secret_refs_name_the_secrets_given():
    job = ray_object(render_config(REAL_CONFIGS[0]))
    for name, template in pod_templates(job).items():
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(template)["env"] if "valueFrom" in e}
        assert {k: r["name"] for k, r in refs.items() if k.startswith("AWS_")} == dict.fromkeys(k8s.OBJECT_STORE_KEYS,
                                                                                                "s3-credentials")
        assert refs["AWS_SECRET_ACCESS_KEY"]["optional"] is False and refs["AWS_SESSION_TOKEN"]["optional"] is True
        assert refs["HF_TOKEN"] == {"name": "hf-token", "key": "HF_TOKEN", "optional": False}
        mlflow = {k: r for k, r in refs.items() if k.startswith("MLFLOW_")}
        if name == "head":  # the driver writes MLflow; workers report through Ray Train
            assert {r["name"] for r in mlflow.values()} == {"mlflow-credentials"} and len(mlflow) == 4
            assert mlflow["MLFLOW_TRACKING_URI"]["optional"] is False  # the config names no tracking_uri
        else:
            assert mlflow == {}


def test_a_password_in_the_tracking_uri_is_refused():
    cfg = k8s.load_for_cluster(REAL_CONFIGS[0], ["tracking.mlflow.tracking_uri=http://u:pw@mlflow:5000"],
                               k8s.Storage.parse(STORAGE))
    with pytest.raises(k8s.K8sError, match="--mlflow-secret"):
        k8s.render(cfg, k8s.K8sOptions(storage=k8s.Storage.parse(STORAGE)))


@pytest.mark.parametrize("kind", ["rayjob", "raycluster"])
def test_dashboard_stays_inside_and_token_auth_stays_on(kind):
    docs = render_config(REAL_CONFIGS[0], "--kind", kind, "--auth-secret", "ray-token")
    spec = cluster_of(ray_object(docs))
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["enableIngress"] is False
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52)  # token auth needs Ray >= 2.52
    text = yaml.safe_dump_all(docs)
    for exposed in ("LoadBalancer", "NodePort", "kind: Ingress", "enableIngress: true", "hostNetwork",
                    "hostPort", "RAY_AUTH_MODE"):
        assert exposed not in text  # auth mode comes only from authOptions, never overridden
    default = cluster_of(ray_object(render_config(REAL_CONFIGS[0], "--kind", kind)))
    assert default["authOptions"] == {"mode": "token"}


def test_ray_version_matches_the_installed_ray():
    assert k8s.RAY_VERSION == importlib.metadata.version("ray")
    assert f"RAY_VERSION={k8s.RAY_VERSION}" in (ROOT / "deploy" / "Dockerfile").read_text()


# --------------------------------------------------------------------------- static manifests


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_manifests_are_what_the_renderer_prints(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = render_cli(STATIC[name], capsys)
    assert code == 0, err
    have = (ROOT / "deploy" / name).read_text()
    assert have == out, (f"deploy/{name} is stale; regenerate it with:\n  ray-dpo k8s "
                         f"{shlex.join(STATIC[name])} > deploy/{name}")


@pytest.mark.parametrize("name", ["mlflow-server.yaml", "storage.yaml", "rayjob.yaml", "raycluster.yaml"])
def test_static_manifests_are_schema_valid(name):
    docs = docs_of((ROOT / "deploy" / name).read_text())
    assert docs
    for doc in docs:
        validate_object(doc)


def test_mlflow_server_takes_its_database_uri_from_a_secret():
    docs = {d["kind"]: d for d in docs_of((ROOT / "deploy" / "mlflow-server.yaml").read_text())}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    (server,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in server["args"]
    assert "://" not in json.dumps(server["args"])


def test_k8s_module_is_pure():
    import subprocess
    import sys

    code = ("import sys, ray_dpo.k8s; bad = {'ray', 'deepspeed', 'vllm', 'mlflow'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_reference_free_loss_gets_no_reference_worker_group(loss):
    """SimPO / ORPO start no reference actor, so the cluster has no pods for one; the same
    config with the sigmoid loss does get a reference group."""
    path = str(ROOT / "configs" / "llama3-8b-offline-2x8.yaml")
    storage = k8s.Storage.parse(STORAGE)
    sets = ["reference.precompute=false", "reference.resources={}"]
    sigmoid = k8s.render(k8s.load_for_cluster(path, sets, storage), k8s.K8sOptions(storage=storage))
    assert "reference" in {g.name for g in sigmoid.groups}
    rendered = k8s.render(k8s.load_for_cluster(path, [*sets, f"loss.type={loss}"], storage),
                          k8s.K8sOptions(storage=storage))
    assert [g.name for g in rendered.groups] == ["policy"]
    assert set(worker_groups(rendered.documents[1])) == {"policy"}
    text = rendered.text(source=path)
    assert f"# reference: none, loss.type={loss} is reference-free" in text


@pytest.mark.parametrize("reference, groups", [("adapters_off", ["policy"]), ("group", ["policy", "reference"])])
def test_a_lora_config_renders_a_reference_group_only_when_the_group_serves_the_base(reference, groups):
    """policy.lora.reference=adapters_off: the policy workers score the base model themselves,
    so no reference worker group is rendered; =group keeps it."""
    path = str(ROOT / "configs" / "llama3-8b-offline-2x8.yaml")
    storage = k8s.Storage.parse(STORAGE)
    sets = ["reference.precompute=false", "reference.resources={}", "policy.lora.rank=16",
            "policy.lora.target_modules=all-linear", f"policy.lora.reference={reference}"]
    rendered = k8s.render(k8s.load_for_cluster(path, sets, storage), k8s.K8sOptions(storage=storage))
    assert [g.name for g in rendered.groups] == groups
    assert sorted(worker_groups(rendered.documents[1])) == sorted(groups)
    text = rendered.text(source=path)
    assert ("policy.lora.reference=adapters_off; no reference actors" in text) == (reference == "adapters_off")
    assert "rank: 16" in text  # the ConfigMap carries the LoRA section to the job
