"""TrainLoopSpec: the typed seam between the driver and the policy workers' train loop."""

import dataclasses

import pytest

from ray_dpo.config import LossConfig, ModelConfig, PolicyConfig
from ray_dpo.policy.loop_spec import TrainLoopSpec


def test_spec_round_trips_through_the_train_loop_config_dict():
    feeder = object()  # an actor handle in a run: passed along as it is, never copied
    spec = TrainLoopSpec(model=ModelConfig(name_or_path="m"), policy=PolicyConfig(), loss=LossConfig(beta=0.2),
                         feeder=feeder, eval_every=5, device="cpu", run_dir="/runs/x", seed=7)
    config = spec.as_config()
    assert set(config) == {"model", "policy", "loss", "feeder", "eval_every", "follower", "device", "run_dir", "seed"}
    assert config["feeder"] is feeder and config["loss"] is spec.loss and config["follower"] is None
    assert TrainLoopSpec.from_config(config) == spec


def test_spec_defaults_and_unknown_keys():
    spec = TrainLoopSpec(model=ModelConfig(name_or_path="m"), policy=PolicyConfig(), loss=LossConfig(), feeder=None)
    assert (spec.eval_every, spec.follower, spec.device, spec.run_dir) == (0, None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eval_every = 3
    with pytest.raises(TypeError, match="log_every"):
        TrainLoopSpec.from_config({**spec.as_config(), "log_every": 1})
