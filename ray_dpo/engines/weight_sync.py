"""Weight sync from the policy to the generation engines, and its verification.

The policy side hands over its full state dict (HF parameter names, CPU tensors,
gathered under ZeRO-3 by the policy workers), or for a LoRA policy its adapter alone
(AdapterWeights), or an ObjectRef to either. A method moves it into every engine without
restarting the engine:

    object_store  (default, CPU and GPU) ray.put once; every engine reads the same object
                  and copies it into its model in memory. vLLM: the weights go straight
                  to ``Worker.reload_weights(weights_iterator=...)``; nothing touches disk.
    checkpoint    the state dict is saved as safetensors in a directory that every engine
                  can read (shared storage on a multi-node cluster), or the caller passes
                  such a directory (e.g. the policy's hf_model/); engines reload from it.
    collective    policy rank 0 and every engine join a process group made for the sync
                  (gloo on CPU, NCCL on GPUs: the same code) and rank 0 broadcasts the
                  weights in buckets of online.sync_bucket_mb; under ZeRO-3 each bucket is
                  gathered, sent and released before the next (collective.py), so no process
                  holds the whole model twice. Engines load each bucket as it arrives.

After every sync the caller verifies: every engine scores a fixed probe (prompt,
continuation) with its new weights and the largest |engine - policy| difference of the
summed continuation log-probs must stay within ``online.sync_tolerance``, else
WeightSyncError. A missing tensor is reported by name before the probe runs.

Typical use (policy side computes the expected values with the same weights it sends):

    probe = random_probe(vocab_size, seed=0)
    expected = torch_probe_logps(policy_model, probe)   # ray_dpo.batching.probe
    report = group.sync_weights(state_dict, probe=probe, expected=expected)
    metrics.update(report.metrics())   # sync/seconds, sync/max_logprob_diff
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ray_dpo.engines.facts import SYNC_METHODS
StateDict = Mapping[str, torch.Tensor]


class WeightSyncError(RuntimeError):
    """An engine's weights do not match the policy's after a sync."""


# --------------------------------------------------------------------------- probes


def random_probe(
    vocab_size: int, *, num_sequences: int = 4, prompt_len: int = 8, continuation_len: int = 8,
    seed: int = 0, first_token: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """A fixed, seeded probe: ``num_sequences`` (prompt, continuation) pairs of random ids.

    Token ids are drawn from [first_token, vocab_size). Random tokens are fine for a weight
    check: any disagreement between two copies of a model shows on any input.
    """
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(first_token, vocab_size) for _ in range(n)]  # noqa: E731
    return [(draw(prompt_len), draw(continuation_len)) for _ in range(num_sequences)]


def row_probe(rows: Sequence[Mapping[str, Any]], *, max_continuation: int = 8) -> list[tuple[list[int], list[int]]]:
    """A probe from data rows (CONTRACTS.md): a pair's (prompt, chosen response); a prompt-only
    row's prompt split before its last tokens (at most ``max_continuation``, at most half),
    which become the continuation. Real tokens of the data, in the engines' own prompt
    format: with chat data the scored tail is the generation header that every sample
    starts from. Rows whose prompt has fewer than two tokens are left out."""
    probe = []
    for row in rows:
        prompt, chosen = list(row["prompt_ids"]), list(row["chosen_ids"])
        if chosen:
            probe.append((prompt, chosen))
        elif len(prompt) >= 2:
            cut = len(prompt) - min(max_continuation, len(prompt) // 2)
            probe.append((prompt[:cut], prompt[cut:]))
    return probe


# --------------------------------------------------------------------------- LoRA adapters


@dataclass
class AdapterWeights:
    """A LoRA policy's adapter, what a sync sends instead of the whole model (policy.lora):
    a few MB where the model is GBs. Engines load it through their LoRA support (vLLM: a new
    adapter version per sync; transformers: peft) on top of the base model they started with.

    config: the peft LoraConfig as a JSON-able dict (adapter_config.json).
    tensors: peft's saved names (adapter name stripped, as in adapter_model.safetensors) ->
        CPU tensors; gathered whole under ZeRO-3.
    version: the policy step it was taken at; names the checkpoint method's directory
        (engines number the adapters they load themselves).
    """

    config: dict
    tensors: dict
    version: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.tensors)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what a sync moves)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(adapter: AdapterWeights, directory: str) -> str:
    """Write ``adapter`` as a peft adapter directory (adapter_config.json,
    adapter_model.safetensors) that PeftModel.from_pretrained and vLLM's LoRA loader read."""
    import json

    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter.tensors.items()}
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter.config, f)
    return directory


def read_adapter(directory: str) -> AdapterWeights:
    """A peft adapter directory back as AdapterWeights."""
    import json

    from safetensors.torch import load_file

    with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    return AdapterWeights(config=config, tensors=load_file(os.path.join(directory, "adapter_model.safetensors")))


def is_adapter_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, ADAPTER_CONFIG))


# --------------------------------------------------------------------------- reports


@dataclass
class LoadReport:
    """What one engine did with one weight update."""

    engine: int = -1
    received: int = 0
    """Tensors received."""
    missing: list[str] = field(default_factory=list)
    """Checkpoint tensor names the engine expected and did not receive (old values kept)."""
    ignored: list[str] = field(default_factory=list)
    """Received names that are not in the checkpoint (e.g. a tied lm_head.weight)."""
    seconds: float = 0.0
    bytes: int = 0
    """Bytes of the tensors received (a LoRA adapter: the adapter's alone)."""
    largest_bucket: int = 0
    """collective: the largest bucket received, i.e. the most sync data held at once."""
    incarnation: str = ""
    """collective: the engine process that loaded them (one restarted while idle loads a
    sync like any other; the group then knows it holds the synced weights)."""


@dataclass
class SyncReport:
    method: str
    seconds: float
    """Wall time of the transfer and load on all engines (verification excluded)."""
    loads: list[LoadReport]
    engine_diffs: Optional[list[float]] = None
    """Per engine: max |engine - policy| summed log-prob over the probe (None: not verified)."""

    @property
    def max_logprob_diff(self) -> Optional[float]:
        return max(self.engine_diffs) if self.engine_diffs else None

    def metrics(self) -> dict[str, float]:
        out = {"sync/seconds": self.seconds}
        if self.loads:
            out["sync/bytes"] = float(max(load.bytes for load in self.loads))  # what each engine received
            if any(load.largest_bucket for load in self.loads):
                out["sync/bucket_bytes"] = float(max(load.largest_bucket for load in self.loads))
        if self.engine_diffs:
            out["sync/max_logprob_diff"] = self.max_logprob_diff
        return out


def checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a HF model directory's safetensors files ({} if none).

    Read from the file headers only. Engines check a sync against these before touching
    their model: a skipped tensor is named in the error instead of surfacing only as a
    log-prob difference, and a wrong shape never reaches vLLM's loaders (a loader that
    fails half-way leaves vLLM's in-place reload state behind).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    if not os.path.isdir(model_path):
        return shapes
    from safetensors import safe_open

    for fname in sorted(os.listdir(model_path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(model_path, fname), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def plan_load(weights: StateDict, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    """(tensors to load, names ignored) for a state dict checked against checkpoint shapes.

    Names the checkpoint does not hold are ignored (e.g. a tied lm_head.weight); a name
    that only looks different (a "module." prefix) then shows up as missing. A shape that
    differs raises ValueError. With no shapes known, everything is loaded unchecked.
    """
    not_tensors = [f"{n} ({type(t).__name__})" for n, t in weights.items() if not isinstance(t, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"values must be torch tensors, nothing loaded: {', '.join(not_tensors[:5])}")
    if not shapes:
        return dict(weights), []
    bad = [f"{n} {tuple(t.shape)} (checkpoint: {shapes[n]})"
           for n, t in weights.items() if n in shapes and tuple(t.shape) != shapes[n]]
    if bad:
        raise ValueError(f"{len(bad)} tensor(s) with the wrong shape, nothing loaded: {'; '.join(bad[:5])}"
                         " (a ZeRO-3 parameter that was not gathered has shape (0,))")
    keep = {n: t for n, t in weights.items() if n in shapes}
    return keep, sorted(set(weights) - set(keep))


def tracked(weights: Iterator[tuple[str, torch.Tensor]], seen: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the weights unchanged, appending each name to ``seen`` (engines count what they got)."""
    for name, tensor in weights:
        seen.append(name)
        yield name, tensor


def save_safetensors(weights: StateDict, directory: str) -> str:
    """Write a state dict as ``directory/model.safetensors`` (contiguous CPU copies); returns directory.

    Tensors that share storage (tied embeddings) are written once each as separate
    copies: safetensors refuses shared storage.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights.items()}
    tmp = os.path.join(directory, ".model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))  # readers never see half a file
    return directory


# --------------------------------------------------------------------------- checks


def check_loads(reports: Sequence[LoadReport], *, backend: str) -> None:
    """Raise WeightSyncError when an engine did not receive every tensor it expected."""
    for r in reports:
        if r.missing:
            shown = ", ".join(r.missing[:5]) + (f" (+{len(r.missing) - 5} more)" if len(r.missing) > 5 else "")
            raise WeightSyncError(
                f"weight sync incomplete: generation engine {r.engine} ({backend}) received "
                f"{r.received} tensors but not {len(r.missing)} it expected: {shown}. It keeps the "
                "old values of those, so its samples would come from a mix of two policies. Send "
                "the FULL state dict with Hugging Face names (under ZeRO-3 gather every parameter "
                "first, e.g. deepspeed.zero.GatheredParameters, on all ranks)."
            )


def max_logprob_diffs(engine_logps: Sequence[Sequence[float]], expected: Sequence[float]) -> list[float]:
    """Per engine: max over probe sequences of |engine - expected| (inf if a value is not finite)."""
    diffs = []
    for i, got in enumerate(engine_logps):
        if len(got) != len(expected):
            raise ValueError(f"engine {i} scored {len(got)} probe sequences, expected values "
                             f"were given for {len(expected)}")
        d = [abs(g - e) if math.isfinite(g) and math.isfinite(e) else math.inf for g, e in zip(got, expected)]
        diffs.append(max(d))
    return diffs


def check_diffs(
    diffs: Sequence[float], engine_logps: Sequence[Sequence[float]], expected: Sequence[float],
    *, tolerance: float, backend: str, method: str,
) -> None:
    """Raise WeightSyncError naming the first engine whose probe log-probs are off by > tolerance."""
    for i, diff in enumerate(diffs):
        if diff <= tolerance:
            continue
        j = max(range(len(expected)), key=lambda k: abs(engine_logps[i][k] - expected[k])
                if math.isfinite(engine_logps[i][k]) else math.inf)
        raise WeightSyncError(
            f"weight sync check failed: generation engine {i} ({backend}, method={method}) scores the "
            f"probe differently from the policy: max |log-prob difference| = {diff:.4g} > "
            f"online.sync_tolerance = {tolerance:g} (probe sequence {j}: engine "
            f"{engine_logps[i][j]:.6g}, policy {expected[j]:.6g}). Check that every tensor was sent "
            "with the right Hugging Face name and shape (under ZeRO-3: gathered, not partitioned), "
            "that the policy computed the expected log-probs with exactly the weights it sent, and "
            "the dtype: bf16/fp16 engines differ from an fp32 policy by more than fp32 ones, so "
            "raise online.sync_tolerance for them."
        )


# --------------------------------------------------------------------------- methods


def sync_method(name: str) -> Callable[..., list]:
    """The send function of method ``name`` (engines/facts.py); ValueError naming the valid methods."""
    return SYNC_METHODS.get(name).send()


def send_object_store(actors: Sequence[Any], weights: Any, **_: Any) -> list:
    """One ray.put; every engine resolves the same object (Ray passes the value, not the ref)."""
    import ray

    if not isinstance(weights, (ray.ObjectRef, AdapterWeights)):
        weights = dict(weights)
    ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
    return [a.load_weights.remote(ref) for a in actors]


def send_collective(actors: Sequence[Any], weights: Any, **_: Any) -> list:
    """``weights``: the SyncTicket of policy rank 0's GroupSender. Engine i joins the sync's
    group as rank i + 1 and loads the buckets as rank 0 broadcasts them."""
    return [a.receive_collective.remote(weights, i + 1) for i, a in enumerate(actors)]


def send_checkpoint(actors: Sequence[Any], weights: Any, *, checkpoint_dir: Optional[str] = None, **_: Any) -> list:
    """Engines reload from a safetensors directory: the one given, or one written here."""
    import ray

    if isinstance(weights, ray.ObjectRef):
        weights = ray.get(weights)
    if isinstance(weights, (str, os.PathLike)):
        directory = os.fspath(weights)
    elif isinstance(weights, AdapterWeights):
        if not checkpoint_dir:
            raise ValueError("weight_sync=checkpoint with an adapter needs checkpoint_dir: a directory every "
                             "engine can read (shared storage on a cluster)")
        directory = save_adapter(weights, os.path.join(checkpoint_dir, f"adapter-v{weights.version}"))
    else:
        if not checkpoint_dir:
            raise ValueError("weight_sync=checkpoint with a state dict needs checkpoint_dir: a "
                             "directory every engine can read (shared storage on a cluster)")
        directory = save_safetensors(weights, checkpoint_dir)
    return [a.load_weights.remote(path=directory) for a in actors]
