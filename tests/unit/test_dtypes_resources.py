"""ray_dpo.dtypes: the one dtype table."""

import pytest
import torch

from ray_dpo.dtypes import DTYPES, dtype_name, torch_dtype


def test_every_config_dtype_maps_to_torch_and_vllm_names():
    assert {name: torch_dtype(name) for name in DTYPES} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert dtype_name("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16, got 'fp8'"):
        torch_dtype("fp8")
