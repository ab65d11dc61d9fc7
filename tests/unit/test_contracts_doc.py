"""CONTRACTS.md names real things: every ray_dpo path it lists exists, and every dotted name
that starts at one of ray_dpo's modules (``online.pairs.PAIR_STRATEGIES``,
``ray_dpo.batching.layouts``, ``policy.weights.sync_policy``) imports and resolves."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re

import ray_dpo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = open(os.path.join(ROOT, "CONTRACTS.md"), encoding="utf-8").read()


THIRD_PARTY = {"ray", "torch", "vllm", "deepspeed", "transformers", "mlflow", "peft", "np", "numpy", "os", "sys",
               "safetensors", "yaml", "tune", "dist", "json", "math", "self", "cfg"}


def _top_level() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(ray_dpo.__path__)}


def _resolves(dotted: str) -> bool:
    """True if some prefix of ``dotted`` imports as a module and the rest are attributes of it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_path_it_lists_exists():
    paths = set(re.findall(r"\bray_dpo/[\w/]+(?:\.py)?", TEXT))
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert paths and not missing, f"CONTRACTS.md lists paths that do not exist: {missing}"


def _config_key(dotted: str) -> bool:
    """A config key (policy.lora.rank): the config sections share names with modules."""
    import dataclasses

    from ray_dpo.config import RunConfig

    obj = RunConfig
    for name in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if name not in fields:
            return False
        obj = fields[name].default_factory if callable(fields[name].default_factory) else None
        obj = obj() if obj is not None else None
    return True


def test_every_dotted_name_it_lists_resolves():
    tops = _top_level()
    names = set()
    for match in re.findall(r"\b(?:ray_dpo\.)?((?:[a-z_][a-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", TEXT):
        first, last = match.split(".")[0], match.split(".")[-1]
        ours = first in tops or (first not in THIRD_PARTY and last[:1].isupper())  # packing.LAYOUTS
        if ours and not match.endswith(".py") and not _config_key(match):
            names.add(match)
    # Written relative to its section too (engine_group.GenerationGroup under online/).
    packages = [""] + [m.name + "." for m in pkgutil.iter_modules(ray_dpo.__path__) if m.ispkg]
    stale = sorted(n for n in names if not any(_resolves(f"ray_dpo.{pkg}{n}") for pkg in packages))
    assert len(names) > 10 and not stale, f"CONTRACTS.md names what does not exist: {stale}"
