"""Every place ray_dpo reaches into another library's private internals, one function each.

Ray, vLLM, DeepSpeed, transformers and torch keep some things ray_dpo needs out of their
public API: an actor's id on its handle, Ray's actor table without the dashboard, the
driver's printer of forwarded output, Ray Train's result queue and controller hooks, the
undo of a half-done vLLM reload, the attention implementation transformers chose. Such
internals may move in any release, so they are read here and nowhere else
(tests/unit/test_private_seams.py fails on one anywhere else in ray_dpo).

Each function says, in its docstring and in ``SEAMS``, the library version it was checked
against and what it returns when the internal is missing: None, False, {} or a safe
default, never an exception, and its caller then does without (a restart count left out,
Ray's default console, SIGTERM as a plain kill). ``SEAMS`` also names the tests that
exercise each seam: what an upgrade of one of these libraries must run
(docs/environment.md, "Supported versions and upgrades").

Pure: imports ray, torch and vllm only inside the functions that need them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional


@dataclass(frozen=True)
class Seam:
    """One private internal: whose, the version checked, what, the fallback, its tests."""

    library: str
    checked: str
    touches: str
    fallback: str
    tested_by: str


SEAMS: dict[str, Seam] = {
    "actor_ids": Seam(
        "ray", "2.60.0", "ActorHandle._actor_id",
        "ids it cannot read are left out (their restarts are not counted)",
        "tests/ray/test_faults.py, tests/ray/test_reference.py, tests/ray/test_online_faults.py"),
    "actor_restarts": Seam(
        "ray", "2.60.0", "ray._private.state.actors(id)['NumRestarts']",
        "None (the restarts the caller saw itself, or none logged)",
        "tests/ray/test_faults.py, tests/ray/test_reference.py"),
    "actor_table": Seam(
        "ray", "2.60.0", "ray._private.state.actors()",
        "{} (no actor found)", "tests/ray/test_faults.py, tests/ray/test_family.py"),
    "worker_output_dispatcher": Seam(
        "ray", "2.60.0", "ray._private.ray_logging.global_worker_stdstream_dispatcher",
        "None (Ray's default console)", "tests/unit/test_console.py"),
    "wrap_cluster_error_printer": Seam(
        "ray", "2.60.0", "ray._private.worker.print_to_stdstream",
        "False (Ray's error reports print whole)", "tests/unit/test_console.py"),
    "ray_auth_logger": Seam(
        "ray", "2.60.0", "logger ray._private.authentication.authentication_token_setup",
        "a logger Ray no longer writes to (its notice prints again)", "none (one INFO line)"),
    "wrap_sigterm_setter": Seam(
        "ray", "2.60.0", "ray._private.utils.set_sigterm_handler",
        "False (SIGTERM is a plain kill)", "tests/ray/test_faults.py -k sigterm (extended)"),
    "train_result_queue": Seam(
        "ray", "2.60.0", "ray.train.v2._internal get_train_context().get_result_queue()",
        "None (a rank exiting after a SIGTERM may lose its last report)",
        "tests/ray/test_faults.py -k sigterm (extended)"),
    "train_callback_bases": Seam(
        "ray", "2.60.0", "ray.train.v2._internal WorkerGroupCallback, ControllerCallback",
        "two hookless UserCallbacks (lost roles are retried like any failure)",
        "tests/unit/test_fault_records.py, tests/ray/test_faults.py"),
    "limit_worker_group_start": Seam(
        "ray", "2.60.0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, read by each WorkerGroup in the controller",
        "False (a start attempt waits Ray's own timeout, 60 s: the capacity wait ends up to that late)",
        "tests/ray/test_node_loss.py"),
    "sizing_worker_group": Seam(
        "ray", "2.60.0", "the names of ray.train.v2._internal controller states "
        "(InitializingState, RestartingState, ReschedulingState)",
        "False (an elastic group waiting for min_workers to fit is not bounded by run.capacity_wait_s)",
        "tests/ray/test_node_loss.py -k elastic"),
    "refresh_cluster_view": Seam(
        "ray", "2.60.0", "ray.data._internal...default_autoscaling_coordinator "
        "get_reserved_resources(recompute=True)",
        "False (an elastic group's size follows a lost node up to 20 s late: one start attempt "
        "at the old size may time out first)", "tests/ray/test_node_loss.py -k elastic"),
    "universal_checkpoint": Seam(
        "deepspeed", "0.19.8", "deepspeed.checkpoint.ds_to_universal.main(args) and its seven argparse fields",
        "False (the run says that its ZeRO checkpoint cannot resume on another number of workers)",
        "tests/ray/test_node_loss.py -k elastic"),
    "abort_vllm_reload": Seam(
        "vllm", "0.32.0", "reload.layerwise._place_kernel_tensors, LOADING_LAYERS, "
        "model._original_do_torchao_reload",
        "False (nothing undone: the engine's later reloads fail too)",
        "tests/ray/test_generation.py -k half_way"),
    "nccl_options": Seam(
        "torch", "2.13.0", "ProcessGroupNCCL.Options._timeout",
        "options with NCCL's default timeout", "none on CPU (the NCCL path needs GPUs)"),
    "skip_shm_comm_build": Seam(
        "deepspeed", "0.19.8", "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']",
        "none needed: if DeepSpeed stops reading the entry, each new environment compiles the "
        "op once again (~30 s at a policy worker's first start, same training)",
        "tests/ray/test_policy.py"),
    "keeps_grad_norm": Seam(
        "deepspeed", "0.19.8", "engine.optimizer._global_grad_norm",
        "False (the caller computes the norm from the gradients)",
        "tests/ray/test_policy.py"),
    "skip_backward_allreduce": Seam(
        "deepspeed", "0.19.8", "engine.enable_backward_allreduce",
        "none needed: if DeepSpeed stops reading the flag, its all-reduce runs again (slower, same result)",
        "tests/ray/test_policy.py -k one_worker"),
    "attn_implementation": Seam(
        "transformers", "5.19.0", "PretrainedConfig._attn_implementation",
        "'eager'", "tests/unit/test_batch_layouts.py, tests/ray/test_reference.py"),
}


# --------------------------------------------------------------------------- ray


def actor_ids(handles: Iterable[Any]) -> list[str]:
    """The Ray actor ids (hex) of ``handles`` (ray 2.60.0); one it cannot read is left out."""
    ids = []
    for handle in handles:
        try:
            ids.append(handle._actor_id.hex())
        except AttributeError:
            continue
    return ids


def actor_restarts(actor_id: str) -> Optional[int]:
    """Ray's restart count of one actor from the GCS actor table (ray 2.60.0); else None.

    The public state API (ray.util.state) needs the dashboard, which tests and some
    clusters run without; this call does not.
    """
    try:
        from ray._private import state

        return int(state.actors(actor_id)["NumRestarts"])
    except Exception:  # noqa: BLE001 -- moved, or not there this time: unknown
        return None


def actor_table() -> dict[str, dict]:
    """{actor id: info} of every actor the cluster has had, from the GCS (ray 2.60.0); else {}."""
    try:
        from ray._private import state

        return dict(state.actors())
    except Exception:  # noqa: BLE001
        return {}


def worker_output_dispatcher() -> Any:
    """The driver's dispatcher of forwarded worker output (ray 2.60.0); else None."""
    try:
        from ray._private import ray_logging

        return ray_logging.global_worker_stdstream_dispatcher
    except (ImportError, AttributeError):
        return None


def wrap_cluster_error_printer(wrap: Callable[[Callable], Callable]) -> bool:
    """The driver's printer of cluster errors becomes ``wrap(it)``, once (ray 2.60.0); else False."""
    try:
        from ray._private import worker
    except ImportError:
        return False
    return _wrap_once(worker, "print_to_stdstream", wrap)


def ray_auth_logger() -> logging.Logger:
    """The logger of Ray's token-authentication notice (ray 2.60.0); else one Ray never writes to."""
    return logging.getLogger("ray._private.authentication.authentication_token_setup")


def wrap_sigterm_setter(wrap: Callable[[Callable], Callable]) -> bool:
    """Ray's setter of a worker's SIGTERM handler becomes ``wrap(it)``, once (ray 2.60.0); else False."""
    try:
        from ray._private import utils
    except ImportError:
        return False
    return _wrap_once(utils, "set_sigterm_handler", wrap)


def train_result_queue() -> Any:
    """This Ray Train worker's queue of reports for the controller (ray 2.60.0); else None."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().get_result_queue()
    except (ImportError, AttributeError, RuntimeError):
        return None


_START_TIMEOUT = {"env": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "saved": None, "set": False}


def limit_worker_group_start(seconds: Optional[float]) -> bool:
    """Ray Train's next worker group waits at most ``seconds`` to be placed (ray 2.60.0); else False.

    Call it in the controller's process (a ControllerCallback hook); None restores Ray's setting."""
    import os

    try:
        from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR as name
    except ImportError:
        return False
    if name != _START_TIMEOUT["env"]:
        return False
    if not _START_TIMEOUT["set"]:  # the user's (or Ray's default) setting, put back with None
        _START_TIMEOUT.update(saved=os.environ.get(name), set=True)
    if seconds is not None:
        os.environ[name] = f"{max(1.0, seconds):.1f}"
    elif _START_TIMEOUT["saved"] is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = _START_TIMEOUT["saved"]
    return True


def sizing_worker_group(state: Any) -> bool:
    """Whether Ray Train's controller ``state`` decides a new group's size (ray 2.60.0).

    An elastic policy stays in such a state while fewer than min_workers fit; False in any
    other state, or when it cannot tell."""
    return type(state).__name__ in ("InitializingState", "RestartingState", "ReschedulingState")


def refresh_cluster_view() -> bool:
    """Ray's AutoscalingCoordinator reads the node table now (ray 2.60.0); else False.

    An elastic Ray Train group sizes itself from the coordinator's per-node view, which it
    otherwise refreshes every 20 s: a restart after a node loss then sizes the group without
    the lost node. False when the coordinator cannot be reached this way."""
    try:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("ray_dpo", recompute=True), timeout=10)
        return True
    except Exception:  # noqa: BLE001 - missing internal or a slow coordinator: the view catches up by itself
        return False


def universal_checkpoint(tag_dir: str, out_dir: str) -> bool:
    """DeepSpeed's own conversion of a ZeRO checkpoint to its universal form (deepspeed 0.19.8).

    ``tag_dir``: one saved tag (deepspeed/step<k>) on a local path; ``out_dir`` (no trailing
    slash): where the universal copy goes (DeepSpeed also writes latest_universal beside it).
    A universal checkpoint loads on any number of data-parallel ranks, when the engine's
    config has checkpoint.load_universal. Serial, in this process (one extract and one merge
    worker: no process pool inside a Ray worker). False when this DeepSpeed lacks it."""
    from types import SimpleNamespace

    try:
        from deepspeed.checkpoint import ds_to_universal
    except ImportError:
        return False
    if not hasattr(ds_to_universal, "main"):
        return False
    # inject_missing_state: a Hugging Face model carries no universal_checkpoint_info, which
    # ZeRO-1/2 conversion asks for; strict only concerns tensor-parallel name patterns.
    ds_to_universal.main(SimpleNamespace(input_folder=tag_dir, output_folder=out_dir.rstrip("/"),
                                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                         strict=True, inject_missing_state=True))
    return True


def train_callback_bases() -> tuple[type, type]:
    """(WorkerGroupCallback, ControllerCallback): Ray Train's controller-side hooks (ray 2.60.0).

    A run_config callback that is not a UserCallback may implement them
    (ray/train/v2/api/data_parallel_trainer.py). Else two plain UserCallbacks: a subclass
    is accepted as a callback, and its controller-side hooks are never called.
    """
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

        return WorkerGroupCallback, ControllerCallback
    except ImportError:
        from ray.train import UserCallback

        return (type("WorkerGroupCallback", (UserCallback,), {}),
                type("ControllerCallback", (UserCallback,), {}))


def _wrap_once(module: Any, name: str, wrap: Callable[[Callable], Callable]) -> bool:
    """module.name = wrap(module.name), marked so a second call leaves it; False if missing."""
    original = getattr(module, name, None)
    if original is None:
        return False
    if not getattr(original, "_ray_dpo", False):
        wrapped = wrap(original)
        wrapped._ray_dpo = True
        setattr(module, name, wrapped)
    return True


# --------------------------------------------------------------------------- vllm


def abort_vllm_reload(model: Any) -> bool:
    """Undo a half-done in-place reload of ``model`` in a vLLM worker (vllm 0.32.0); else False.

    vLLM keeps each layer's original ("kernel") tensors in its LayerReloadingInfo while the
    layer waits for weights on meta; they go back and the reload's bookkeeping is reset.
    """
    try:
        from vllm.model_executor.model_loader.reload import layerwise

        place, loading = layerwise._place_kernel_tensors, layerwise.LOADING_LAYERS
    except (ImportError, AttributeError):
        return False
    for layer in model.modules():
        info = layerwise.get_layerwise_info(layer)
        if info.can_load():  # still waiting for weights: its tensors are on meta
            if info.kernel_tensors is not None:
                place(layer, info)
            info.reset()
    loading.clear()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    return True


# --------------------------------------------------------------------------- torch


def nccl_options(timeout: Any) -> Any:
    """NCCL group options that time out after ``timeout`` (torch 2.13.0); else NCCL's default timeout."""
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options()
    try:
        options._timeout = timeout
    except AttributeError:
        pass
    return options


# --------------------------------------------------------------------------- deepspeed


def skip_backward_allreduce(engine: Any) -> None:
    """Stop engine.backward() all-reducing gradients (deepspeed 0.19.8).

    Sets its enable_backward_allreduce flag, which it clears itself when there is no process
    group. Only for ZeRO-0 on a group of one rank, where the all-reduce averages nothing but still
    flattens every gradient into buckets and copies them back."""
    engine.enable_backward_allreduce = False


def skip_shm_comm_build() -> None:
    """Keep init_distributed from compiling DeepSpeed's shared-memory op (deepspeed 0.19.8).

    TorchBackend builds that CPU all-reduce op whenever the CPU accelerator lists it as
    compatible.

    The op serves only DeepSpeed's inference all-reduce, which training never calls; gradients
    go through torch.distributed. Its JIT compile took 32 s of a policy worker's start on
    this machine, at every first start in a Python environment (and again whenever another
    environment had rebuilt the shared torch_extensions cache). Call before init_distributed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def keeps_grad_norm(optimizer: Any) -> bool:
    """Whether DeepSpeed's optimizer records the grad norm at step() (deepspeed 0.19.8); else False.

    engine.get_global_grad_norm() returns it after the step; plain fp32 without ZeRO has none.
    """
    return hasattr(optimizer, "_global_grad_norm")


# --------------------------------------------------------------------------- transformers


def attn_implementation(config: Any) -> str:
    """The attention implementation transformers chose for ``config`` (transformers 5.19.0); else 'eager'."""
    return getattr(config, "_attn_implementation", None) or "eager"
