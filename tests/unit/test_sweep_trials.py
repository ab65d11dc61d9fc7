"""A sweep's trials: the grid and samples expanded, every trial's config checked up front."""

import dataclasses

import pytest

from ray_dpo.config import ConfigError, from_dict
from ray_dpo.sweep.trials import expand, grid_args, points, reference_share_key, trial_name


@pytest.fixture
def base(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')

    def make(**sweep):
        return from_dict({"run": {"name": "sw", "storage_path": str(tmp_path / "runs")},
                          "model": {"name_or_path": "some-org/some-model"},
                          "data": {"train_files": [str(data)]}, "sweep": sweep,
                          "online": {"judge": {"function": "ray_dpo.testing.assets:judge_score"}}})

    return make


def test_grid_args_read_values_as_yaml_and_a_whole_list():
    assert grid_args(["loss.beta=0.05,0.1", "online.enabled=false,true", "loss.type=sigmoid"]) == {
        "loss.beta": [0.05, 0.1], "online.enabled": [False, True], "loss.type": ["sigmoid"]}
    assert grid_args(["data.train_files=[[a, b], [c]]"]) == {"data.train_files": [["a", "b"], ["c"]]}
    with pytest.raises(ConfigError, match="section.key=value1,value2"):
        grid_args(["loss.beta"])


def test_the_grid_is_every_combination_and_the_command_line_replaces_a_key(base):
    cfg = base(grid={"loss.beta": [0.1, 0.3], "loss.type": ["sigmoid", "ipo"]})
    assert points(cfg.sweep, seed=0) == [
        {"loss.beta": 0.1, "loss.type": "sigmoid"}, {"loss.beta": 0.1, "loss.type": "ipo"},
        {"loss.beta": 0.3, "loss.type": "sigmoid"}, {"loss.beta": 0.3, "loss.type": "ipo"}]
    assert points(cfg.sweep, seed=0, grid={"loss.beta": ["1e-2"]}) == [
        {"loss.beta": 0.01, "loss.type": "sigmoid"}, {"loss.beta": 0.01, "loss.type": "ipo"}]


def test_samples_are_drawn_in_range_and_again_the_same_on_a_rerun(base):
    cfg = base(grid={"loss.beta": [0.1, 0.3]}, sample={"policy.learning_rate": {"loguniform": [1e-6, 1e-4]}},
               num_samples=3)
    first = points(cfg.sweep, seed=0)
    assert len(first) == 6 and first == points(cfg.sweep, seed=0)
    assert all(1e-6 <= p["policy.learning_rate"] <= 1e-4 for p in first)
    assert len({p["policy.learning_rate"] for p in first}) == 6
    assert points(cfg.sweep, seed=1) != first


def test_expand_builds_each_trial_with_its_own_name_and_shares_offline_reference_passes(base):
    # reference.precompute: true in the config is what an offline run wants and an online
    # run refuses: the sweep sets it per trial.
    cfg = base(grid={"loss.beta": [0.1, 0.3], "online.enabled": [False, True]})
    cfg = dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, precompute=True))
    trials = expand(cfg, check_files=False)
    assert [t.overrides for t in trials] == [
        {"loss.beta": 0.1, "online.enabled": False}, {"loss.beta": 0.1, "online.enabled": True},
        {"loss.beta": 0.3, "online.enabled": False}, {"loss.beta": 0.3, "online.enabled": True}]
    assert [t.config.loss.beta for t in trials] == [0.1, 0.1, 0.3, 0.3]
    assert len({t.name for t in trials}) == 4 and all(t.name.startswith("sw-beta0.") for t in trials)
    assert trials[0].name == trial_name("sw", {"loss.beta": 0.1, "online.enabled": False})
    assert all(t.config.run.name == t.config.tracking.mlflow.run_name == t.name for t in trials)
    assert not any(t.config.sweep.grid for t in trials)
    # Offline trials read the cached pass, computed once; online ones score their own samples.
    assert [t.config.reference.precompute for t in trials] == [True, False, True, False]
    keys = [reference_share_key(t.config) for t in trials]
    assert keys[0] == keys[2] is not None and keys[1] is None and keys[3] is None


def test_a_reference_free_loss_shares_no_pass_and_a_data_change_is_another_pass(base):
    cfg = base(grid={"loss.type": ["sigmoid", "simpo"], "data.max_length": [1024, 768]})
    trials = expand(cfg, check_files=False)
    keys = {tuple(t.overrides.values()): reference_share_key(t.config) for t in trials}
    assert keys[("simpo", 1024)] is None and keys[("simpo", 768)] is None
    assert keys[("sigmoid", 1024)] != keys[("sigmoid", 768)]


def test_every_bad_trial_is_reported_before_anything_starts(base):
    cfg = base(grid={"loss.bta": [1], "policy.zero_stage": [1, 7]})
    with pytest.raises(ConfigError) as err:
        expand(cfg, check_files=False)
    text = str(err.value)
    assert "loss.bta: unknown key (did you mean 'beta'?) (in 2 trials" in text
    assert "policy.zero_stage" in text and "(in trial loss.bta=1 policy.zero_stage=7)" in text


def test_the_sweep_section_itself_is_checked(base):
    with pytest.raises(ConfigError) as err:
        base(grid={"loss.beta": []}, sample={"policy.learning_rate": {"loguniform": [0, 1]}},
             reduction_factor=1)
    text = str(err.value)
    assert "sweep.grid.loss.beta: must be a non-empty list" in text
    assert "sweep.sample.policy.learning_rate.loguniform: must be [low, high] with low < high and low > 0" in text
    assert "sweep.reduction_factor: must be > 1" in text


def test_the_scheduler_and_concurrency_follow_the_section(base):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    from ray_dpo.sweep.runner import _scheduler, concurrency

    cfg = base(grid={"loss.beta": [0.1, 0.3]}, scheduler="asha", grace_period=4)
    trials = expand(cfg, check_files=False)
    stopped = set()
    asha = _scheduler(cfg, trials, stopped)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step"
    assert min(rung for rung, _ in asha._brackets[0]._rungs) == 4  # the first rung: the grace period
    assert isinstance(_scheduler(base(scheduler="median"), trials, stopped), MedianStoppingRule)
    assert _scheduler(base(), trials, stopped) is None
    # Its STOP decisions are recorded by trial name: only they count as stopped (else: interrupted).
    from ray.tune.schedulers import TrialScheduler

    asha.set_search_properties(metric="eval/judge_score", mode="max")
    trial = type("T", (), {"config": {"trial": {"name": "t-1"}}, "trial_id": "1"})()
    asha._trial_info[trial.trial_id] = asha._brackets[0]
    assert asha.on_trial_result(None, trial, {"step": 3, "eval/judge_score": 0.1}) == TrialScheduler.CONTINUE
    assert stopped == set()
    assert asha.on_trial_result(None, trial, {"step": asha._max_t, "eval/judge_score": 0.1}) == TrialScheduler.STOP
    assert stopped == {"t-1"}
    assert concurrency(cfg, trials, local=True)[0] == 1
    assert concurrency(base(max_concurrent_trials=3), trials, local=True)[0] == 3


def test_validate_lists_the_trials_of_a_grid_given_on_the_command_line(tmp_path, capsys):
    from ray_dpo.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: sw}}\nmodel: {{name_or_path: some-org/some-model}}\n"
                      f"data: {{train_files: [{data}]}}\n")
    assert main(["validate", str(config), "--grid", "loss.beta=0.1,0.3"]) == 0
    out = capsys.readouterr().out
    assert "so are the 2 trial(s)" in out and "loss.beta=0.3" in out
    assert main(["validate", str(config), "--grid", "policy.zero_stage=1,7"]) == 2
    assert "policy.zero_stage: must be 0, 1, 2 or 3, got 7 (in trial policy.zero_stage=7)" in capsys.readouterr().err


def test_the_sweep_eta_goes_by_the_kind_of_trials_left():
    from ray_dpo.sweep.runner import sweep_eta, trial_kind

    assert trial_kind({"online": {"enabled": True}}) == "online" and trial_kind({"loss": {}}) == "offline"
    took = {"offline": [600.0, 660.0]}
    assert sweep_eta(["offline", "offline"], took) == "ETA 21.0 min"
    assert sweep_eta(["offline", "online"], took) == "ETA after the first online trial"
    took["online"] = [1800.0]
    assert sweep_eta(["online", "online", "offline"], took) == "ETA 70.5 min"
    assert sweep_eta(["online", "online", "offline"], took, at_once=3) == "ETA 23.5 min"
