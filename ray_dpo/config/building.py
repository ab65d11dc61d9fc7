"""YAML values -> section dataclasses, driven by the fields' type hints.

    build(cls, data, prefix, problems) -> cls     every wrong key or value becomes a Problem
                                                 (the field keeps its default), never an
                                                 exception, so one round lists them all

A choice field (``Literal[...]`` or ``Annotated[str, OneOf(registry)]``) accepts exactly its
names; ``OneOf`` asks its registry here, so what is registered is what is accepted.

Pure: imports neither torch, ray, deepspeed nor vllm at import time.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Literal, Optional, Union

from ray_dpo.config.errors import Problem
from ray_dpo.config.names import OneOf

_SCALAR_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def choices(tp: Any) -> Optional[list]:
    """The values a choice type accepts (Literal, or Annotated with OneOf), else None."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if origin is Annotated:
        marker = next((m for m in tp.__metadata__ if isinstance(m, OneOf)), None)
        return marker.names() if marker is not None else None
    return None


def type_name(tp: Any) -> str:
    """How a message names a type: "an integer", "one of 'a', 'b'", "a list of a string"."""
    origin = typing.get_origin(tp)
    names = choices(tp)
    if names is not None:
        return "one of " + ", ".join(repr(a) for a in names)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {type_name(k)} to {type_name(v)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return _SCALAR_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp: Any, key: str, problems: list[Problem]) -> Any:
    """Convert a YAML value to ``tp``; on failure record a Problem and return None."""
    origin = typing.get_origin(tp)
    if tp is Any:  # a value checked where it is used (e.g. sweep.grid's, as a config value)
        return value
    if dataclasses.is_dataclass(tp):
        return tp() if value is None else build(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else convert(value, args[0], key, problems)
    names = choices(tp)
    if names is not None:
        return _convert_choice(value, tp, names, key, problems)
    if origin is list:
        return _convert_list(value, tp, key, problems)
    if origin is dict:
        return _convert_dict(value, tp, key, problems)
    ok, converted = _convert_scalar(value, tp)
    if ok:
        return converted
    problems.append(Problem(key, f"got {value!r} ({type(value).__name__}), expected {type_name(tp)}"))
    return None


def _convert_choice(value: Any, tp: Any, names: list, key: str, problems: list[Problem]) -> Any:
    if value in names:
        return value
    hint = difflib.get_close_matches(str(value), [str(c) for c in names], n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    problems.append(Problem(key, f"got {value!r}, expected {type_name(tp)}{extra}"))
    return None


def _convert_list(value: Any, tp: Any, key: str, problems: list[Problem]) -> Optional[list]:
    (item_tp,) = typing.get_args(tp)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]  # a single file is a one-element list
    if not isinstance(value, list):
        problems.append(Problem(key, f"got {value!r}, expected {type_name(tp)}"))
        return None
    return [convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]


def _convert_dict(value: Any, tp: Any, key: str, problems: list[Problem]) -> Optional[dict]:
    k_tp, v_tp = typing.get_args(tp)
    if not isinstance(value, dict):
        problems.append(Problem(key, f"got {value!r}, expected {type_name(tp)}"))
        return None
    return {convert(k, k_tp, f"{key}.{k}", problems): convert(v, v_tp, f"{key}.{k}", problems)
            for k, v in value.items()}


def _convert_scalar(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, value as ``tp``) when YAML's value fits the scalar type, else (False, None)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return True, value
    if tp is int and number and (isinstance(value, int) or value.is_integer()):
        return True, int(value)
    if tp is float and number:
        return True, float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
        try:
            return True, float(value)
        except ValueError:
            return False, None
    if tp is str and (isinstance(value, str) or number):
        return True, value if isinstance(value, str) else str(value)
    return False, None


def build(cls: type, data: Any, prefix: str, problems: list[Problem]) -> Any:
    """A ``cls`` section from YAML ``data`` (a mapping); unknown keys and bad values become Problems."""
    if not isinstance(data, dict):
        problems.append(Problem(prefix or "<top>", f"expected a mapping, got {type(data).__name__}"))
        return cls()
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(names)
            problems.append(Problem(path, f"unknown key ({hint})"))
            continue
        converted = convert(value, hints[key], path, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _is_optional(hints[k])})


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)
