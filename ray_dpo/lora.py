"""LoRA through peft: the adapter config from policy.lora, the model's linear layers, the
check that every target module exists, and parameter counts.

    peft_config(lora)                     policy.lora -> peft.LoraConfig
    wrap(model, lora)                     a causal LM with adapters (peft.PeftModel)
    linear_module_names(model)            full names of the layers peft can adapt
    unmatched_targets(names, targets)     the targets that match no linear layer
    target_problem(model_path, lora)      the config error for those, listing the model's layers
    param_counts(model)                   (trainable, total) parameters, ZeRO-3 partitions counted whole
    adapters_off_logps(model, inputs, batch)   the base model's log-probs: the forward, adapters off
    merge_adapter(model_cfg, adapter_dir, out_dir)   base + adapter -> a plain transformers model

peft and torch are imported inside the functions: ray_dpo.config calls target_problem only
when policy.lora is on, and ``import ray_dpo.lora`` alone loads neither. Imports neither ray,
deepspeed nor vllm.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

ALL_LINEAR = "all-linear"
"""peft's shorthand: every linear layer except the output head."""


def targets_of(lora: Any) -> Any:
    """policy.lora.target_modules as peft takes it: the string "all-linear", or the names."""
    names = list(lora.target_modules)
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def peft_config(lora: Any):
    """policy.lora (a LoraSection) as a peft.LoraConfig for a causal LM."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=targets_of(lora), modules_to_save=list(lora.modules_to_save) or None,
                      bias="none")


def wrap(model: Any, lora: Any):
    """``model`` with fresh adapters (B = 0, so the wrapped model computes exactly what the base
    does until the first update); only adapter (and modules_to_save) parameters require grad."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora))


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # GPT-2 style models keep their projections in transformers' Conv1D, which peft adapts too.
    return type(module).__name__ == "Conv1D"


def linear_module_names(model: Any) -> list[str]:
    """Full module paths of the linear layers of ``model`` (peft can put adapters on them)."""
    return [name for name, module in model.named_modules() if name and _is_linear(module)]


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module path is the name or ends with '.name'."""
    return name == target or name.endswith("." + target)


def unmatched_targets(names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """The targets (policy.lora.target_modules) that match none of the linear layer ``names``."""
    names = list(names)
    return [t for t in targets if t != ALL_LINEAR and not any(_matches(n, t) for n in names)]


def short_names(names: Iterable[str]) -> list[str]:
    """The last component of each path, once each, in order: q_proj, k_proj, ..., lm_head."""
    out: list[str] = []
    for name in names:
        short = name.rsplit(".", 1)[-1]
        if short not in out:
            out.append(short)
    return out


def meta_model(model_path: str, *, trust_remote_code: bool = False):
    """The model's architecture on the meta device: its module tree, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def target_problem(model_path: str, lora: Any, *, trust_remote_code: bool = False) -> Optional[str]:
    """Why policy.lora.target_modules does not fit the model at ``model_path``, or None."""
    targets = list(lora.target_modules)
    if ALL_LINEAR in targets and len(targets) > 1:
        return f"{ALL_LINEAR!r} already takes every linear layer: give it alone or list names without it"
    names = linear_module_names(meta_model(model_path, trust_remote_code=trust_remote_code))
    missing = unmatched_targets(names, targets)
    if not missing:
        return None
    return (f"no linear layer of {model_path} is named {', '.join(repr(m) for m in missing)}; its linear "
            f"layers are named {', '.join(short_names(names))} (or use {ALL_LINEAR!r})")


def param_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``; a ZeRO-3 partition counts its full size."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def adapters_off_logps(model: Any, inputs: dict, batch: Any) -> tuple[Any, Any]:
    """The reference's (chosen [B], rejected [B]) float32 summed log-probs from a LoRA policy:
    the same forward with its adapters switched off is the base model
    (policy.lora.reference=adapters_off). ``model``: a peft model, or a DeepSpeed engine
    around one (under ZeRO-3 every rank must call this: the forward gathers parameters
    collectively). ``inputs`` / ``batch``: batching.layouts.model_inputs / build_batch."""
    import torch

    from ray_dpo.batching.layouts import pair_logps

    peft_model = getattr(model, "module", model)
    with torch.no_grad(), peft_model.disable_adapter():
        logits = model(**inputs).logits
        chosen, rejected, _, _ = pair_logps(logits, batch)
    return chosen.float(), rejected.float()


def merge_adapter(model_cfg: Any, adapter_dir: str, out_dir: str) -> None:
    """The base model (model.name_or_path) with the adapter at ``adapter_dir`` merged into its
    weights, written to ``out_dir`` as a plain Hugging Face model that needs no peft. Loads
    one whole copy of the base model on this host."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_dpo.dtypes import torch_dtype

    base = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch_dtype(model_cfg.dtype),
                                                trust_remote_code=model_cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)


def merged_tensors(peft_model: Any, *, gather: Any, keep: bool = True) -> dict:
    """The model's full weights under Hugging Face names with every LoRA update merged in
    (base + delta, fresh CPU tensors; the model is not modified). ``gather(params)``: a
    context manager that makes ``params`` whole (ZeRO-3's GatheredParameters, else a no-op).
    keep=False: only join the gathers (the other ranks under ZeRO-3) and return {}."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.base_model.model  # the transformers model, LoRA layers inside
    out: dict = {}
    merged: set[str] = set()  # the same on every rank, so every rank joins the same gathers
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            merged.update((f"{name}.weight", f"{name}.bias"))
            with gather(module.parameters()):
                if not keep:
                    continue
                base = module.get_base_layer()
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                out[f"{name}.weight"] = (base.weight.data + delta.to(base.weight.dtype)).detach().to("cpu").clone()
                if getattr(base, "bias", None) is not None:
                    out[f"{name}.bias"] = base.bias.data.detach().to("cpu").clone()
    for name, param in model.named_parameters():
        plain = _hf_name(name)
        if plain is None or plain in merged:
            continue
        with gather([param]):
            if keep:
                out[plain] = param.data.detach().to("cpu", copy=True)
    return out


def _hf_name(name: str) -> Optional[str]:
    """A parameter name inside a peft-wrapped model as the plain model names it; None for the
    adapters themselves and for the frozen originals of modules_to_save."""
    if "lora_" in name or ".original_module." in name:
        return None
    name = name.replace(".base_layer.", ".")
    return name.replace(".modules_to_save.default.", ".")
