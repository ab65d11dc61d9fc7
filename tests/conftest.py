"""Shared pytest fixtures. Keep each fixture small; put tier-specific ones in the tier's conftest."""

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true",
                     help="also run the tests marked extended (the long end-to-end matrix, ~35 min more)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``extended`` run with --extended (or RAY_DPO_EXTENDED_TESTS=1) only: CI's
    time budget holds one end-to-end run per capability, the extended tier the rest of the
    matrix (every ZeRO stage's resume, every fault role, every KTO format, the real model)."""
    if config.getoption("--extended") or os.environ.get("RAY_DPO_EXTENDED_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="extended tier: run with scripts/test --extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny tokenizer, model and synthetic data (ray_dpo.testing.assets), built once.

    A dict of paths: root, tokenizer, model, data, train_files, train_glob, eval_file.
    """
    from ray_dpo.testing.assets import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray cluster for one test module (4 logical CPUs, no dashboard); yields ray.

    address="local" always starts a new cluster: a stale cluster file left in Ray's temp
    folder by a killed driver would otherwise break the start. 4 logical CPUs on 2 cores,
    so actors and Ray Data stages do not starve each other.
    """
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.shutdown()  # whatever an earlier module left running
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
