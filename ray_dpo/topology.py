"""Which actors a config starts, how many, and what each holds: the one answer. Pure.

    roles(cfg, use_gpu=) -> [Role]

The driver prints it at the start of a run, the local cluster is sized from it
(config.derived.local_cpu_needs), and ``ray-dpo k8s`` lays its roles out as worker groups
(k8s/groups.py), so the three cannot disagree. Each role says which config section its
sizes come from, so a message can name the key to change.

    policy       policy.num_workers DeepSpeed workers (Ray Train)
    reference    reference.num_actors frozen-model actors, unless the loss or LoRA's
                 adapters_off needs none; with reference.precompute and no held-out
                 sampling they only live before training
    generation   online.num_engines engines, for online rounds or held-out sampling
    judge        online.judge.num_actors reward-model actors (online rounds, or held-out
                 eval with no eval.judge of its own)
    eval-judge   eval.judge.num_actors reward-model actors: a held-out judge of its own

The feeder, the coordinator and the held-out follower hold no CPU and are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray_dpo.config import JudgeConfig, RunConfig
from ray_dpo.config.derived import heldout_judge
from ray_dpo.loss_rules import needs_reference_group
from ray_dpo.resources import gpus_per_actor

TRAINING, BEFORE_TRAINING = "training", "before training"


@dataclass(frozen=True)
class Role:
    name: str
    key: str  # the config section its count and sizes come from
    count: int
    cpus: float  # each
    gpus: float  # each, as the actor asks for them (0 on a CPU run)
    resources: dict = field(default_factory=dict)  # custom Ray resources, each
    when: str = TRAINING  # up while training, or only before it (reference.precompute)

    @property
    def total_cpus(self) -> float:
        return self.count * self.cpus

    @property
    def counted(self) -> str:
        """e.g. "2 policy workers"."""
        noun = {"policy": "policy worker", "reference": "reference actor", "generation": "generation engine",
                "judge": "reward-model judge actor", "eval-judge": "held-out reward-model judge actor"}[self.name]
        return f"{self.count} {noun}{'s' if self.count != 1 else ''}"

    def describe(self) -> str:
        """e.g. "2 policy workers x 1 CPU" (GPUs and resources when there are any)."""
        each = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        extra = f" {self.resources}" if self.resources else ""
        later = " (before training)" if self.when == BEFORE_TRAINING else ""
        return f"{self.counted} x {each}{extra}{later}"


def roles(cfg: RunConfig, *, use_gpu: bool) -> list[Role]:
    """The actors ``cfg`` starts, in start order (module docstring)."""
    pol, ref, onl = cfg.policy, cfg.reference, cfg.online
    out = [Role("policy", "policy", pol.num_workers, pol.num_cpus_per_worker,
                pol.num_gpus_per_worker if use_gpu else 0.0, dict(pol.resources))]
    if needs_reference_group(cfg):
        when = BEFORE_TRAINING if ref.precompute and not cfg.eval.prompts_file else TRAINING
        out.append(Role("reference", "reference", ref.num_actors, ref.num_cpus_per_actor,
                        gpus_per_actor(ref.num_gpus_per_actor, use_gpu=use_gpu), dict(ref.resources), when))
    heldout = bool(cfg.eval.prompts_file)
    if onl.enabled or heldout:
        out.append(Role("generation", "online", onl.num_engines, onl.num_cpus_per_engine,
                        gpus_per_actor(onl.num_gpus_per_engine, use_gpu=use_gpu), dict(onl.resources)))
        # The follower scores with online.judge (rounds; held-out eval without eval.judge)
        # and with eval.judge when the held-out eval has one of its own.
        judges = [("judge", "online.judge", onl.judge)] if onl.enabled else []
        if heldout:
            own = heldout_judge(cfg)
            if own is onl.judge and not onl.enabled:
                judges.append(("judge", "online.judge", own))
            elif own is not onl.judge:
                judges.append(("eval-judge", "eval.judge", own))
        out += [_judge_role(name, key, judge, use_gpu) for name, key, judge in judges if judge.reward_model]
    return out


def _judge_role(name: str, key: str, judge: JudgeConfig, use_gpu: bool) -> Role:
    return Role(name, key, judge.num_actors, judge.num_cpus_per_actor,
                gpus_per_actor(judge.num_gpus_per_actor, use_gpu=use_gpu), dict(judge.resources))
