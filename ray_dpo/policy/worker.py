"""The policy worker: one DeepSpeed engine per Ray Train worker, DPO steps fed by the BatchFeeder.

    train_loop_per_worker(config)      run by ray.train.torch.TorchTrainer on every worker, with
                                       config = TrainLoopSpec.as_config() (policy/loop_spec.py)
      setup_engine                     model (partitioned at load under ZeRO-3), AdamW, LambdaLR
      find_resume_point, load_checkpoint   resume from ray.train.get_checkpoint()
      for each optimizer step:
        run_step                       feeder micro-batches -> forward/backward -> engine.step
        evaluate                       every spec.eval_every steps and at the end
        sync_policy                    at the coordinator's sync points (online rounds,
                                       held-out sampling): weights -> generation engines
                                       (policy/weights.py)
        save_checkpoint / report       every rank reports, every step (Ray Train V2 needs it)
      export_final                     the final policy in Hugging Face format, under hf_model/,
                                       or for LoRA a peft adapter under adapter/ (policy/weights.py)

Step numbering: the feeder's steps are 0-based indices; the reported "step" is the number
of optimizer steps completed (1 after the first update), which is also what a checkpoint's
client_state stores, so resuming from a checkpoint at step k asks the feeder for index k.

Checkpoints (layout, completeness manifests, RNG, falling back past an incomplete one):
ray_dpo/policy/checkpoints.py. A restarted worker group (policy.max_failures) runs this same
function again and resumes from the latest complete checkpoint.

Every step's report also carries "attempt" (a fresh id each time a rank starts this
function), "node" (the rank's node IP) and "resumed_from" (the checkpoint's step, 0 for a
fresh start): the callback counts a worker-group restart when rank 0's attempt changes,
names the node of a failed rank and the step a rerun resumes from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
import uuid
from typing import Any, Optional

import deepspeed
import ray
import ray.train
import torch
import torch.distributed as dist

from ray_dpo import compat, faults, lora
from ray_dpo.batching.budget import token_budget_micro_batches
from ray_dpo.batching.layouts import batch_stats, build_batch, model_inputs, pair_logps
from ray_dpo.batching.logps import mean_nll
from ray_dpo.config import LossConfig, PolicyConfig
from ray_dpo.dtypes import torch_dtype
from ray_dpo.engines.follower import RESEND, WEIGHTS
from ray_dpo.losses import LossSpec, dpo_loss, loss_spec
from ray_dpo.policy.checkpoints import DS_DIR, find_resume_point, load_checkpoint, save_checkpoint  # noqa: F401
from ray_dpo.policy.ds_config import build_ds_config, lr_lambda
from ray_dpo.policy.loop_spec import TrainLoopSpec
from ray_dpo.policy.step_metrics import (PHASES, SUMS, PhaseClock, all_reduce_sums, global_kl, loss_metrics,
                                         metric_sums, sum_names)
from ray_dpo.policy.weights import (HF_DIR, SentSync, answer_follower, answers_in_lockstep,  # noqa: F401
                                    export_final, sync_policy)

# Dense bf16 peak FLOP/s per GPU (no sparsity), matched against torch.cuda.get_device_name()
# by substring, first match wins (so "H100" variants go before a bare "H100"). perf/mfu is
# logged only when the device is in this table: on CPU there is no meaningful peak, so no mfu.
_PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
                    ("B200", 2250e12), ("GH200", 989e12), ("A100", 312e12), ("A800", 312e12),
                    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
                    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12))


@dataclasses.dataclass
class RankState:
    """What the loop carries between steps on one rank."""

    engine: Any  # deepspeed.DeepSpeedEngine
    feeder: Any  # ActorHandle of a BatchFeeder
    loss: LossConfig
    policy: PolicyConfig  # gradient_accumulation_steps, layout, max_tokens_per_micro_batch / _row
    rank: int
    world_size: int
    device: torch.device
    pad_token_id: int
    total_steps: int
    # micro-batches per step on this world size (more than gradient_accumulation_steps in an
    # elastic group that lost ranks: feeder.plan.accumulation_steps)
    accumulation: int = 1
    steps_per_epoch: Optional[int] = None  # None when the feeder does not say
    attn_implementation: str = "sdpa"  # what the loaded model uses (model_inputs needs it)
    num_params: int = 0  # for perf/mfu: ~6 * params FLOPs per computed position (fwd + bwd)
    peak_flops: Optional[float] = None  # per device; None: unknown (CPU), no perf/mfu
    # transformers reads ZeRO-3 settings through a weak reference to this object: it must
    # outlive the model, or transformers silently stops treating parameters as partitioned.
    hf_ds_config: Optional[Any] = None
    # LoRA with policy.lora.reference=adapters_off: the reference log-probs come from this
    # rank's own model with its adapters off, not from the feeder's rows
    adapters_off_reference: bool = False
    # the loss's registry entry (from loss.type): reference or not, pairs or unpaired, metrics
    loss_spec: LossSpec = dataclasses.field(init=False)
    # perf_counter when the last run_step returned: the next step's perf/report_s starts there
    last_step_end: Optional[float] = None
    # GPU only, RAY_DPO_PROFILE_SYNC=1: synchronize at each phase boundary (PhaseClock)
    phase_sync: Optional[Any] = None

    def __post_init__(self):
        self.loss_spec = loss_spec(self.loss.type)


# --------------------------------------------------------------------------- entry point


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker loop; config: TrainLoopSpec.as_config() (Ray Train hands the loop a
    dict), the spec's fields documented in ray_dpo.policy.loop_spec."""
    spec = TrainLoopSpec.from_config(config)
    faults.arm_sigterm_grace(spec.policy.sigterm_grace_s)
    try:
        _train(spec)
    finally:
        faults.arm_sigterm_grace(0.0)  # Ray stopping a finished or failed group: no grace


def _train(spec: TrainLoopSpec) -> None:
    policy = spec.policy
    context = ray.train.get_context()
    point = find_resume_point(context.get_world_rank())
    # An elastic group restarted on another number of workers than saved its ZeRO checkpoint.
    reshard = point is not None and point.reshards(world_size=context.get_world_size(), zero_stage=policy.zero_stage)
    worker = _make_worker(spec, universal=reshard)
    step = load_checkpoint(worker.engine, point, rank=worker.rank, frozen_excluded=policy.lora.enabled,
                           reshard=reshard)
    # Which start of the worker group a report comes from, and where this rank runs.
    tags = {"attempt": uuid.uuid4().hex, "node": ray.util.get_node_ip_address(), "resumed_from": step}
    if step >= worker.total_steps:
        return  # a finished run started again: its last checkpoint is already final
    follower = spec.follower
    sync_points, probe, sync, sent = set(), None, None, None
    if follower is not None:
        sync_points, probe, sync = ray.get([follower.sync_points.remote(), follower.probe.remote(),
                                            follower.sync_spec.remote()])
        sync_points = set(sync_points)
        # Always at the start: step 0 verifies the engines (and is the initial policy's
        # eval); a resumed run must bring the engines to the checkpoint's weights.
        sent = sync_policy(worker, follower, step, probe, send_weights=step > 0, sync=sync)
    # Between syncs each step asks the follower whether it needs weights (FollowerLink).
    link = FollowerLink(follower, probe, sync, sent) if follower is not None else None
    eval_every = spec.eval_every or 0
    every = policy.checkpoint_every_steps
    sigterm_saved = False
    while step < worker.total_steps:
        metrics = {**run_step(worker, step, link=link), **tags}
        # A rank got SIGTERM (its pod is being evicted): checkpoint now, then it exits.
        sigterm = metrics.pop("sigterm", False) and not sigterm_saved
        sigterm_saved = sigterm_saved or sigterm
        step += 1
        last = step == worker.total_steps
        if last or (eval_every and step % eval_every == 0):
            metrics.update(evaluate(worker))
        if step in sync_points:
            link.last = sync_policy(worker, follower, step, probe, send_weights=True, sync=sync)
        if last or (every and step % every == 0) or sigterm:
            model = spec.model if last and policy.save_hf_model else None
            export = (lambda root: export_final(worker, model, root)) if model is not None else None
            save_checkpoint(worker, step, metrics, run_dir=spec.run_dir, export=export)
            if sigterm:
                # Every rank: Ray Train registers the checkpoint only once it has every
                # rank's report, so the signalled rank leaves after all were taken.
                faults.wait_reports_consumed(policy.sigterm_grace_s)
                dist.barrier()
                faults.sigterm_done()
        else:
            ray.train.report(metrics)


def _make_worker(spec: TrainLoopSpec, *, universal: bool = False) -> RankState:
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    policy, feeder = spec.policy, spec.feeder
    device = _pick_device(spec.device)
    total_steps = ray.get(feeder.total_steps.remote())
    steps_per_epoch = ray.get(feeder.steps_per_epoch.remote())  # a StepSource's (ray_dpo/seams.py)
    if policy.max_steps:
        total_steps = min(total_steps, policy.max_steps)
    torch.manual_seed(spec.seed)  # LoRA's A matrices: the same on every rank and in every run
    engine, hf_ds_config = setup_engine(spec.model, policy, device=device, world_size=world_size,
                                        total_steps=total_steps, universal=universal)
    return RankState(engine=engine, feeder=feeder, loss=spec.loss, policy=policy, rank=rank, world_size=world_size,
                  accumulation=engine.gradient_accumulation_steps(),
                  device=device, pad_token_id=model_pad_token_id(engine.module.config),
                  total_steps=total_steps, steps_per_epoch=steps_per_epoch, hf_ds_config=hf_ds_config,
                  attn_implementation=compat.attn_implementation(engine.module.config),
                  num_params=_num_params(engine), peak_flops=_peak_flops(device),
                  adapters_off_reference=policy.lora.enabled and policy.lora.reference == "adapters_off",
                  phase_sync=_phase_sync(device))


def _phase_sync(device: torch.device):
    """torch.cuda.synchronize when RAY_DPO_PROFILE_SYNC=1 on a GPU (exact phases, at the cost
    of the overlap between them); None otherwise. GPU path: not testable on CPU CI."""
    if device.type == "cuda" and os.environ.get("RAY_DPO_PROFILE_SYNC") == "1":
        return torch.cuda.synchronize
    return None


def _pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        import ray.train.torch

        # Ray Train assigns this worker's GPU; TorchTrainer already set up NCCL on it.
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _peak_flops(device: torch.device) -> Optional[float]:
    """Peak dense bf16 FLOP/s of this rank's GPU from _PEAK_BF16_FLOPS; None on CPU or for an
    unknown GPU (perf/mfu is then not logged). GPU path: not testable on CPU CI."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16_FLOPS if key in name), None)


def _num_params(engine) -> int:
    """Whole-model parameter count (ZeRO-3 partitions hold only a slice: ds_numel is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def model_pad_token_id(config) -> int:
    """The id padding positions get (masked out of attention and loss, so any valid id works)."""
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------- engine


def setup_engine(model_cfg, policy, *, device: torch.device, world_size: int, total_steps: int,
                 universal: bool = False):
    """(DeepSpeedEngine, HfDeepSpeedConfig or None) for this rank.

    TorchTrainer has already created the process group (gloo on CPU, NCCL on GPU);
    deepspeed.comm only wraps it (dist_init_required=False). universal: the engine will load
    a universal checkpoint (checkpoints.load_checkpoint with reshard).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    compat.skip_shm_comm_build()  # an inference-only op whose compile took 32 s of the start
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    ds_config = build_ds_config(policy, dtype=model_cfg.dtype, world_size=world_size, universal=universal)
    # Under ZeRO-3, from_pretrained must see the DeepSpeed config so that every rank loads
    # only its partition of the weights (deepspeed.zero.Init) instead of a full copy.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if policy.zero_stage == 3 else None
    extra = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch_dtype(model_cfg.dtype),
                                                 trust_remote_code=model_cfg.trust_remote_code, **extra)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _disable_dropout(model)  # before the adapters: policy.lora.dropout is the adapters' own
    if policy.lora.enabled:
        model = lora.wrap(model, policy.lora)  # base weights frozen, adapters trainable
    model.train()
    # Only what trains is handed to the optimizer (with LoRA: the adapters, a few MB of state).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=policy.learning_rate,
                                  betas=tuple(policy.adam_betas), weight_decay=policy.weight_decay)
    schedule = {"warmup_steps": policy.warmup_steps, "total_steps": total_steps,
                "schedule": policy.lr_scheduler}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False,
        # A callable: DeepSpeed builds the scheduler on the optimizer as it configured it,
        # steps it in engine.step() at each boundary and saves it in checkpoints.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, **schedule)),
    )
    if world_size == 1 and policy.zero_stage == 0:
        # One rank has nothing to average (benchmarks/floor.py: the flatten, all-reduce over a
        # group of one and copy back cost a large share of the backward on the sentiment example).
        compat.skip_backward_allreduce(engine)
    return engine, hf_ds_config


def _disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares the policy with a reference scored without dropout; dropout in the policy
    would make step-0 logits differ from the reference's (loss != ln 2) and add noise to the
    implicit rewards. TRL disables it for the same reason."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # HF attention layers apply this functionally


# --------------------------------------------------------------------------- forward / loss


def pair_terms(worker: RankState, pairs: list[dict], clock: Optional[PhaseClock] = None):
    """One chosen+rejected forward over `pairs` in worker.policy.layout: (LossOutput, TokenCounts(real
    tokens, computed positions)). Unpaired rows (KTO) are the labelled completion as "chosen"
    and the mismatched completion as "rejected"; a reference-free loss reads no ref_* column.
    clock: charged "build" for the batch's tensors, "forward" for the forward and the loss."""
    # packed / prefix_shared: by default ONE row per forward, so every computed position is a
    # real token; flash varlen (GPU) skips cross-sequence blocks. sdpa/eager compute the dense
    # T x T scores of a row: max_tokens_per_row (or the token budget, which bounds T) caps it.
    batch = build_batch(pairs, layout=worker.policy.layout, pad_token_id=worker.pad_token_id,
                        max_tokens_per_row=worker.policy.max_tokens_per_row).to(worker.device)
    dtype = next(worker.engine.module.parameters()).dtype
    inputs = model_inputs(batch, attn_implementation=worker.attn_implementation, dtype=dtype)
    if clock is not None:
        clock.lap("build")
    ref = (None, None)
    if worker.loss_spec.needs_reference and worker.adapters_off_reference:
        ref = lora.adapters_off_logps(worker.engine, inputs, batch)
    elif worker.loss_spec.needs_reference:
        both = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in pairs],
                            dtype=torch.float32, device=worker.device)
        ref = (both[:, 0], both[:, 1])
    logits = worker.engine(**inputs).logits
    chosen, rejected, chosen_n, rejected_n = pair_logps(logits, batch)
    labels, kl = None, None
    if worker.loss_spec.data == "unpaired":
        labels = torch.tensor([bool(p.get("label", True)) for p in pairs], device=worker.device)
        real = torch.tensor([p["pair_id"] != _DUMMY_ID for p in pairs], device=worker.device)
        kl = global_kl((rejected.detach() - ref[1])[real], device=worker.device)
    out = dpo_loss(
        policy_chosen_logps=chosen, policy_rejected_logps=rejected,
        ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], config=worker.loss,
        chosen_n_tokens=chosen_n, rejected_n_tokens=rejected_n,
        policy_chosen_nll=mean_nll(chosen, chosen_n) if worker.loss.sft_weight > 0 else None,
        labels=labels, kl=kl,
    )
    if clock is not None:
        clock.lap("forward")
    return out, batch_stats(batch)


_DUMMY_ID = "<dummy>"


def _dummy_pair(pad_token_id: int) -> dict:
    """Stand-in for an empty micro-batch: every rank must run the same number of forward and
    backward passes, because ZeRO gathers parameters and reduces gradients collectively."""
    return {"pair_id": _DUMMY_ID, "prompt_ids": [pad_token_id], "chosen_ids": [pad_token_id],
            "rejected_ids": [pad_token_id], "ref_chosen_logp": 0.0, "ref_rejected_logp": 0.0, "label": True}


# --------------------------------------------------------------------------- train / eval


def run_step(worker: RankState, step: int, *, link: Optional["FollowerLink"] = None) -> dict[str, Any]:
    """Train feeder step `step` (0-based); returns the metrics every rank reports. link: the
    run's follower, asked before this step's data is awaited, and while it is, whether it
    needs weights (_await_step).

    perf/<phase>_s (step_metrics.PHASES, summed over the step's forwards, mean over ranks)
    split perf/step_time_s; perf/report_s is the time from the previous run_step's return to
    this one's start: Ray Train's report, plus any eval, sync or checkpoint of that step."""
    clock = PhaseClock(sync=worker.phase_sync)
    report_s = clock.start - worker.last_step_end if worker.last_step_end is not None else None
    feeder = worker.feeder
    refs = [feeder.get_step.remote(step, worker.rank, worker.world_size), feeder.num_pairs_in_step.remote(step)]
    if link is None:
        micro_batches, n_global = ray.get(refs)
    else:
        micro_batches, n_global = _await_step(worker, refs, link, step)
    clock.lap("fetch")
    grad_accum = worker.accumulation
    if len(micro_batches) != grad_accum:
        raise RuntimeError(f"feeder step {step}: {len(micro_batches)} micro-batches for rank {worker.rank} of "
                           f"{worker.world_size}, expected {grad_accum} (DeepSpeed's gradient_accumulation_steps)")
    epoch = (step + 1) / worker.steps_per_epoch if worker.steps_per_epoch else math.nan
    if n_global == 0:
        # An online round that kept fewer pairs than it has steps: nothing to learn from,
        # so no forward and no update (zero gradients would still move AdamW's weights).
        worker.last_step_end = time.perf_counter()
        return {"step": step + 1, "epoch": epoch, "pair_ids": []}
    # DeepSpeed divides the loss by grad_accum and averages gradients over ranks; undo both so
    # the update is the mean over ALL pairs of the step, however unevenly they are spread.
    scale = worker.world_size * grad_accum / max(n_global, 1)
    sums, pair_ids = torch.zeros(len(sum_names(worker.loss_spec)), dtype=torch.float64), []
    lr = worker.engine.get_lr()[0]  # the rate this step uses (the scheduler steps after it)
    budget = worker.policy.max_tokens_per_micro_batch is not None
    forwards = _budget_forwards(worker, micro_batches) if budget else micro_batches
    for i, pairs in enumerate(forwards):
        if budget:
            # Forwards per step vary with the data: the boundary (gradient all-reduce, then
            # the update) is set explicitly, on the last forward only.
            worker.engine.set_gradient_accumulation_boundary(i == len(forwards) - 1)
        out, counts = pair_terms(worker, pairs or [_dummy_pair(worker.pad_token_id)], clock)
        # The loss scale does not depend on the number of forwards: each pair's loss enters
        # once, divided by n_global, whatever forward it sits in.
        worker.engine.backward(out.losses.sum() * (scale if pairs else 0.0))
        clock.lap("backward")
        if pairs:
            sums += metric_sums(worker.loss_spec, out, counts)
            pair_ids += [p["pair_id"] for p in pairs]
        # DeepSpeed counts micro-steps in step(): call it after every backward; only the
        # call at the accumulation boundary updates the weights.
        grad_norm = step_optimizer(worker.engine)
        clock.lap("optimizer")
    sums[SUMS.index("step_time_s")] = clock.elapsed()
    for phase in PHASES:
        sums[SUMS.index(f"{phase}_s")] = clock.seconds[phase]
    sums[SUMS.index("sigterm")] = float(faults.sigterm_received())  # any rank: all checkpoint
    totals = all_reduce_sums(worker.loss_spec, sums, device=worker.device)
    if int(totals["pairs"]) != n_global:
        raise RuntimeError(f"feeder step {step}: ranks trained {int(totals['pairs'])} pairs, but "
                           f"num_pairs_in_step says {n_global}; the loss normalisation would be wrong")
    step_time = totals["step_time_s"] / worker.world_size
    phases = {f"perf/{p}_s": totals[f"{p}_s"] / worker.world_size for p in PHASES}
    if report_s is not None:
        phases["perf/report_s"] = report_s
    worker.last_step_end = time.perf_counter()
    return {**loss_metrics(worker.loss_spec, "train", totals), "train/lr": lr, "train/grad_norm": grad_norm,
            **_perf_metrics(worker, totals, step_time), **phases,
            "step": step + 1, "epoch": epoch, "pair_ids": pair_ids, "sigterm": totals["sigterm"] > 0}


RESEND_POLL_S = 5.0  # a rank waiting for a step's data asks the follower again this often


@dataclasses.dataclass
class FollowerLink:
    """What the ranks need to answer the follower between syncs (weights.answer_follower):
    it, its probe and sync_spec, and rank 0's last sync (None on the other ranks)."""

    follower: Any
    probe: Any
    sync: Optional[dict]
    last: Optional[SentSync]


_NEEDS = (None, RESEND, WEIGHTS)  # follower.needs_sync's answers, as the codes the ranks exchange


def _await_step(worker: RankState, refs: list, link: FollowerLink, step: int) -> list:
    """ray.get(refs), asking the follower whether it needs weights (follower.needs_sync: it
    restarted after the last sync, or an engine restarted between collective syncs) while
    the step's data is on its way (one short call a step), and again every RESEND_POLL_S
    while it is not there (a round the dead process had started). Rank 0 asks and answers;
    under answers_in_lockstep every rank polls with it, agreeing over the training group
    (one small all-reduce a poll) on what to send and whether all have their data."""
    lockstep = answers_in_lockstep(worker, link.sync)
    if worker.rank != 0 and not lockstep:
        return ray.get(refs)
    timeout = 0.0
    while True:
        ready = len(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0]) == len(refs)
        need = ray.get(link.follower.needs_sync.remote()) if worker.rank == 0 else None
        if lockstep:
            flags = torch.tensor([_NEEDS.index(need), int(not ready)], device=worker.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            need, ready = _NEEDS[int(flags[0])], not bool(flags[1])
        if need is not None:
            answer_follower(worker, link.follower, need, link.last, step, link.probe, link.sync)
        if ready:
            return ray.get(refs)
        timeout = RESEND_POLL_S


def _budget_forwards(worker: RankState, micro_batches: list[list[dict]]) -> list[list[dict]]:
    """The rank's step re-cut by token budget: each feeder micro-batch split, in order, into
    forwards of <= policy.max_tokens_per_micro_batch computed positions (batching.budget.token_budget_micro_batches;
    a pair over the budget alone gets its own forward). Every pair stays exactly once and the
    split is a pure function of the feeder's deterministic step, so resume is unchanged.

    Ranks must run the same number of forward/backward passes (ZeRO collectives), so the
    list is padded with empty forwards (dummy pair, zero loss) up to the busiest rank's count.
    """
    forwards = [chunk for pairs in micro_batches if pairs
                for chunk in token_budget_micro_batches(pairs, max_tokens=worker.policy.max_tokens_per_micro_batch,
                                                        layout=worker.policy.layout).micro_batches]
    count = torch.tensor([max(len(forwards), 1)], device=worker.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return forwards + [[] for _ in range(int(count.item()) - len(forwards))]


def _perf_metrics(worker: RankState, totals: dict[str, float], step_time: float) -> dict[str, float]:
    """perf/tokens_per_s (real tokens), perf/padding_fraction (1 - real / computed positions,
    over all ranks), perf/peak_rss_gb (the reporting rank's peak resident memory) and, when the device's peak is known (GPU), perf/mfu: 6 * params FLOPs per
    computed position (forward + backward, attention's T^2 term ignored) over the peak of all
    ranks. The padding fraction is positions the model computed but DPO did not need."""
    out = {"perf/tokens_per_s": totals["tokens"] / step_time, "perf/step_time_s": step_time,
           "perf/num_workers": float(worker.world_size),  # fewer than policy.num_workers: an elastic group that shrank
           "perf/padding_fraction": 1.0 - totals["tokens"] / max(totals["positions"], 1.0),
           # this rank's process so far (Linux reports KiB): what a LoRA run saves, what a layout costs
           "perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if worker.peak_flops:  # GPU path: not testable on CPU CI
        flops = 6.0 * worker.num_params * totals["positions"]
        out["perf/mfu"] = flops / (step_time * worker.world_size * worker.peak_flops)
    return out


def step_optimizer(engine) -> float:
    """engine.step(); at the accumulation boundary returns the global gradient norm (before
    clipping), else NaN."""
    if not engine.is_gradient_accumulation_boundary():
        engine.step()
        return math.nan
    norm = None
    if not compat.keeps_grad_norm(engine.optimizer):
        # Plain fp32 without ZeRO: DeepSpeed clips but does not keep the norm. Gradients are
        # already all-reduced here (the boundary backward did it), so the norm is global.
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(grads)).item() if grads else 0.0
    engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan


@torch.no_grad()
def evaluate(worker: RankState) -> dict[str, float]:
    """eval/... metrics over every rank's eval micro-batches; {} if there is no eval data."""
    batches = ray.get(worker.feeder.get_eval.remote(worker.rank, worker.world_size))
    # Ranks may hold different numbers of eval batches; under ZeRO-3 each forward gathers
    # parameters collectively, so all ranks run as many forwards as the busiest one.
    count = torch.tensor([len(batches)], device=worker.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    if count.item() == 0:
        return {}
    sums = torch.zeros(len(sum_names(worker.loss_spec)), dtype=torch.float64)
    for i in range(int(count.item())):
        pairs = batches[i] if i < len(batches) else []
        out, counts = pair_terms(worker, pairs or [_dummy_pair(worker.pad_token_id)])
        if pairs:
            sums += metric_sums(worker.loss_spec, out, counts)
    return loss_metrics(worker.loss_spec, "eval", all_reduce_sums(worker.loss_spec, sums, device=worker.device))
