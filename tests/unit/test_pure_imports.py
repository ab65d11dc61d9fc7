"""The pure modules must stay importable without the heavy orchestration stack."""

import subprocess
import sys

PURE = [
    "ray_dpo.config",
    "ray_dpo.registry",
    "ray_dpo.losses",
    "ray_dpo.loss_rules",
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
    "ray_dpo.online.evaluation",
    "ray_dpo.online.judges",
    "ray_dpo.tracking.metrics",
    "ray_dpo.testing.assets",
    "ray_dpo.testing.feeder_fakes",
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
