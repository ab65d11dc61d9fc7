"""Ray resources of the actors a run starts: one rule for their GPUs and one shape of
their ``.options()``. Pure: imports no ray (callers pass the dict to ``.options()``)."""

from __future__ import annotations

from typing import Any, Mapping, Optional


def gpus_per_actor(gpus: float, *, use_gpu: bool) -> float:
    """GPUs each actor of a section asks for: the section's setting, or 1 when that is 0,
    on a GPU run; none on a CPU run. k8s sizes the pods by the same rule."""
    return (gpus or 1.0) if use_gpu else 0.0


def actor_options(
    *, num_cpus: float, num_gpus: float, resources: Mapping[str, float], use_gpu: bool,
    env_vars: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """``.options()`` for one actor of a section: its CPUs, GPUs (`gpus_per_actor`), custom
    resources (e.g. {reference_node: 0.01} pins it to the nodes that advertise them) and,
    if given, environment variables."""
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": gpus_per_actor(num_gpus, use_gpu=use_gpu),
        "resources": dict(resources),
    }
    if env_vars is not None:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    return options
