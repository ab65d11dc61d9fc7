"""Loading a run config: YAML text -> ``--set`` overrides -> renamed keys -> RunConfig.

    load_config(path, overrides)   read the file (a key twice in one mapping is an error,
                                   not YAML's silent last-one-wins), apply overrides, build,
                                   check; ConfigError listing every problem
    from_dict(data, source=)       build and check a dict (tests, the k8s renderer)
    apply_overrides(data, ["a.b=c", ...])   values parsed as YAML, else kept as text
    duplicate_keys(text)           a Problem per key repeated in one YAML mapping
    RENAMED_KEYS                   old dotted key -> new one; still accepted, with a
                                   DeprecatedKeyWarning naming both and the file

Pure: imports neither torch, ray, deepspeed nor vllm at import time.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import yaml

from ray_dpo.config.building import build
from ray_dpo.config.checks import check
from ray_dpo.config.errors import ConfigError, Problem
from ray_dpo.config.sections import RunConfig

RENAMED_KEYS = {
    "policy.cpus_per_worker": "policy.num_cpus_per_worker",
    "policy.gpus_per_worker": "policy.num_gpus_per_worker",
    "online.gpus_per_engine": "online.num_gpus_per_engine",
}
"""Resource keys read num_<resource>_per_<unit> in every section; the old spellings still load."""


class DeprecatedKeyWarning(FutureWarning):
    """A config used the old name of a renamed key (RENAMED_KEYS). A FutureWarning, so the
    user running the CLI sees it (DeprecationWarning is hidden outside __main__)."""


def rename_deprecated_keys(data: dict, source: str) -> list[Problem]:
    """Move every old key of ``data`` (RENAMED_KEYS) to its new name, warning once per key;
    a Problem when both the old and the new name are set."""
    problems = []
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.rsplit(".", 1)
        node = _section(data, section)
        if node is None or old_key not in node:
            continue
        new_key = new.rsplit(".", 1)[1]
        value = node.pop(old_key)
        if new_key in node:
            problems.append(Problem(old, f"is the old name of {new}, which is set too: remove {old}"))
            continue
        node[new_key] = value
        warnings.warn(f"{source}: {old} is deprecated, it is now {new}; rename it there (the old name "
                      "still loads for now)", DeprecatedKeyWarning, stacklevel=3)
    return problems


def _section(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def override_value(raw: str) -> Any:
    """A ``--set`` value: YAML (numbers, booleans, null, lists) when it parses as YAML,
    else the text itself, so inline Jinja ("{% if x %}...") or other text with YAML syntax
    characters arrives as a string instead of a parser traceback."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars/lists, and a
    value that is not valid YAML is taken as a plain string."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, "override must look like section.key=value"))
            continue
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                problems.append(Problem(dotted, f"{part!r} is not a section"))
                break
        else:
            node[parts[-1]] = override_value(raw)
    if problems:
        raise ConfigError(problems, source="--set")
    return data


def duplicate_keys(text: str) -> list[Problem]:
    """A Problem per key that appears twice in one YAML mapping (PyYAML keeps the last one
    silently), naming its dotted path and both lines."""
    problems: list[Problem] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                path = f"{prefix}.{key}" if prefix else key
                line = key_node.start_mark.line + 1
                if key in seen:
                    problems.append(Problem(path, f"appears twice (lines {seen[key]} and {line}); YAML "
                                                  "would keep only the last one: remove one"))
                seen.setdefault(key, line)
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}[{i}]")

    walk(yaml.compose(text), "")
    return problems


def load_config(path: str, overrides: list[str] = (), *, check_files: bool = True) -> RunConfig:
    """Load a YAML run config, apply ``section.key=value`` overrides, validate."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        duplicates = duplicate_keys(text)
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", f"config file not found: {path}")], source=path) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem("<yaml>", f"not valid YAML: {e}")], source=path) from None
    if duplicates:
        raise ConfigError(duplicates, source=path)
    if not isinstance(data, dict):
        raise ConfigError([Problem("<top>", "the config must be a mapping of sections")], source=path)
    data = apply_overrides(data, list(overrides))
    return from_dict(data, source=path, check_files=check_files)


def from_dict(data: dict, *, source: str = "config", check_files: bool = True) -> RunConfig:
    """Build and check a RunConfig; raise ConfigError listing every problem. ``data`` is not
    modified; ``source`` (the file) names where a problem or a deprecated key is."""
    data = copy.deepcopy(data) if data is not None else {}
    problems = rename_deprecated_keys(data, source) if isinstance(data, dict) else []
    cfg = build(RunConfig, data, "", problems)
    # A key whose type was wrong fell back to its default; do not also report its range.
    reported = {q.key for q in problems}
    problems += [q for q in check(cfg, check_files=check_files) if q.key not in reported]
    if problems:
        raise ConfigError(problems, source=source)
    return cfg
