"""Step metrics of the policy workers: per-rank sums, one all_reduce, the reported means.

Every loss reports the same names (train/loss, train/rewards/{chosen,rejected,margins,
accuracies}, train/logps/{chosen,rejected}; eval/... likewise), so runs of different losses
compare side by side, plus the loss's own LossSpec.metrics (train/kto/kl, train/orpo/...).
Chosen / rejected means are taken over LossOutput's masks: all rows for pair losses, the
desirable / undesirable examples for KTO.

Torch and torch.distributed only (the process group is the one Ray Train set up).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ray_dpo.losses import LossOutput, LossSpec

# The phases of a training step (PhaseClock), in order; each is a sum over the step's
# micro-batches, logged as perf/<phase>_s. Together they cover step_time_s except the
# metric bookkeeping between them.
PHASES = ("fetch", "build", "forward", "backward", "optimizer")
# Set by the worker's run_step, not by metric_sums.
_WORKER_SET = ("step_time_s", "sigterm", *(f"{p}_s" for p in PHASES))
# Order of the per-rank sums that one all_reduce turns into step metrics; the loss's own
# metrics (LossSpec.metrics) follow them.
SUMS = ("loss", "chosen_rewards", "rejected_rewards", "n_chosen", "n_rejected", "accuracies",
        "logps_chosen", "logps_rejected", "pairs", "tokens", "positions", *_WORKER_SET)


class PhaseClock:
    """Wall seconds per step phase from time.perf_counter laps: lap(phase) charges the time
    since the previous lap (or the clock's start) to ``phase``. Costs ~1 us a lap, so it
    stays on in every step. sync: called before each reading (torch.cuda.synchronize, so
    GPU kernels count in the phase that launched them); None on CPU, where ops are
    synchronous, and by default on GPU (phases then show launch time, the step total is
    still right)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.start = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def sum_names(spec: LossSpec) -> tuple[str, ...]:
    return SUMS + spec.metrics


def metric_sums(spec: LossSpec, out: LossOutput, counts) -> torch.Tensor:
    """One micro-batch's contribution to the metric sums, in sum_names order; counts:
    batching.padded.TokenCounts (real tokens, computed positions)."""
    cm, rm = out.chosen_mask.float(), out.rejected_mask.float()
    values = [out.losses.detach().float().sum(), (out.chosen_rewards.float() * cm).sum(),
              (out.rejected_rewards.float() * rm).sum(), cm.sum(), rm.sum(), out.correct.float().sum(),
              (out.chosen_logps.float() * cm).sum(), (out.rejected_logps.float() * rm).sum(),
              float(len(cm)), float(counts.real_tokens), float(counts.padded_positions),
              *[0.0] * len(_WORKER_SET)]
    values += [out.extras[name].float().sum() for name in spec.metrics]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values])


def all_reduce_sums(spec: LossSpec, sums: torch.Tensor, *, device: torch.device) -> dict[str, float]:
    """One all_reduce of the whole metric vector, so every rank reports the same numbers."""
    totals = sums.to(device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return dict(zip(sum_names(spec), totals.cpu().tolist()))


def loss_metrics(spec: LossSpec, prefix: str, totals: dict[str, float]) -> dict[str, float]:
    """<prefix>/... means from the all-reduced sums."""
    n = max(totals["pairs"], 1.0)
    n_c, n_r = max(totals["n_chosen"], 1.0), max(totals["n_rejected"], 1.0)
    chosen, rejected = totals["chosen_rewards"] / n_c, totals["rejected_rewards"] / n_r
    return {
        f"{prefix}/loss": totals["loss"] / n,
        f"{prefix}/rewards/chosen": chosen,
        f"{prefix}/rewards/rejected": rejected,
        f"{prefix}/rewards/margins": chosen - rejected,
        f"{prefix}/rewards/accuracies": totals["accuracies"] / n,
        f"{prefix}/logps/chosen": totals["logps_chosen"] / n_c,
        f"{prefix}/logps/rejected": totals["logps_rejected"] / n_r,
        **{f"{prefix}/{name}": totals[name] / n for name in spec.metrics},
    }


def global_kl(kl_logratios: torch.Tensor, *, device: torch.device) -> torch.Tensor:
    """KTO's z_ref over one forward's mismatched pairs on ALL ranks (TRL gathers it too):
    max(0, mean log-ratio), no gradient. Every rank runs the same number of forwards (an
    empty micro-batch runs a dummy row, excluded here), so this all_reduce is always matched."""
    totals = torch.stack([kl_logratios.detach().double().sum(),
                          torch.tensor(float(kl_logratios.numel()), dtype=torch.float64, device=kl_logratios.device)])
    totals = totals.to(device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    total, count = totals.tolist()
    return torch.tensor(max(total / count, 0.0) if count else 0.0, device=device)
