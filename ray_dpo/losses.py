"""Preference losses as pure functions, kept in a registry whose entries carry their facts.

The DPO family proper (sigmoid, robust, hinge, ipo) sees only, per pair,

    h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))      [B]

and returns per-pair losses [B]. SimPO and ORPO need no reference (length-normalised policy
log-probs only); KTO trains on unpaired, labelled completions. Each registry entry
(`LossSpec`) says whether the loss needs a reference, whether it trains on pairs or on
unpaired examples, which `loss.*` config keys it reads and which extra metrics it logs, so
the config checks, the driver (no reference group for a reference-free loss), the data
pipeline and the worker ask the registry instead of testing names.

`dpo_loss` is the one entry point the worker calls; the caller takes `losses.mean()`.
Pure torch: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Protocol

import torch
import torch.nn.functional as F

from ray_dpo.registry import Registry

if TYPE_CHECKING:  # for annotations only: ray_dpo.config imports this module while checking a config
    from ray_dpo.config import LossConfig


class LossFn(Protocol):
    def __call__(self, h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor: ...


Data = Literal["pairs", "unpaired"]

# loss.* keys a loss may or may not read, with the value meaning "not set".
OPTIONAL_KEYS: dict[str, Any] = {"label_smoothing": 0.0, "sft_weight": 0.0, "length_normalize": False,
                                 "gamma": None, "desirable_weight": None, "undesirable_weight": None}
SIMPO_DEFAULT_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma
_H_KEYS = ("sft_weight", "length_normalize")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registered loss and its facts.

    fn: for kind "h", `fn(h [B], *, beta, label_smoothing) -> losses [B]`; for kind "terms",
        `fn(terms: LossTerms, config) -> LossOutput`.
    needs_reference: False for SimPO / ORPO: no reference actor is started, nothing is scored.
    data: "pairs" (prompt, chosen, rejected) or "unpaired" (prompt, completion, label).
    reads: the OPTIONAL_KEYS of `loss.*` this loss uses (setting another one is a config error).
    metrics: extra per-example metrics (LossOutput.extras keys), logged as <split>/<name>;
        named <loss>/<metric> (e.g. kto/kl), so none collides with a shared metric such as
        the held-out eval/kl.
    """

    name: str
    fn: Callable
    kind: Literal["h", "terms"] = "h"
    needs_reference: bool = True
    data: Data = "pairs"
    reads: tuple[str, ...] = ("label_smoothing",) + _H_KEYS
    metrics: tuple[str, ...] = ()


LOSSES: Registry[LossSpec] = Registry("loss type", plural="names")
"""Every loss `loss.type` may name; config validation and the worker look losses up here."""


def register_loss(name: str, *, kind: Literal["h", "terms"] = "h", needs_reference: bool = True,
                  data: Data = "pairs", reads: Optional[tuple[str, ...]] = None,
                  metrics: tuple[str, ...] = ()) -> Callable:
    """Decorator: register `fn` under `name` with its facts (see LossSpec); by default an "h"
    loss `fn(h [B], *, beta, label_smoothing) -> losses [B]` that needs a reference."""

    def decorator(fn: Callable) -> Callable:
        keys = reads if reads is not None else LossSpec.reads
        LOSSES.add(name, LossSpec(name=name, fn=fn, kind=kind, needs_reference=needs_reference, data=data,
                                  reads=tuple(keys), metrics=tuple(metrics)))
        return fn

    return decorator


def loss_names() -> list[str]:
    """Sorted names of all registered losses (what `loss.type` may be set to)."""
    return LOSSES.names()


def loss_spec(name: str) -> LossSpec:
    """The registry entry of `name`; ValueError listing the valid names if there is none."""
    return LOSSES.get(name)


def get_loss(name: str) -> Callable:
    """The registered function of loss `name` (LossSpec.fn)."""
    return loss_spec(name).fn


# ---------------------------------------------------------------------------------------
# The DPO family: h [B] -> losses [B]. F.logsigmoid is used rather than log(sigmoid(.))
# because it stays finite for large |βh|.


@register_loss("sigmoid")
def sigmoid_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290) eq. 7: −log σ(βh).

    With label_smoothing ε > 0 this is conservative DPO (cDPO; Mitchell 2023, "A note on DPO
    with noisy preferences", eq. 3), the expected loss when each preference label is flipped
    with probability ε:
        −(1−ε) log σ(βh) − ε log σ(−βh).
    TRL 1.16's "sigmoid" ignores label_smoothing (only its robust / exo / aot losses read
    it), so a comparison with TRL at ε > 0 is not like for like.
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
    Not cDPO: cDPO is "sigmoid" with label_smoothing. Equals ln 2 at h = 0 for every ε.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * h
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    return losses / (1.0 - 2.0 * label_smoothing)


@register_loss("hinge", reads=_H_KEYS)
def hinge_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC hinge loss: the rank-calibration loss of SLiC-HF (Zhao et al. 2023,
    arXiv:2305.10425) with margin δ = 1, applied to the β-scaled log-ratio term as TRL's
    "hinge" does: relu(1 − βh).
    Equals 1 at h = 0. label_smoothing is ignored.
    """
    del label_smoothing
    return torch.relu(1.0 - beta * h)


@register_loss("ipo", reads=_H_KEYS)
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
# What a loss sees, and what it gives back.


@dataclasses.dataclass(frozen=True)
class LossTerms:
    """Per-row inputs, all [B]. Pair losses: chosen / rejected responses of one prompt.
    Unpaired losses (KTO): "chosen" is the labelled completion y of prompt x and "rejected"
    the mismatched completion y' scored under the same x (the KL sample; see kto_loss).

    ref_*: None for a reference-free loss. *_n_tokens: response token counts.
    policy_chosen_nll: per-token mean NLL of chosen (carries the gradient), for sft_weight.
    labels: bool, True = desirable (unpaired losses only).
    kl: a precomputed z_ref (scalar tensor, detached) for KTO, e.g. averaged over ranks;
        None: estimated from this batch's mismatched pairs.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_n_tokens: Optional[torch.Tensor] = None
    rejected_n_tokens: Optional[torch.Tensor] = None
    policy_chosen_nll: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None

    def mean_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean policy log-probs (chosen, rejected); an empty response stays 0."""
        if self.chosen_n_tokens is None or self.rejected_n_tokens is None:
            raise ValueError("length-normalised log-probs need chosen_n_tokens and rejected_n_tokens")
        pc, pr = self.policy_chosen_logps, self.policy_rejected_logps
        return pc / self.chosen_n_tokens.to(pc).clamp(min=1), pr / self.rejected_n_tokens.to(pr).clamp(min=1)


@dataclasses.dataclass(frozen=True)
class LossOutput:
    """Per-row results of `dpo_loss`; all [B], everything but `losses` detached.

    losses: carries the gradient; the training loss is `losses.mean()`.
    chosen_rewards / rejected_rewards: the loss's reward of each response: β·(log π_θ − log
        π_ref) for DPO and KTO, β·(mean token log-prob) for SimPO and ORPO.
    correct: 1.0 where the row is ranked right (pairs: chosen reward > rejected reward; KTO:
        the completion's log-ratio is on its label's side of z_ref).
    chosen_logps / rejected_logps: summed policy log-probs of the responses.
    chosen_mask / rejected_mask: which rows count towards the chosen / rejected means (all
        rows for pairs; desirable / undesirable examples for KTO).
    extras: LossSpec.metrics values per row, averaged into <split>/<name> metrics.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    correct: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


# A pair is ranked right when its reward margin is above the float noise of the log-probs it
# was computed from (relative to their size): at step 1 policy and reference are the same
# model, and margins of ~1e-7 from kernel differences are ties, not half the pairs right.
TIE_RTOL = 1e-6


def _pair_output(losses, terms: LossTerms, chosen_rewards, rejected_rewards, extras=None, *,
                 scale: torch.Tensor | float = 0.0) -> LossOutput:
    """scale: the size of the values the rewards were computed from, in reward units (a
    margin within TIE_RTOL of it is a tie, which counts as not ranked right)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    every = torch.ones_like(c, dtype=torch.bool)
    tie = TIE_RTOL * (scale.detach() if torch.is_tensor(scale) else torch.as_tensor(scale))
    return LossOutput(losses=losses, chosen_rewards=c, rejected_rewards=r, correct=(c - r > tie).float(),
                      chosen_logps=terms.policy_chosen_logps.detach(),
                      rejected_logps=terms.policy_rejected_logps.detach(),
                      chosen_mask=every, rejected_mask=every,
                      extras={k: v.detach() for k, v in (extras or {}).items()})


def _with_sft(losses: torch.Tensor, terms: LossTerms, config: Any) -> torch.Tensor:
    if not config.sft_weight:
        return losses
    if terms.policy_chosen_nll is None:
        raise ValueError("loss.sft_weight > 0 needs policy_chosen_nll (per-token mean NLL of chosen)")
    return losses + config.sft_weight * terms.policy_chosen_nll.to(losses)


def _h_terms(fn: LossFn, terms: LossTerms, config: Any) -> LossOutput:
    """A DPO-family loss: h from the four log-probs (optionally length-normalised), the
    optional SFT term, implicit rewards β·log-ratio."""
    pc, pr, rc, rr = (terms.policy_chosen_logps, terms.policy_rejected_logps,
                      terms.ref_chosen_logps, terms.ref_rejected_logps)
    if config.length_normalize:
        if terms.chosen_n_tokens is None or terms.rejected_n_tokens is None:
            raise ValueError("loss.length_normalize=true needs chosen_n_tokens and rejected_n_tokens")
        # clamp: an empty response has logp 0, so it stays 0 rather than becoming NaN.
        n_c = terms.chosen_n_tokens.to(pc).clamp(min=1)
        n_r = terms.rejected_n_tokens.to(pc).clamp(min=1)
        pc, rc, pr, rr = pc / n_c, rc / n_c, pr / n_r, rr / n_r
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    losses = fn(chosen_logratios - rejected_logratios, beta=config.beta, label_smoothing=config.label_smoothing)
    return _pair_output(_with_sft(losses, terms, config), terms,
                        config.beta * chosen_logratios, config.beta * rejected_logratios,
                        scale=config.beta * (pc.abs() + rc.abs() + pr.abs() + rr.abs()))


# ---------------------------------------------------------------------------------------
# SimPO and ORPO: no reference model. KTO: unpaired examples.


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, beta: float,
               gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", arXiv:2405.14734, eq. 6:

        L = −log σ( β/|y_w| log π_θ(y_w|x) − β/|y_l| log π_θ(y_l|x) − γ )

    inputs are the per-token mean log-probs (1/|y| log π_θ(y|x)); γ is the absolute target
    reward margin (TRL's `simpo_gamma`; the paper tunes the ratio γ/β, so γ = ratio · β).
    label_smoothing ε mixes in −ε log σ(−z) as cDPO does (TRL's CPO trainer does the same).
    Equals ln(1 + e^γ) when both mean log-probs are equal and ε = 0.
    """
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate on both sides of −ln 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# A mean log-prob of exactly 0 (probability 1) has infinite odds; ORPO clamps below it.
_ORPO_MAX_MEAN_LOGP = -1e-6


def orpo_log_odds(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """log odds_θ(y_w|x) − log odds_θ(y_l|x), with odds(y|x) = P/(1 − P) and P the
    length-normalised probability exp(1/|y| log π_θ(y|x)) (ORPO eqs. 4-5):
    log odds = m − log(1 − e^m) for mean log-prob m."""
    mc = chosen_mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    mr = rejected_mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    return (mc - log1mexp(mc)) - (mr - log1mexp(mr))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, lam: float) -> torch.Tensor:
    """ORPO, Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", arXiv:2403.07691, eq. 6 with eq. 7:

        L = L_SFT + λ · L_OR,   L_SFT = −1/|y_w| log π_θ(y_w|x),
        L_OR = −log σ( log odds_θ(y_w|x) − log odds_θ(y_l|x) )

    per pair (L_SFT is the chosen response's per-token mean NLL; TRL's ORPOTrainer averages
    it over all chosen tokens of the batch instead). λ is `loss.beta`, as in TRL.
    Equals −m + λ ln 2 when both mean log-probs equal m.
    """
    log_odds = orpo_log_odds(chosen_mean_logps, rejected_mean_logps)
    return -chosen_mean_logps - lam * F.logsigmoid(log_odds)


def kto_loss(logratios: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", arXiv:2402.01306, eq. 8:

        r_θ(x, y) = log π_θ(y|x) − log π_ref(y|x)
        z_ref     = KL(π_θ(y'|x) ‖ π_ref(y'|x))  (estimated by `kto_kl`, no gradient)
        v(x, y)   = λ_D σ(β(r_θ(x, y) − z_ref))  if y is desirable
                    λ_U σ(β(z_ref − r_θ(x, y)))  if y is undesirable
        L_KTO     = E[λ_y − v(x, y)]

    per example: λ_y (1 − σ(±β(r_θ − z_ref))). labels: bool [B], True = desirable. The paper
    advises λ_D n_D / (λ_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples.
    Equals λ_y / 2 when policy == reference and z_ref = 0.
    """
    kl = kl.to(logratios)
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels.to(torch.bool), desirable, undesirable)


def kto_kl(kl_logratios: torch.Tensor) -> torch.Tensor:
    """z_ref from the batch's mismatched pairs (x, y'): max(0, mean of log π_θ(y'|x) −
    log π_ref(y'|x)), detached (the paper's and TRL's estimate; no gradient flows through it)."""
    if kl_logratios.numel() == 0:
        return kl_logratios.new_zeros(())
    return kl_logratios.detach().mean().clamp(min=0.0)


@register_loss("simpo", kind="terms", needs_reference=False, reads=("gamma", "label_smoothing", "sft_weight"))
def _simpo_terms(terms: LossTerms, config: Any) -> LossOutput:
    mc, mr = terms.mean_logps()
    gamma = SIMPO_DEFAULT_GAMMA if config.gamma is None else config.gamma
    losses = simpo_loss(mc, mr, beta=config.beta, gamma=gamma, label_smoothing=config.label_smoothing)
    return _pair_output(_with_sft(losses, terms, config), terms, config.beta * mc, config.beta * mr,
                        scale=config.beta * (mc.abs() + mr.abs()))


@register_loss("orpo", kind="terms", needs_reference=False, reads=(),
               metrics=("orpo/log_odds_ratio", "orpo/log_odds_chosen", "orpo/nll_loss"))
def _orpo_terms(terms: LossTerms, config: Any) -> LossOutput:
    mc, mr = terms.mean_logps()
    log_odds = orpo_log_odds(mc, mr)
    extras = {"orpo/log_odds_ratio": F.logsigmoid(log_odds), "orpo/log_odds_chosen": log_odds, "orpo/nll_loss": -mc}
    return _pair_output(orpo_loss(mc, mr, lam=config.beta), terms, config.beta * mc, config.beta * mr, extras,
                        scale=config.beta * (mc.abs() + mr.abs()))


@register_loss("kto", kind="terms", data="unpaired", reads=("desirable_weight", "undesirable_weight"),
               metrics=("kto/kl",))
def _kto_terms(terms: LossTerms, config: Any) -> LossOutput:
    if terms.labels is None:
        raise ValueError("loss.type=kto needs labels (True = desirable) for every example")
    labels = terms.labels.to(device=terms.policy_chosen_logps.device, dtype=torch.bool)
    logratios = terms.policy_chosen_logps - terms.ref_chosen_logps
    kl = terms.kl if terms.kl is not None else kto_kl(terms.policy_rejected_logps - terms.ref_rejected_logps)
    kl = kl.detach().to(logratios)
    losses = kto_loss(logratios, labels, kl, beta=config.beta,
                      desirable_weight=1.0 if config.desirable_weight is None else config.desirable_weight,
                      undesirable_weight=1.0 if config.undesirable_weight is None else config.undesirable_weight)
    rewards = (config.beta * logratios).detach()
    logps = terms.policy_chosen_logps.detach()
    correct = torch.where(labels, logratios > kl, logratios < kl).float().detach()
    return LossOutput(losses=losses, chosen_rewards=rewards, rejected_rewards=rewards, correct=correct,
                      chosen_logps=logps, rejected_logps=logps, chosen_mask=labels, rejected_mask=~labels,
                      extras={"kto/kl": kl.expand_as(logratios)})


# ---------------------------------------------------------------------------------------


def dpo_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    config: LossConfig,
    chosen_n_tokens: Optional[torch.Tensor] = None,
    rejected_n_tokens: Optional[torch.Tensor] = None,
    policy_chosen_nll: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Per-row losses, rewards and metrics of the loss `config.type` (see LossTerms for the
    inputs; all [B]). Reference log-probs are moved to the policy log-probs' device and dtype
    (they typically arrive from the data pipeline on CPU); a loss that needs them raises
    without them, a reference-free one ignores them.

    `config` is a LossConfig (duck-typed): `type`, `beta`, `label_smoothing`, `sft_weight`
    (adds sft_weight · policy_chosen_nll to each pair's loss), `length_normalize` (DPO family:
    divide all four log-probs by their response token counts before forming h; rewards then
    use the normalised log-probs too), `gamma` (SimPO), `desirable_weight` /
    `undesirable_weight` (KTO).
    """
    spec = loss_spec(config.type)
    pc = policy_chosen_logps
    ref = [t.to(pc) if t is not None else None for t in (ref_chosen_logps, ref_rejected_logps)]
    if spec.needs_reference and None in ref:
        raise ValueError(f"loss.type={spec.name!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    shapes = {t.shape for t in (pc, policy_rejected_logps, *[r for r in ref if r is not None])}
    if len(shapes) != 1 or pc.dim() != 1:
        # [B] vs [B, 1] would broadcast silently into a [B, B] loss.
        raise ValueError(f"log-prob tensors must all be 1-D of the same shape [B], got {shapes}")
    terms = LossTerms(policy_chosen_logps=pc, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], chosen_n_tokens=chosen_n_tokens,
                      rejected_n_tokens=rejected_n_tokens, policy_chosen_nll=policy_chosen_nll,
                      labels=labels, kl=kl)
    if spec.kind == "h":
        return _h_terms(spec.fn, terms, config)
    return spec.fn(terms, config)
