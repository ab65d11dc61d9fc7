"""ray_dpo: DPO preference tuning on Ray.

Importing the package is cheap: ray, deepspeed and vllm load only in the modules that
orchestrate (ray_dpo.driver, ray_dpo.data.pipeline, ray_dpo.feeder, ray_dpo.reference,
ray_dpo.policy, ray_dpo.online). docs/architecture.md says which module does what.
"""

__version__ = "0.1.0"
