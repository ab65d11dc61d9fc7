"""The pure modules must stay importable without the heavy orchestration stack."""

import subprocess
import sys

PURE = [
    "ray_dpo.config",
    "ray_dpo.registry",
    "ray_dpo.lazy",
    "ray_dpo.losses",
    "ray_dpo.loss_rules",
    "ray_dpo.lora",
    "ray_dpo.batching.logps",
    "ray_dpo.batching.padded",
    "ray_dpo.data.formats",
    "ray_dpo.data.counters",
    "ray_dpo.data.fitting",
    "ray_dpo.data.tokenize",
    "ray_dpo.data.unpaired",
    "ray_dpo.data.chat_template",
    "ray_dpo.data.report",
    "ray_dpo.data.errors",
    "ray_dpo.data.files",
    "ray_dpo.data.schemas",
    "ray_dpo.data.readers",
    "ray_dpo.data.fingerprint",
    "ray_dpo.data.tokenizer_cache",
    "ray_dpo.data.tokenize_stage",
    "ray_dpo.cli",
    "ray_dpo.k8s",
    "ray_dpo.feeder",
    "ray_dpo.dtypes",
    "ray_dpo.resources",
    "ray_dpo.batching.layouts",
    "ray_dpo.batching.budget",
    "ray_dpo.batching.probe",
    "ray_dpo.policy.ds_config",
    "ray_dpo.policy.loop_spec",
    "ray_dpo.online.rounds",
    "ray_dpo.online.pairs",
    "ray_dpo.engines.evaluation",
    "ray_dpo.engines.judges",
    "ray_dpo.engines.spec",
    "ray_dpo.engines.facts",
    "ray_dpo.seams",
    "ray_dpo.compat",
    "ray_dpo.tracking.metrics",
    "ray_dpo.sweep.trials",
    "ray_dpo.tracking.stats",
    "ray_dpo.tracking.paired",
    "ray_dpo.testing.assets",
    "ray_dpo.testing.feeder_fakes",
    "ray_dpo.testing.schedule_trace",
]
HEAVY = ["ray", "deepspeed", "vllm"]


def test_pure_modules_import_neither_ray_deepspeed_nor_vllm():
    code = (
        "import importlib, sys\n"
        f"for m in {PURE!r}: importlib.import_module(m)\n"
        f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    # A fresh interpreter: pytest plugins or other tests may already have imported ray.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "", f"pure modules pulled in: {proc.stdout.strip()}"


def test_the_offline_driver_imports_nothing_from_online():
    """An offline run's code path (the driver, feeder, policy worker, reference, tracking)
    loads no online/ module; only an offline run with held-out prompts starts the
    evaluator (engines/follower.py), and the driver imports it when it does."""
    offline = ["ray_dpo.driver", "ray_dpo.feeder", "ray_dpo.policy.worker", "ray_dpo.reference.group",
               "ray_dpo.tracking.callback", "ray_dpo.loss_rules", "ray_dpo.data.pipeline"]
    code = (
        "import importlib, sys\n"
        f"for m in {offline!r}: importlib.import_module(m)\n"
        "print('online:' + ','.join(sorted(m for m in sys.modules if m.startswith('ray_dpo.online'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("online:")]  # DeepSpeed prints too
    assert line == "online:", f"the offline path imported: {line}"


def test_the_config_package_loads_no_engine_code_even_when_it_checks_an_online_config():
    """``import ray_dpo.config`` loads neither torch nor any engine module; validating an
    online config reads the engines' and sync methods' facts (engines/facts.py) without
    importing the engines, the sync methods or their stack."""
    import os
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    engine_code = ["ray_dpo.engines.generation", "ray_dpo.engines.engine_group", "ray_dpo.engines.weight_sync",
                   "ray_dpo.engines.collective", "ray_dpo.engines.follower", "vllm", "ray"]
    code = textwrap.dedent(f"""
        import sys
        import ray_dpo.config
        print("import:" + ",".join(m for m in ["torch", *{engine_code!r}] if m in sys.modules))
        from ray_dpo.config import load_config
        cfg = load_config("configs/tiny-cpu-online.yaml", ["online.weight_sync=collective"], check_files=False)
        assert cfg.online.enabled and cfg.online.backend == "vllm"
        print("check:" + ",".join(m for m in {engine_code!r} if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if line.split(":", 1)[0] in ("import", "check"))
    assert lines == {"import": "", "check": ""}, proc.stdout


def test_the_engines_package_never_imports_the_online_rounds():
    """ray_dpo.engines serves weights and samples to online rounds and to offline held-out
    evals alike; ray_dpo.online builds rounds on top of it, never the other way round."""
    import ast
    import pathlib

    import ray_dpo.engines

    found = []
    for path in sorted(pathlib.Path(ray_dpo.engines.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[:2] == ["ray_dpo", "online"]]
    assert len(list(pathlib.Path(ray_dpo.engines.__file__).parent.glob("*.py"))) > 10
    assert not found, f"engines/ imports online/: {found}"
