"""DPO loss variants as pure functions of the DPO "logits" term, kept in a registry.

Every variant sees only, per pair,

    h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))      [B]

and returns per-pair losses [B]; the caller takes the mean. Everything else a config can
switch on (length normalisation, the SFT/NLL term, implicit rewards) is shared and lives in
`dpo_loss`. Pure torch: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # config.py imports this module to validate loss names; avoid the cycle
    from ray_dpo.config import LossConfig


class LossFn(Protocol):
    def __call__(self, h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor: ...


_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: register `fn(h [B], *, beta, label_smoothing) -> losses [B]` under `name`."""

    def decorator(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {_LOSSES[name].__qualname__})")
        _LOSSES[name] = fn
        return fn

    return decorator


def loss_names() -> list[str]:
    """Sorted names of all registered losses (what `loss.type` may be set to)."""
    return sorted(_LOSSES)


def get_loss(name: str) -> LossFn:
    """The registered loss `name`; ValueError listing the valid names if there is none."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss type {name!r}; valid names: {', '.join(loss_names())}") from None


# ---------------------------------------------------------------------------------------
# Variants. h: [B] float; returns [B]. F.logsigmoid is used rather than log(sigmoid(.))
# because it stays finite for large |βh|.


@register_loss("sigmoid")
def sigmoid_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290) eq. 7: −log σ(βh).

    With label_smoothing ε > 0 this is conservative DPO (cDPO; Mitchell 2023), the
    expected loss when each preference label is flipped with probability ε (Mitchell,
    "A note on DPO with noisy preferences", eq. 3; TRL's "sigmoid" with label_smoothing):
        −(1−ε) log σ(βh) − ε log σ(−βh).
    Equals ln 2 at h = 0 for every ε.
    """
    logits = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_loss("robust")
def robust_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409,
    the de-biased loss of Sec. 3 (same form as TRL's "robust"):
        (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε),
    an unbiased estimate of the clean-label loss when labels flip with rate ε < 1/2.
    Equals ln 2 at h = 0 for every ε.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * h
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    return losses / (1.0 - 2.0 * label_smoothing)


@register_loss("hinge")
def hinge_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC hinge loss: the rank-calibration loss of SLiC-HF (Zhao et al. 2023,
    arXiv:2305.10425) with margin δ = 1, applied to the β-scaled log-ratio term as TRL's
    "hinge" does: relu(1 − βh).
    Equals 1 at h = 0. label_smoothing is ignored.
    """
    del label_smoothing
    return torch.relu(1.0 - beta * h)


@register_loss("ipo")
def ipo_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO, Azar et al. 2023 (arXiv:2310.12036) eq. 17: (h − 1/(2β))², with β as the
    paper's τ.
    Equals 1/(2β)² at h = 0. label_smoothing is ignored.

    TRL forms h for IPO from *length-normalised* (per-token mean) log-probs; here that is
    the `length_normalize` config flag (set it with type=ipo to match TRL), not something
    this function does.
    """
    del label_smoothing
    return (h - 1.0 / (2.0 * beta)) ** 2


# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossOutput:
    """Per-pair results of `dpo_loss`; all [B].

    losses: carries the gradient; the training loss is `losses.mean()`.
    chosen_rewards / rejected_rewards: implicit rewards β·(log π_θ − log π_ref), detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    config: LossConfig,
    chosen_n_tokens: torch.Tensor | None = None,
    rejected_n_tokens: torch.Tensor | None = None,
    policy_chosen_nll: torch.Tensor | None = None,
) -> LossOutput:
    """Per-pair DPO losses and implicit rewards.

    All tensors are [B]: summed response-token log-probs (nats) per sequence, response
    token counts, and `policy_chosen_nll` = per-token mean NLL of the chosen response
    (see `logprobs.mean_nll`), which must carry the policy's gradient. Reference log-probs
    are moved to the policy log-probs' device and dtype (they typically arrive from the
    data pipeline on CPU).

    `config` is a LossConfig (duck-typed): `type` (a registered loss name), `beta`,
    `label_smoothing`, `sft_weight` (adds sft_weight · policy_chosen_nll to each pair's
    loss), `length_normalize` (divide all four log-probs by their response token counts
    before forming h; rewards then use the normalised log-probs too).
    """
    loss_fn = get_loss(config.type)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = ref_chosen_logps.to(pc), ref_rejected_logps.to(pc)
    shapes = {t.shape for t in (pc, pr, rc, rr)}
    if len(shapes) != 1 or pc.dim() != 1:
        # [B] vs [B, 1] would broadcast silently into a [B, B] loss.
        raise ValueError(f"log-prob tensors must all be 1-D of the same shape [B], got {shapes}")

    if config.length_normalize:
        if chosen_n_tokens is None or rejected_n_tokens is None:
            raise ValueError("loss.length_normalize=true needs chosen_n_tokens and rejected_n_tokens")
        # clamp: an empty response has logp 0, so it stays 0 rather than becoming NaN.
        n_c = chosen_n_tokens.to(pc).clamp(min=1)
        n_r = rejected_n_tokens.to(pc).clamp(min=1)
        pc, rc, pr, rr = pc / n_c, rc / n_c, pr / n_r, rr / n_r

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    losses = loss_fn(
        chosen_logratios - rejected_logratios, beta=config.beta, label_smoothing=config.label_smoothing
    )

    if config.sft_weight > 0:
        if policy_chosen_nll is None:
            raise ValueError("loss.sft_weight > 0 needs policy_chosen_nll (per-token mean NLL of chosen)")
        losses = losses + config.sft_weight * policy_chosen_nll.to(losses)

    return LossOutput(
        losses=losses,
        chosen_rewards=(config.beta * chosen_logratios).detach(),
        rejected_rewards=(config.beta * rejected_logratios).detach(),
    )
