"""The config takes its names from the registries and still reads renamed keys."""

import subprocess
import sys
import warnings

import pytest
import yaml

from ray_dpo.config import RENAMED_KEYS, ConfigError, DeprecatedKeyWarning, from_dict, load_config


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return {"model": {"name_or_path": "some-org/some-model"}, "data": {"train_files": [str(path)]}}


def test_a_newly_registered_loss_is_accepted_without_touching_the_config(base):
    from ray_dpo.losses import LOSSES, register_loss

    base["loss"] = {"type": "zero_loss"}
    with pytest.raises(ConfigError, match="unknown loss 'zero_loss'"):
        from_dict(base)
    register_loss("zero_loss", needs_reference=False, reads=())(lambda h, *, beta, label_smoothing: h * 0)
    try:
        cfg = from_dict(base)
        assert cfg.loss.type == "zero_loss"
        base["loss"]["label_smoothing"] = 0.1  # its facts apply: it reads no optional key
        with pytest.raises(ConfigError, match=r"loss.label_smoothing: is not used by loss.type='zero_loss'"):
            from_dict(base)
    finally:
        LOSSES.remove("zero_loss")


def test_a_newly_registered_pair_strategy_is_accepted(base):
    from ray_dpo.online.pairs import PAIR_STRATEGIES, register_pair_strategy

    base["online"] = {"pair_strategy": "first_vs_last"}
    with pytest.raises(ConfigError, match=r"online.pair_strategy: got 'first_vs_last', expected one of "
                                          r"'regenerate_rejected', 'best_vs_worst'"):
        from_dict(base)
    register_pair_strategy("first_vs_last", min_samples=3)(lambda group: None)
    try:
        judge = {"function": "ray_dpo.testing.assets:judge_score"}
        base["online"].update(enabled=True, samples_per_prompt=2, judge=judge)
        with pytest.raises(ConfigError, match=r"online.samples_per_prompt: first_vs_last compares samples: needs >= 3"):
            from_dict(base)
    finally:
        PAIR_STRATEGIES.remove("first_vs_last")


@pytest.mark.parametrize("old,new", sorted(RENAMED_KEYS.items()))
def test_old_resource_keys_still_load_with_a_warning(tmp_path, base, old, new):
    (section, old_key), new_key = old.split("."), new.split(".")[1]
    path = tmp_path / "old.yaml"
    base[section] = {old_key: 2}
    path.write_text(yaml.safe_dump(base))
    with pytest.warns(DeprecatedKeyWarning) as caught:
        cfg = load_config(str(path))
    assert getattr(getattr(cfg, section), new_key) == 2.0
    text = str(caught[0].message)
    assert old in text and new in text and str(path) in text


def test_old_and_new_key_together_is_a_problem(base):
    base["policy"] = {"cpus_per_worker": 2, "num_cpus_per_worker": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing renamed, so no warning either
        with pytest.raises(ConfigError, match=r"policy.cpus_per_worker: is the old name of "
                                              r"policy.num_cpus_per_worker, which is set too"):
            from_dict(base)
    assert base["policy"] == {"cpus_per_worker": 2, "num_cpus_per_worker": 3}  # input left as it was


def test_importing_the_config_imports_no_torch():
    code = "import sys, ray_dpo.config; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
