"""What the loss (`loss.type`) asks of the rest of a run config, from the loss registry's facts.

    needs_reference(cfg)   False for SimPO / ORPO: no reference actor, no reference forward
    reference_source(cfg)  none | adapters_off (LoRA: the policy's base) | group (reference actors)
    needs_reference_group(cfg)   whether reference actors start (training or held-out eval/kl)
    trains_unpaired(cfg)   True for KTO: rows are (prompt, completion, label) examples
    prompt_only_refusal(online, key=)   why a data split may not hold prompt-only rows
    loss_problems(cfg)     (key, message) pairs for config.check: loss.* keys the loss does
                           not read, data formats it cannot train on, reference / online /
                           held-out settings that a reference-free loss contradicts

Pure: imports neither ray, deepspeed nor vllm (ray_dpo.config.checks wraps the pairs into Problems).
"""

from __future__ import annotations

from typing import Any, Optional

from ray_dpo.data.formats import PAIRED_FORMATS, PROMPT_ONLY_NEEDS_ONLINE, UNPAIRED_FORMATS
from ray_dpo.losses import LOSSES, OPTIONAL_KEYS


def needs_reference(cfg: Any) -> bool:
    """Whether the run's loss needs reference log-probs (unknown types: True, the safe side)."""
    return cfg.loss.type not in LOSSES or LOSSES[cfg.loss.type].needs_reference


def reference_source(cfg: Any) -> str:
    """Where training's reference log-probs come from: "none" (a reference-free loss),
    "adapters_off" (a LoRA policy scores its own base model, policy.lora.reference) or
    "group" (the reference actors, streamed or precomputed)."""
    if not needs_reference(cfg):
        return "none"
    lora = cfg.policy.lora
    return "adapters_off" if lora.enabled and lora.reference == "adapters_off" else "group"


def needs_reference_group(cfg: Any) -> bool:
    """Whether the run starts reference actors: training's reference is the group, or held-out
    sampling (eval.prompts_file, online rounds' eval) scores eval/kl against the reference
    (under adapters_off too: the actors then serve the base model for that alone)."""
    source = reference_source(cfg)
    return source == "group" or (source == "adapters_off" and bool(cfg.eval.prompts_file))


def trains_unpaired(cfg: Any) -> bool:
    """Whether the run's loss trains on unpaired, labelled examples (KTO)."""
    return cfg.loss.type in LOSSES and LOSSES[cfg.loss.type].data == "unpaired"


def prompt_only_refusal(online: Any, *, key: str = "data.train_files") -> Optional[str]:
    """Why the rows of ``key`` may not be prompt-only under ``online`` (an OnlineConfig): the
    bad-row message, saying what to set; None when they may. They may only in an online run's
    data.train_files, with a strategy that needs no chosen response from the data set
    (PairStrategySpec.needs_chosen). data.eval_files rows are the DPO eval's pairs."""
    if key != "data.train_files":
        return (f"this row is prompt-only (no chosen / rejected), but {key} rows are preference pairs "
                "for the eval/* DPO metrics; put held-out prompts in eval.prompts_file (the judge "
                "scores the policy's samples of them), or give the row chosen and rejected")
    if not online.enabled:
        return PROMPT_ONLY_NEEDS_ONLINE
    from ray_dpo.online.pairs import PAIR_STRATEGIES  # online runs only: offline never imports online/

    spec = PAIR_STRATEGIES.get(online.pair_strategy)
    if spec.needs_chosen:
        fits = " or ".join(PAIR_STRATEGIES.names(needs_chosen=False))
        return (f"this row is prompt-only (no chosen response), but online.pair_strategy={spec.name} "
                "pairs the policy's samples with the data set's chosen response; set "
                f"online.pair_strategy={fits} (pairs made of the policy's own samples), or give the row "
                "chosen and rejected")
    return None


def _readers(key: str) -> str:
    names = [n for n in LOSSES.names() if key in LOSSES[n].reads]
    return ", ".join(names) if names else "no loss"


def loss_problems(cfg: Any) -> list[tuple[str, str]]:
    """Every contradiction between loss.type and the rest of ``cfg`` (RunConfig)."""
    if cfg.loss.type not in LOSSES:
        return []  # reported as an unknown loss.type by config.check
    spec, out = LOSSES[cfg.loss.type], []
    kind = f"loss.type={spec.name!r}"
    for key, unset in OPTIONAL_KEYS.items():
        if getattr(cfg.loss, key) != unset and key not in spec.reads:
            out.append((f"loss.{key}", f"is not used by {kind} (used by: {_readers(key)}); unset it "
                                       "or pick a loss that reads it"))
    for key in ("desirable_weight", "undesirable_weight"):
        value = getattr(cfg.loss, key)
        if value is not None and value <= 0:
            out.append((f"loss.{key}", f"must be > 0, got {value}"))
    if cfg.loss.gamma is not None and cfg.loss.gamma < 0:
        out.append(("loss.gamma", f"SimPO's target margin must be >= 0, got {cfg.loss.gamma}"))
    out += _data_problems(cfg, spec, kind)
    if not spec.needs_reference:
        out += _reference_free_problems(cfg, kind)
    elif spec.data == "unpaired" and cfg.online.enabled:
        out.append(("online.enabled", f"online rounds build preference pairs, and {kind} trains on unpaired "
                                      "examples: not wired; run KTO offline"))
    return out


def _data_problems(cfg: Any, spec: Any, kind: str) -> list[tuple[str, str]]:
    fmt, out = cfg.data.format, []
    if spec.data == "pairs":
        if fmt in UNPAIRED_FORMATS:
            out.append(("data.format", f"{fmt!r} rows are unpaired examples, but {kind} trains on preference "
                                       "pairs; use loss.type=kto or a paired format"))
        if cfg.data.unpair:
            out.append(("data.unpair", f"splits pairs into unpaired examples, for an unpaired loss (kto); "
                                       f"{kind} trains on the pairs themselves: set it to false"))
    elif fmt in PAIRED_FORMATS and not cfg.data.unpair:
        out.append(("data.unpair", f"{kind} trains on unpaired examples but data.format={fmt!r} holds pairs: "
                                   "set data.unpair=true (chosen -> desirable, rejected -> undesirable) or "
                                   f"use data.format {' / '.join(UNPAIRED_FORMATS)}"))
    return out


def _reference_free_problems(cfg: Any, kind: str) -> list[tuple[str, str]]:
    out = []
    why = f"{kind} is reference-free: no reference model is loaded"
    if cfg.reference.precompute:
        out.append(("reference.precompute", f"{why}, so there is nothing to precompute; set it to false"))
    if cfg.reference.model:
        out.append(("reference.model", f"{why}; unset it"))
    if cfg.online.enabled:
        out.append(("online.enabled", f"{why}, and online rounds score their pairs with one: not wired; "
                                      "run it offline"))
    if cfg.eval.prompts_file:
        out.append(("eval.prompts_file", f"{why}, and held-out sampling measures eval/kl against it: not "
                                         "wired; unset it (data.eval_files still gives eval/loss and accuracies)"))
    return out
