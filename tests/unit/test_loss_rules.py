"""Config checks that come from the loss registry's facts (ray_dpo.loss_rules): each error
names the key to change."""

from __future__ import annotations

import pytest

from ray_dpo.config import ConfigError, from_dict, local_cpus_needed
from ray_dpo.loss_rules import needs_reference, trains_unpaired


def config(**sections):
    cfg = {"model": {"name_or_path": "some-org/some-model"}, "data": {"train_files": ["s3://bucket/x/"]}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def problems(**sections) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(config(**sections), check_files=False)
    return str(info.value)


@pytest.mark.parametrize("loss, key", [
    ({"type": "sigmoid", "gamma": 0.5}, "loss.gamma"),
    ({"type": "ipo", "label_smoothing": 0.1}, "loss.label_smoothing"),
    ({"type": "hinge", "desirable_weight": 1.0}, "loss.desirable_weight"),
    ({"type": "orpo", "sft_weight": 0.5}, "loss.sft_weight"),
    ({"type": "orpo", "length_normalize": True}, "loss.length_normalize"),
    ({"type": "kto", "gamma": 1.0, "label_smoothing": 0.1}, "loss.gamma"),
])
def test_keys_the_loss_does_not_read_are_errors_naming_the_key(loss, key):
    text = problems(loss=loss, data={"unpair": loss["type"] == "kto"})
    assert f"{key}: is not used by loss.type={loss['type']!r}" in text


def test_the_error_says_which_losses_read_the_key():
    assert "(used by: simpo)" in problems(loss={"type": "sigmoid", "gamma": 0.5})


def test_loss_specific_keys_are_accepted_where_they_belong():
    cfg = from_dict(config(loss={"type": "simpo", "beta": 2.0, "gamma": 1.0, "label_smoothing": 0.1}),
                    check_files=False)
    assert cfg.loss.gamma == 1.0 and not needs_reference(cfg)
    kto = from_dict(config(loss={"type": "kto", "desirable_weight": 1.33, "undesirable_weight": 1.0},
                           data={"unpair": True}), check_files=False)
    assert trains_unpaired(kto) and needs_reference(kto)


@pytest.mark.parametrize("loss, message", [
    ({"type": "simpo", "gamma": -1.0}, "loss.gamma: SimPO's target margin must be >= 0"),
    ({"type": "kto", "undesirable_weight": 0.0}, "loss.undesirable_weight: must be > 0"),
])
def test_loss_value_ranges(loss, message):
    assert message in problems(loss=loss, data={"unpair": True} if loss["type"] == "kto" else {})


def test_kto_on_paired_data_needs_unpair():
    text = problems(loss={"type": "kto"}, data={"format": "standard"})
    assert "data.unpair: loss.type='kto' trains on unpaired examples but data.format='standard' holds pairs" in text
    # auto: decided per row when the data is read
    assert from_dict(config(loss={"type": "kto"}), check_files=False).data.format == "auto"


def test_pair_losses_refuse_unpaired_formats_and_unpairing():
    text = problems(loss={"type": "sigmoid"}, data={"format": "unpaired", "unpair": True})
    assert "data.format: 'unpaired' rows are unpaired examples" in text
    assert "data.unpair: splits pairs into unpaired examples" in text


@pytest.mark.parametrize("section, key", [
    ({"reference": {"precompute": True}}, "reference.precompute"),
    ({"reference": {"model": "some-org/ref"}}, "reference.model"),
    ({"online": {"enabled": True, "judge": {"function": "m:f"}}}, "online.enabled"),
    ({"eval": {"prompts_file": "s3://b/p.jsonl"}, "online": {"judge": {"function": "m:f"}}}, "eval.prompts_file"),
])
@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_refuse_reference_settings(loss, section, key):
    text = problems(loss={"type": loss}, **section)
    assert f"{key}: loss.type={loss!r} is reference-free" in text


def test_reference_free_runs_need_no_cpus_for_reference_actors():
    sigmoid = from_dict(config(reference={"num_actors": 3}), check_files=False)
    simpo = from_dict(config(loss={"type": "simpo"}, reference={"num_actors": 3}), check_files=False)
    assert local_cpus_needed(sigmoid) - local_cpus_needed(simpo) == 3
