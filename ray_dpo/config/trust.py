"""What code a config makes ray_dpo run: a config is trusted like a script. Pure.

    executes(cfg) -> [(dotted key, what runs)]

A judge given as ``module:function`` (online.judge.function, eval.judge.function) is
imported and called in the judging actors: a module in the driver's working directory (Ray
ships it to every worker) or any installed one. ``model.trust_remote_code: true`` runs the
Python files of the model's directory or hub repo in every process that loads the model.
``ray-dpo validate`` lists these before anything runs (README, "Security").
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def _module_origin(module: str) -> str:
    """Where ``module`` would be imported from here, without importing it (its parent
    packages are imported to find it, as Python does)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "not importable on this machine: the workers must have it"
    origin = spec.origin or "a namespace package"
    if origin.startswith(os.getcwd() + os.sep):
        return f"{os.path.relpath(origin)}, from the working directory (Ray ships it to every worker)"
    return origin


def executes(cfg: Any) -> list[tuple[str, str]]:
    """[(key, what runs)] for every place the config names code to run."""
    out = []
    for key, judge in (("online.judge.function", cfg.online.judge), ("eval.judge.function", cfg.eval.judge)):
        if judge.function:
            module, _, function = judge.function.partition(":")
            out.append((key, f"{function}() of module {module} ({_module_origin(module)})"))
    if cfg.model.trust_remote_code:
        out.append(("model.trust_remote_code",
                    f"the Python files that come with {cfg.model.name_or_path}, in every process that loads it"))
    return out
