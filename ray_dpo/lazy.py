"""Package attributes that load their module on first use (PEP 562), so that importing a
package costs nothing (no torch, ray or vllm) until one of its names is used.

    __getattr__, __all__ = lazy_names(__name__, {"Name": "package.module", ...})

A value equal to the key's full module path (``{"cache": "ray_dpo.reference.cache"}``) is
the submodule itself rather than an attribute of it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(the package's module-level __getattr__, its __all__) for the names in ``table``."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(table[name])
        return module if table[name] == f"{package}.{name}" else getattr(module, name)

    return __getattr__, sorted(table)
