"""The generic registry every family of names (losses, layouts, strategies, ...) uses."""

import pytest

from ray_dpo.registry import Registry, UnknownName


def test_names_lookup_and_facts():
    reg = Registry("colour", {"red": "warm", "blue": "cold"}, plural="colours")
    assert list(reg) == ["red", "blue"] and reg.names() == ["blue", "red"] and len(reg) == 2
    assert "red" in reg and "green" not in reg and [1] not in reg
    assert reg.get("red") == "warm" and reg["blue"] == "cold"
    with pytest.raises(UnknownName, match=r"unknown colour 'rde' \(did you mean 'red'\?\); valid colours: blue, red"):
        reg.get("rde")
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        reg.add("red", "hot")
    assert reg.remove("red") == "warm" and reg.names() == ["blue"]


def test_key_prefix_and_facts_filter():
    class Entry:
        def __init__(self, fast):
            self.fast = fast

    reg = Registry("method", {"a": Entry(True), "b": Entry(False)}, key="section.method")
    assert reg.names(fast=True) == ["a"]
    with pytest.raises(ValueError, match=r"^section.method: unknown method 'z'; valid: a, b$"):
        reg["z"]


def test_every_registry_lists_its_entries():
    from ray_dpo.losses import LOSSES
    from ray_dpo.engines.facts import ENGINES
    from ray_dpo.engines.judges import JUDGES
    from ray_dpo.online.pairs import PAIR_STRATEGIES
    from ray_dpo.engines.facts import SYNC_METHODS
    from ray_dpo.batching.layouts import LAYOUTS

    assert LOSSES.names(needs_reference=False) == ["orpo", "simpo"]
    assert list(LAYOUTS) == ["padded", "packed", "prefix_shared"] and LAYOUTS.names(needs_4d_mask=True) == [
        "prefix_shared"]
    assert PAIR_STRATEGIES.names(needs_chosen=True) == ["regenerate_rejected"]
    assert PAIR_STRATEGIES["best_vs_worst"].min_samples == 2
    assert SYNC_METHODS.names(needs_checkpoint_dir=True) == ["checkpoint"]
    assert SYNC_METHODS.names(sent_by_policy=True) == ["collective"]
    assert JUDGES.names() == ["function", "reward_model"]
    assert ENGINES.names(takes_max_model_len=True) == ["vllm"]
    assert ENGINES["transformers"].actor_env(use_gpu=False) == {}
