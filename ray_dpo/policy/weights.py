"""Getting the weights out of a policy worker's DeepSpeed engine (ZeRO-3 partitions included).

    sync_policy    at the coordinator's sync points: the current weights to the generation
                   engines (with a probe to verify them): through the object store, or with
                   online.weight_sync=collective broadcast in buckets by rank 0 (_send_collective)
    export_final   the final policy: hf_model/ (Hugging Face format) of the last checkpoint, or
                   for LoRA adapter/ (peft) and, on request, hf_model/ with the adapters merged

Both are collective: every rank calls them at the same step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

import deepspeed
import ray
import torch
import torch.distributed as dist

from ray_dpo.data.chat_template import export_tokenizer

HF_DIR = "hf_model"  # the final model, loadable by from_pretrained and vLLM (merged, for LoRA)
ADAPTER_DIR = "adapter"  # LoRA runs: the peft adapter of the final policy

if TYPE_CHECKING:
    from ray_dpo.policy.worker import RankState


@dataclass(frozen=True)
class SentSync:
    """Rank 0's last sync, kept until the next: a coordinator restarted after it gets the
    same call again (answer_follower). Its refs keep the weights' object alive, the one the
    engines' keeper holds anyway (no second copy); None for the collective method, whose
    weights nobody keeps."""

    step: int
    refs: Optional[list]
    expected: list


def sync_policy(worker: RankState, follower, step: int, probe, *, send_weights: bool,
                sync: Optional[dict] = None) -> Optional[SentSync]:
    """Hand the current weights to the generation engines (through the coordinator).

    Every rank calls this at the same step: under ZeRO-3 the probe forward and the gather
    are collective. Rank 0 puts the full state dict (Hugging Face names) in the object
    store and blocks in the coordinator's advance; no collective waits on that, so a long
    generation never hits the process group's timeout. The other ranks go on to the next
    step and wait in get_step until its data exists. sync: the follower's sync_spec();
    method collective sends the weights in buckets instead (_send_collective). Returns rank
    0's call as a SentSync (None on other ranks).
    """
    expected = _probe_logps(worker, probe)
    if send_weights and _collective(sync):
        _send_collective(worker, follower, step, expected, sync)  # the one method rank 0 sends itself
        return SentSync(step, None, expected) if worker.rank == 0 else None
    weights = _weights_to_send(worker, step) if send_weights else None
    if worker.rank != 0:
        return None
    refs = [ray.put(weights)] if weights is not None else None  # in a list: passed as a reference
    ray.get(follower.advance.remote(step, refs, expected))
    return SentSync(step, refs, expected)


def _collective(sync: Optional[dict]) -> bool:
    from ray_dpo.engines.facts import SYNC_METHODS

    return sync is not None and SYNC_METHODS[sync["method"]].sent_by_policy


def answers_in_lockstep(worker: RankState, sync: Optional[dict]) -> bool:
    """Whether every rank takes part in answering the follower (answer_follower): the
    collective method under ZeRO-3, where each bucket is gathered by all ranks. Otherwise
    rank 0 answers alone."""
    return _collective(sync) and worker.world_size > 1 and worker.engine.zero_optimization_partition_weights()


def answer_follower(worker: RankState, follower, need: str, last: Optional[SentSync], step: int, probe,
                    sync: Optional[dict]) -> None:
    """Send what the follower's needs_sync asked for, before feeder step ``step`` (the policy
    has trained ``step`` steps). RESEND, a follower restarted after the last sync: the same
    call again (the same weights object), so it remakes the rounds that sync started from the
    same weights as an unkilled run. With the collective method nobody kept those weights:
    rank 0 broadcasts its current ones under the last sync's step (the rounds' staleness
    counts from the weights' real step). WEIGHTS, an engine restarted between collective
    syncs: the current weights, and nothing else starts. Rank 0 alone, or every rank in
    lockstep (answers_in_lockstep)."""
    from ray_dpo.engines.follower import COLLECTIVE, RESEND

    if need == RESEND and not _collective(sync):
        if worker.rank == 0:
            print(f"[ray_dpo] step {step}: the coordinator was restarted after the weight sync at step "
                  f"{last.step}; sending it that sync again, so it remakes the rounds it started", flush=True)
            ray.get(follower.advance.remote(last.step, last.refs, last.expected))
        return
    expected = _probe_logps(worker, probe)  # under ZeRO-3 every rank's forward
    finish = None  # rank 0's closing call; the other ranks only gather
    if worker.rank == 0 and need == RESEND:
        finish = lambda: follower.advance.remote(last.step, COLLECTIVE, expected)  # noqa: E731
        print(f"[ray_dpo] step {step}: the coordinator was restarted after the collective weight sync at step "
              f"{last.step}; broadcasting the policy's current weights (step {step}) so it remakes the rounds "
              "it started", flush=True)
    elif worker.rank == 0:
        finish = lambda: follower.resync.remote(step, expected)  # noqa: E731
        print(f"[ray_dpo] step {step}: a generation engine restarted between collective weight syncs; "
              f"broadcasting the policy's current weights (step {step}) to the engines", flush=True)
    _send_collective(worker, follower, step, expected, sync, finish=finish)


@dataclass
class _Payload:
    """What a collective sync sends: entries [(name, dtype, full shape)] in order, and
    ``fetch(names)``, a context in which those tensors are whole (ZeRO-3: gathered, then
    released). every_rank: each fetch is collective (the policy ranks all take part)."""

    entries: list
    fetch: Callable[[list], ContextManager[list]]
    every_rank: bool
    adapter: Optional[dict] = None


def _payload(worker: RankState, step: int) -> Optional[_Payload]:
    """The weights a collective sync sends (None on ranks with no part in it). A full-weight
    policy streams its parameters bucket by bucket; a LoRA policy's adapter (or merged
    weights, policy.lora.sync=merged) is gathered first, as the object_store method does."""
    if worker.policy.lora.enabled:
        weights = _weights_to_send(worker, step)  # collective under ZeRO-3: every rank
        if weights is None:
            return None
        adapter = None
        if not isinstance(weights, dict):  # AdapterWeights
            adapter, weights = weights.config, weights.tensors
        held = dict(weights)
        return _Payload([(n, str(t.dtype), tuple(t.shape)) for n, t in held.items()],
                        lambda names: contextlib.nullcontext([held[n] for n in names]), every_rank=False,
                        adapter=adapter)
    params = dict(worker.engine.module.named_parameters())  # tied weights once
    gather = _gatherer(worker)

    @contextlib.contextmanager
    def fetch(names):
        group = [params[n] for n in names]
        with gather(group):
            yield [p.data for p in group]

    partitioned = worker.engine.zero_optimization_partition_weights()
    if worker.rank != 0 and not partitioned:
        return None
    entries = [(n, str(p.dtype), tuple(getattr(p, "ds_shape", p.shape))) for n, p in params.items()]
    return _Payload(entries, fetch, every_rank=partitioned)


def _send_collective(worker: RankState, follower, step: int, expected, sync: dict,
                     finish: Optional[Callable[[], Any]] = None) -> None:
    """online.weight_sync=collective: rank 0 opens a process group with every engine
    (engines/collective.py) and broadcasts the weights bucket by bucket; under ZeRO-3 every
    rank gathers each bucket with it and frees it before the next. When an engine died
    during the sync (the follower restarts it and answers RETRY) the whole sync is sent
    again over a new group; the ranks agree on that through the training group. finish:
    rank 0's closing call (a ref to its metrics), by default advance(step, COLLECTIVE)."""
    from ray_dpo.engines.collective import GroupBroken, GroupSender, backend_for, plan_buckets
    from ray_dpo.engines.follower import COLLECTIVE, RETRY

    payload = _payload(worker, step)
    if payload is None:
        return
    buckets = plan_buckets(payload.entries, sync["bucket_bytes"])
    attempt = 0
    while True:
        attempt += 1
        sender, broken = None, None
        if worker.rank == 0:
            sender = GroupSender(backend=backend_for(worker.device), device=worker.device,
                                 world_size=sync["world_size"], timeout_s=sync["timeout_s"])
            ticket = sender.ticket(buckets, adapter=payload.adapter, version=step)
            ray.get(follower.begin_collective.remote(step, ticket))
            try:
                sender.connect(check=lambda: ray.get(follower.collective_problem.remote()))
            except GroupBroken as err:
                broken = str(err)
        for bucket in buckets:
            with payload.fetch(bucket.names) as tensors:
                if sender is not None and broken is None:
                    try:
                        sender.send(bucket, tensors)
                    except GroupBroken as err:
                        broken = str(err)  # keep fetching: under ZeRO-3 the other ranks gather on
        retry = False
        if sender is not None:
            sender.close()
            done = finish() if finish is not None else follower.advance.remote(step, COLLECTIVE, expected)
            retry = RETRY in ray.get(done)
        if payload.every_rank and worker.world_size > 1:
            flag = torch.tensor([int(retry)], device=worker.device)
            dist.broadcast(flag, src=0)
            retry = bool(flag.item())
        if not retry:
            return
        if worker.rank == 0:
            print(f"[ray_dpo] step {step}: collective weight sync attempt {attempt} was interrupted "
                  f"({broken or 'an engine restarted'}); sending it again", flush=True)


def _probe_logps(worker: RankState, probe) -> Optional[list[float]]:
    from ray_dpo.batching.probe import torch_probe_logps

    if worker.rank != 0 and not worker.engine.zero_optimization_partition_weights():
        return None
    return torch_probe_logps(worker.engine.module, probe, pad_token_id=worker.pad_token_id)


def _weights_to_send(worker: RankState, step: int):
    """What a sync sends: the full state dict, or for a LoRA policy its adapter alone
    (policy.lora.sync=adapter) or the base weights with the adapter merged in (=merged, for
    engines without LoRA support). Rank 0 gets it, None elsewhere; collective under ZeRO-3."""
    if not worker.policy.lora.enabled:
        return _gather_weights(worker)
    if worker.policy.lora.sync == "merged":
        return merged_weights(worker)
    return adapter_weights(worker, version=step)


def adapter_weights(worker: RankState, *, version: int):
    """The policy's adapter as AdapterWeights (peft's saved names) on rank 0, None elsewhere."""
    from peft import get_peft_model_state_dict

    from ray_dpo.engines.weight_sync import AdapterWeights

    state = _gather_weights(worker, trainable_only=True)
    if state is None:
        return None
    module = worker.engine.module
    config = module.peft_config["default"].to_dict()
    return AdapterWeights(config=_json_able(config), tensors=dict(get_peft_model_state_dict(module, state_dict=state)),
                          version=version)


def _json_able(config: dict) -> dict:
    """peft's config dict with sets (target_modules) as sorted lists: adapter_config.json."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def merged_weights(worker: RankState) -> Optional[dict[str, torch.Tensor]]:
    """Hugging Face names -> the base weights with the LoRA update merged in (W + B A alpha/r),
    as a full-model sync sends them; rank 0 gets them, None elsewhere. Each adapted layer is
    gathered (base weight and adapter together) and merged into a fresh CPU copy: the
    training weights are never modified."""
    from ray_dpo.lora import merged_tensors

    out = merged_tensors(worker.engine.module, gather=_gatherer(worker), keep=worker.rank == 0)
    return out if worker.rank == 0 else None


def _gather_weights(worker: RankState, *, trainable_only: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """The full state dict on rank 0 (CPU copies, the module's parameter names: Hugging Face
    names, or peft's for a LoRA model), None elsewhere; trainable_only: the parameters that
    train (LoRA: the adapters and modules_to_save).

    Parameters only (tied weights once, by their first name; buffers such as rotary
    tables are not in checkpoints). Under ZeRO-3 each parameter is gathered on all ranks
    in turn, so whole weights never sit in one rank's device memory at once.
    """
    out: Optional[dict[str, torch.Tensor]] = {} if worker.rank == 0 else None
    gather = _gatherer(worker)
    for name, param in worker.engine.module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with gather([param]):
            if out is not None:
                out[name] = param.data.detach().to("cpu", copy=True)
    return out


def _gatherer(worker: RankState):
    """``gather(params)``: a context in which ``params`` are whole on every rank (ZeRO-3's
    GatheredParameters, collective), or a no-op when the weights are not partitioned."""
    if not worker.engine.zero_optimization_partition_weights():
        return lambda params: contextlib.nullcontext()
    return lambda params: deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def export_final(worker: RankState, model_cfg, root: str) -> None:
    """The final checkpoint's model files under ``root`` (every rank calls this): hf_model/
    for a full-parameter run; for a LoRA run adapter/ (a peft adapter directory), plus
    hf_model/ with the adapters merged in when policy.lora.merge_on_export."""
    lora = worker.policy.lora
    if not lora.enabled:
        export_hf(worker, model_cfg, os.path.join(root, HF_DIR))
        return
    adapter_dir = os.path.join(root, ADAPTER_DIR)
    export_adapter(worker, model_cfg, adapter_dir)
    if lora.merge_on_export and worker.rank == 0:
        from ray_dpo.lora import merge_adapter

        merge_adapter(model_cfg, adapter_dir, os.path.join(root, HF_DIR))
        _copy_tokenizer(model_cfg, os.path.join(root, HF_DIR))
    dist.barrier()


def export_adapter(worker: RankState, model_cfg, out_dir: str) -> None:
    """A peft adapter directory (adapter_config.json, adapter_model.safetensors) with the
    tokenizer and chat template: PeftModel.from_pretrained(base, out_dir) and vLLM's LoRA
    loading take it. Every rank calls this (gathering is collective under ZeRO-3)."""
    state_dict = _gather_weights(worker, trainable_only=True)
    if worker.rank == 0:
        worker.engine.module.save_pretrained(out_dir, state_dict=state_dict)
        _copy_tokenizer(model_cfg, out_dir)


def export_hf(worker: RankState, model_cfg, out_dir: str) -> None:
    """Write the policy as a Hugging Face model (rank 0 writes; every rank must call this,
    since under ZeRO-3 gathering the partitioned weights is collective)."""
    engine, module = worker.engine, worker.engine.module
    state_dict = None  # None: save_pretrained takes the module's own (whole) weights
    if engine.zero_optimization_partition_weights():
        # save_16bit_model gathers layer by layer onto rank 0 (stage3_gather_16bit_weights_
        # on_model_save in the config); whole weights never sit on every rank at once.
        staging = out_dir + ".gathered"
        engine.save_16bit_model(staging, "weights.pt")
        if worker.rank == 0:
            state_dict = torch.load(os.path.join(staging, "weights.pt"), map_location="cpu")
        shutil.rmtree(staging, ignore_errors=True)
    if worker.rank == 0:
        module.save_pretrained(out_dir, state_dict=state_dict)
        _copy_tokenizer(model_cfg, out_dir)
    dist.barrier()


def _copy_tokenizer(model_cfg, out_dir: str) -> None:
    """Tokenizer files next to the weights, so hf_model/ alone serves from_pretrained and vLLM,
    with model.chat_template (when set) as its chat template: the one the pairs were built with."""
    export_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path, out_dir,
                     chat_template=model_cfg.chat_template,
                     trust_remote_code=model_cfg.trust_remote_code)
