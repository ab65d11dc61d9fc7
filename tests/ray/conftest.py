"""Fixtures for the Ray tier: a tiny run config on the offline assets."""

import pytest


@pytest.fixture
def tiny_config(tiny_assets, tmp_path):
    """Factory: ``tiny_config(name, **{"policy.max_steps": 4})`` -> a validated RunConfig.

    Two ZeRO-1 workers, one reference actor, MLflow in a SQLite file under tmp_path.
    """
    from ray_dpo.config import apply_overrides, from_dict

    def make(name, **overrides):
        data = {
            "run": {"name": name, "storage_path": str(tmp_path / "runs"), "device": "cpu"},
            "model": {"name_or_path": tiny_assets["model"], "dtype": "fp32"},
            "data": {"train_files": [tiny_assets["train_glob"]], "eval_files": [tiny_assets["eval_file"]],
                     "max_length": 64, "max_prompt_length": 32},
            "loss": {"beta": 0.1},
            "reference": {"num_actors": 1, "batch_size": 16},
            "policy": {"num_workers": 2, "zero_stage": 1, "micro_batch_size": 8, "learning_rate": 1e-3,
                       "warmup_steps": 2, "num_epochs": 1},
            "tracking": {"progress": True, "mlflow": {"experiment": "tests"}},
            "eval": {"every_steps": 0},
        }
        return from_dict(apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()]))

    return make
