"""What holds a policy worker's memory: peak RSS of one forward+backward on the real model.

Each mode runs in a fresh process (ru_maxrss is a high-water mark), on the same batch: 16
sequences of 256 tokens (8 pairs, a KTO run's micro-batch that reached 10.8 GB) through
SmolLM2-135M (49k vocabulary), fp32, log-probs by ray_dpo's chunked token_logps:

    plain               what a run does by default
    logp chunks recomputed  each log-prob chunk recomputed in the backward instead of its
                        gathered float32 [chunk, V] rows kept (torch.utils.checkpoint)
    gradient checkpointing  model.gradient_checkpointing: each layer's activations
                        recomputed in the backward

    python benchmarks/logp_memory.py --model .assets/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SEQS, TOKENS = 16, 256
REPEATS = 3
MODES = ("plain", "logp chunks recomputed", "gradient checkpointing")


def one(model_path: str, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import ray_dpo.batching.logps as logps

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    ids = torch.randint(0, model.config.vocab_size, (SEQS, TOKENS))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :TOKENS // 2] = False  # the prompt half is not scored
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if mode == "gradient checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logits = model(input_ids=ids).logits
    if mode == "logp chunks recomputed":
        import torch.utils.checkpoint

        flat = logits.reshape(-1, logits.shape[-1])
        rows, cols = mask[:, 1:].nonzero(as_tuple=True)
        predictors, targets = rows * TOKENS + cols, ids[rows, cols + 1]
        chunks = [torch.utils.checkpoint.checkpoint(logps.token_logps, flat, predictors[i:i + 1024],
                                                    targets[i:i + 1024], use_reentrant=False)
                  for i in range(0, predictors.numel(), 1024)]
        out = torch.cat(chunks)
    else:
        out, _ = logps.sequence_logps(logits, ids, mask)
    out.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "model_loaded_gb": before, "peak_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--one", choices=MODES)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one)))
        return
    runs = {mode: [] for mode in MODES}
    for _ in range(REPEATS):  # interleaved: allocator noise shows as the spread of one mode's runs
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", mode],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[mode].append(json.loads(out))
    from _common import record, table

    body = table(["mode", "RSS after model load (GB)", f"peak RSS (GB), {REPEATS} runs"],
                 [[mode, f"{rs[0]['model_loaded_gb']:.2f}", ", ".join(f"{r['peak_gb']:.2f}" for r in rs)]
                  for mode, rs in runs.items()])
    print(body)
    if not args.no_record:
        record("Policy memory: one forward+backward of SmolLM2-135M, 16 x 256 tokens", body,
               packages=("torch", "transformers"),
               notes="Fresh process per mode (ru_maxrss). The full-vocabulary logits [16, 256, 49152] fp32 are "
                     "0.8 GB a copy; the layers' activations for 4,096 positions are most of the rest.")


if __name__ == "__main__":
    main()
