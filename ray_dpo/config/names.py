"""Where the config finds the names a field may take: the registries, asked lazily.

``OneOf("module:attribute")`` marks a string field (``Annotated[str, OneOf(...)]``) whose
value must be a name in that registry (a ray_dpo.registry.Registry, or a tuple of names).
The module is imported only when a config is built, so importing ray_dpo.config costs no
torch; a name registered at run time (a new layout, strategy, ...) is accepted at once.

    loss_registry()       ray_dpo.losses.LOSSES (imports torch: call it only while checking)

Pure: imports neither torch, ray, deepspeed nor vllm at import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OneOf:
    """Field marker: the value is one of the names in ``registry`` ("module:attribute")."""

    registry: str

    def source(self) -> Any:
        """The registry itself (its module imported on first use)."""
        module, attribute = self.registry.split(":")
        return getattr(importlib.import_module(module), attribute)

    def names(self) -> list[str]:
        """The valid names, in registration order."""
        return list(self.source())


def loss_registry() -> Any:
    """The loss registry (ray_dpo.losses.LOSSES); imported here so config validation asks it
    without ray_dpo.config importing torch at import time."""
    from ray_dpo.losses import LOSSES

    return LOSSES
