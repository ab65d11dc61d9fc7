"""The engine and online packages keep their classes small to construct: a class whose
constructor takes more than 8 parameters takes a spec instead (EngineSpec, FollowerSpec).
Dataclasses are the specs and records themselves, so they are not counted."""

import dataclasses
import importlib
import inspect
import pkgutil

import ray_dpo.engines
import ray_dpo.online

MAX_PARAMETERS = 8


def test_no_engine_or_online_class_takes_more_than_eight_constructor_parameters():
    sizes = {}
    for package in (ray_dpo.engines, ray_dpo.online):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__ or dataclasses.is_dataclass(cls) or "__init__" not in vars(cls):
                    continue
                params = [p for p in inspect.signature(cls.__init__).parameters
                          if p != "self" and not p.startswith("_ray")]
                sizes[f"{module.__name__}.{name}"] = len(params)
    assert len(sizes) > 8, sizes  # the packages were found and read
    assert "ray_dpo.engines.engine_group.GenerationGroup" in sizes
    too_big = {name: n for name, n in sizes.items() if n > MAX_PARAMETERS}
    assert not too_big, f"constructors over {MAX_PARAMETERS} parameters (take a spec): {too_big}"
