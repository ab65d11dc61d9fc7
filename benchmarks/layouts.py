"""Padded vs packed vs prefix-shared: real-token share of computed positions, and pairs/s.

Question: how much of the forward/backward compute does each batch layout spend on real
tokens, and how fast is a DPO forward+backward with it, on realistic length distributions?

Model: a random Llama (hidden 256, 4 layers, vocab 8192, fp32, sdpa) on CPU, torch threads
fixed (--threads). Each layout runs the same micro-batches (--pairs pairs each) built with
ray_dpo.batching.layouts exactly as the policy worker builds them (packed / prefix_shared: one row
per micro-batch, sdpa with a dense 4D mask), plus packed rows capped at 1024 tokens (dense
attention costs T^2 per row on CPU); log-probs are checked against padded.

    .venv/bin/python benchmarks/layouts.py               # ~3-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import record, table, tiny_llama  # noqa: E402
from ray_dpo.batching.layouts import batch_stats, build_batch, model_inputs, pair_logps  # noqa: E402

# (name, layout, row capacity): None = one row per micro-batch, as the policy worker does.
VARIANTS = (("padded", "padded", None), ("packed", "packed", None), ("prefix_shared", "prefix_shared", None),
            ("packed, rows<=1024", "packed", 1024), ("prefix_shared, rows<=1024", "prefix_shared", 1024))


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def make_pairs(kind: str, n: int, *, vocab: int, seed: int) -> list[dict]:
    """Token lengths that look like real preference data (ids are random).

    long_prompt: a long shared context (RAG / document QA): prompt 200-400, responses 20-120.
    multi_turn:  1-5 earlier turns of 20-120 tokens each as the prompt, responses 20-200.
    short_chat:  short prompts 10-60, responses log-normal (median ~60, long tail to 400):
                 the case where padding to the longest response hurts most.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        if kind == "long_prompt":
            p, c, r = rng.randint(200, 400), rng.randint(20, 120), rng.randint(20, 120)
        elif kind == "multi_turn":
            p = sum(rng.randint(20, 120) for _ in range(rng.randint(1, 5)))
            c, r = rng.randint(20, 200), rng.randint(20, 200)
        elif kind == "short_chat":
            p = rng.randint(10, 60)
            c, r = (min(400, max(5, int(rng.lognormvariate(4.1, 0.7)))) for _ in range(2))
        else:
            raise ValueError(kind)
        pairs.append({"prompt_ids": _ids(rng, p, vocab), "chosen_ids": _ids(rng, c, vocab),
                      "rejected_ids": _ids(rng, r, vocab)})
    return pairs


def step(model, pairs: list[dict], layout: str, row_tokens: int | None = None):
    """One DPO-shaped forward+backward; returns (chosen, rejected logps, TokenCounts)."""
    batch = build_batch(pairs, layout=layout, pad_token_id=0, max_tokens_per_row=row_tokens)
    logits = model(**model_inputs(batch, attn_implementation="sdpa", dtype=torch.float32)).logits
    chosen, rejected, _, _ = pair_logps(logits, batch)
    # Any scalar of both halves exercises the same backward as the DPO loss.
    (-torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()).backward()
    model.zero_grad(set_to_none=True)
    return chosen.detach(), rejected.detach(), batch_stats(batch)


def run(args) -> list[list]:
    torch.set_num_threads(args.threads)
    model = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab).train()
    step(model, make_pairs("short_chat", 2, vocab=args.vocab, seed=99), "packed")  # warm-up
    rows = []
    for kind in args.data:
        pairs = make_pairs(kind, args.pairs * args.batches, vocab=args.vocab, seed=1)
        batches = [pairs[i:i + args.pairs] for i in range(0, len(pairs), args.pairs)]
        # Variants interleaved batch by batch and repeated; the best time of each batch counts,
        # so load from other processes on a shared machine hits every variant alike.
        best = {name: [float("inf")] * len(batches) for name, _, _ in VARIANTS}
        logps, counts = {}, {}
        for _ in range(args.repeats):
            for i, b in enumerate(batches):
                for name, layout, row_tokens in VARIANTS:
                    t0 = time.perf_counter()
                    c, r, n = step(model, b, layout, row_tokens)
                    best[name][i] = min(best[name][i], time.perf_counter() - t0)
                    logps[name, i], counts[name, i] = torch.stack([c, r]), n
        results = {}
        for name, _, _ in VARIANTS:
            real = sum(counts[name, i].real_tokens for i in range(len(batches)))
            computed = sum(counts[name, i].padded_positions for i in range(len(batches)))
            diff = max((logps[name, i] - logps["padded", i]).abs().max().item() for i in range(len(batches)))
            results[name] = (real, computed, len(pairs) / sum(best[name]), diff)
        for layout, (real, computed, pps, diff) in results.items():
            rows.append([kind, layout, f"{real / computed:.1%}", computed, f"{pps:.2f}",
                         f"{pps / results['padded'][2]:.2f}x", f"{diff:.1e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["long_prompt", "multi_turn", "short_chat"])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--batches", type=int, default=2, help="micro-batches per data set and layout")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    rows = run(args)
    body = table(["data", "layout", "real/computed", "computed positions", "pairs/s", "vs padded",
                  "max abs(logp - padded)"], rows)
    notes = (f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, sdpa; "
             f"{args.batches} micro-batches x {args.pairs} pairs per data set; forward+backward, "
             f"best of {args.repeats} interleaved timings per batch. "
             "Real tokens: packed/padded count the prompt twice (it is computed twice), "
             "prefix_shared once.")
    record("Batch layouts: padded vs packed vs prefix_shared", body, notes=notes, save=not args.no_record)


if __name__ == "__main__":
    main()
