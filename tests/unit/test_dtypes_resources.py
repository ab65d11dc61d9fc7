"""ray_dpo.dtypes and ray_dpo.resources: the one dtype table and the one actor-resources rule."""

import pytest
import torch

from ray_dpo.dtypes import DTYPES, dtype_name, torch_dtype
from ray_dpo.resources import actor_options, gpus_per_actor


def test_every_config_dtype_maps_to_torch_and_vllm_names():
    assert {name: torch_dtype(name) for name in DTYPES} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert dtype_name("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16, got 'fp8'"):
        torch_dtype("fp8")


def test_gpus_per_actor_is_the_setting_or_one_and_none_on_cpu():
    assert gpus_per_actor(0.0, use_gpu=True) == 1.0
    assert gpus_per_actor(0.5, use_gpu=True) == 0.5
    assert gpus_per_actor(2.0, use_gpu=False) == 0.0


def test_actor_options():
    opts = actor_options(num_cpus=2, num_gpus=0, resources={"node": 0.01}, use_gpu=True,
                         env_vars={"A": "1"})
    assert opts == {"num_cpus": 2, "num_gpus": 1.0, "resources": {"node": 0.01},
                    "runtime_env": {"env_vars": {"A": "1"}}}
    assert "runtime_env" not in actor_options(num_cpus=1, num_gpus=0, resources={}, use_gpu=False)
