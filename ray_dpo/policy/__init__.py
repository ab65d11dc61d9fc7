"""Policy training: DeepSpeed config (pure) and the Ray Train worker loop.

``ray_dpo.policy.ds_config`` is pure; ``ray_dpo.policy.worker`` imports ray, deepspeed and
transformers, so import it explicitly where it is needed (the driver, the tests).
"""

from ray_dpo.policy.ds_config import build_ds_config, lr_lambda

__all__ = ["build_ds_config", "lr_lambda"]
