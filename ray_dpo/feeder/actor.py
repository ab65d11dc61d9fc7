"""start_feeder: a BatchFeeder as a threaded Ray actor on the driver's node.

KeepsInitError is the mixin that lets such an actor's constructor error reach the caller
intact (the OnlineCoordinator actor uses it too).
"""

from __future__ import annotations

from typing import Any, Optional

from ray_dpo.feeder.batch_feeder import BatchFeeder
from ray_dpo.feeder.plan import BatchPlan


class KeepsInitError:
    """Mixin for actor classes (list it first): a constructor error is kept for ``ping``
    to raise.

    An exception in an actor's __init__ reaches the caller as ActorDiedError with the
    original error flattened into text; raised from a method it arrives as
    RayTaskError, whose ``cause`` is the original exception.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._init_error: Optional[BaseException] = None
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised by ping()
            self._init_error = err

    def ping(self) -> bool:
        if self._init_error is not None:
            raise self._init_error
        return True


class _FeederActor(KeepsInitError, BatchFeeder):
    """BatchFeeder as an actor whose constructor errors reach start_feeder intact."""


def start_feeder(*, train: Any, plan: BatchPlan, name: Optional[str] = None, max_restarts: int = 0,
                 **feeder_args: Any) -> Any:
    """Start a BatchFeeder actor on this (the driver's) node and wait until it is ready.

    Threaded (max_concurrency = num_workers + 4: every rank can block in get_step while
    stats calls still get through), num_cpus=0 (it must never wait for a CPU that the
    train workers hold). On the driver's node (the head node under ``ray job submit``), hard:
    Ray 2.60 places a num_cpus=0 actor with soft affinity on any node, and a lost worker
    node would then take the feeder along with the role it lost.
    Constructor errors (e.g. an incomplete cache) are raised here.

    train, plan and feeder_args are BatchFeeder's arguments (reference, ref_cache,
    evaluation, eval_max_pairs, reference_free, prefetch); name: the actor's Ray name.

    max_restarts: times Ray restarts the actor when its process dies. A restarted feeder is
    built again from the same arguments (Ray keeps them): steps are a function of the plan's
    seed, epoch and step, so it serves the same rows; reference log-probs scored so far are
    scored again. Calls in flight when it died are retried (max_task_retries=-1; every
    method is idempotent), so the policy workers only wait.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {
        "num_cpus": 0,
        "max_concurrency": plan.num_workers + 4,
        "max_restarts": max_restarts,
        "max_task_retries": -1 if max_restarts else 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        ),
    }
    if name is not None:
        options["name"] = name
    from ray_dpo.console import RESTART_ARGS_NOTICE, without_native_lines

    with without_native_lines(RESTART_ARGS_NOTICE):
        handle = ray.remote(_FeederActor).options(**options).remote(train, plan, **feeder_args)
    try:
        ray.get(handle.ping.remote())
    except ray.exceptions.RayTaskError as err:
        ray.kill(handle)
        raise err.cause from None  # the constructor's own exception, message intact
    return handle
