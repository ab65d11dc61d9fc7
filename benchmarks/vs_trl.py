"""ray_dpo's policy step vs TRL's DPOTrainer: same model, data, batch and machine, one run.

Question: per optimizer step on the same batches, how fast is ray_dpo's policy step (the
worker's own code: DeepSpeed engine ZeRO-0, ray_dpo.batching forward, loss, step) compared
with TRL's DPOTrainer, and do both compute the same loss on the first batch?

Setup (CPU, fp32, sdpa, torch threads fixed):
* model: random Llama, hidden 256, 4 layers (ray_dpo.testing.assets, word-level tokenizer);
  the reference is ANOTHER random model (seed 1), so the first loss is not trivially ln 2.
* data: text pairs whose token lengths follow the multi-turn distribution of
  benchmarks/layouts.py (prompt 1-4 turns of 20-80 words, responses 20-160 words);
  TRL tokenizes them, and ray_dpo gets exactly TRL's token ids (prompt_ids, chosen_ids,
  rejected_ids columns of trainer.train_dataset) and TRL's precomputed reference log-probs.
* TRL: precompute_ref_log_probs=True (reference forwards excluded from the timed steps, as
  ray_dpo's reference group does them elsewhere), sequential sampler, adamw_torch,
  max_grad_norm 1, constant LR. Timing: on_step_begin -> on_step_end, steps 2..N.
* ray_dpo: the worker's _pair_terms + engine.backward + engine.step in one process (a
  single-rank gloo group), for each batch layout (packed / prefix_shared: one row per step,
  and rows capped at 1024 tokens); timing per step, steps 2..N.

    .venv/bin/python benchmarks/vs_trl.py                # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from _common import record, table  # noqa: E402

BETA, LR = 0.1, 1e-4


def make_text_pairs(n: int, seed: int) -> list[dict]:
    from ray_dpo.testing.assets import VOCABULARY

    words = [w for w in VOCABULARY if w.isalpha()]
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    return [{"prompt": text(sum(rng.randint(20, 80) for _ in range(rng.randint(1, 4)))),
             "chosen": " " + text(rng.randint(20, 160)), "rejected": " " + text(rng.randint(20, 160))}
            for _ in range(n)]


def build_assets(root: str, hidden: int, layers: int) -> tuple[str, str, str]:
    from ray_dpo.testing.assets import build_tiny_model, build_tiny_tokenizer

    tok_dir = os.path.join(root, "tokenizer")
    tokenizer = build_tiny_tokenizer(tok_dir)
    policy = build_tiny_model(os.path.join(root, "policy"), tokenizer, seed=0, hidden_size=hidden, num_layers=layers)
    ref = build_tiny_model(os.path.join(root, "ref"), tokenizer, seed=1, hidden_size=hidden, num_layers=layers)
    for d in (policy, ref):  # from_pretrained(d) finds the tokenizer next to the weights
        tokenizer.save_pretrained(d)
    return tok_dir, policy, ref


# --------------------------------------------------------------------------- TRL


def run_trl(args, policy_dir: str, ref_dir: str, out_dir: str):
    """(first-step loss, [step seconds], tokenized rows with ref log-probs, in batch order)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list(make_text_pairs(args.pairs * args.steps, seed=3))
    config = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=BETA,
        loss_type=["sigmoid"], max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0,
        precompute_ref_log_probs=True, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, max_length=None,
        gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    timer = Timer()
    trainer = Sequential(model=model, ref_model=ref, args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    first_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    rows = [{"pair_id": str(i), "prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"],
             "rejected_ids": r["rejected_ids"], "ref_chosen_logp": float(r["ref_chosen_logps"]),
             "ref_rejected_logp": float(r["ref_rejected_logps"])}
            for i, r in enumerate(trainer.train_dataset)]
    return first_loss, timer.times, rows


# --------------------------------------------------------------------------- ray_dpo


def init_single_rank_group() -> None:
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def run_ray_dpo(args, policy_dir: str, rows: list[dict], layout: str, row_tokens: int | None = None):
    """(first-step loss, [step seconds]) of the policy worker's step code on `rows`."""
    from ray_dpo.config import LossConfig, ModelConfig, PolicyConfig
    from ray_dpo.policy.worker import RankState, model_pad_token_id, pair_terms, setup_engine, step_optimizer

    init_single_rank_group()
    policy = PolicyConfig(num_workers=1, zero_stage=0, micro_batch_size=args.pairs, gradient_accumulation_steps=1,
                          learning_rate=LR, lr_scheduler="constant", warmup_steps=0, max_grad_norm=1.0,
                          weight_decay=0.0, layout=layout, max_tokens_per_row=row_tokens)
    model_cfg = ModelConfig(name_or_path=policy_dir, dtype="fp32", attn_implementation="sdpa")
    engine, _ = setup_engine(model_cfg, policy, device=torch.device("cpu"), world_size=1, total_steps=args.steps)
    worker = RankState(engine=engine, feeder=None, loss=LossConfig(beta=BETA), policy=policy, rank=0, world_size=1,
                    device=torch.device("cpu"), pad_token_id=model_pad_token_id(engine.module.config),
                    total_steps=args.steps, attn_implementation="sdpa")
    losses, times = [], []
    for step in range(args.steps):
        pairs = rows[step * args.pairs:(step + 1) * args.pairs]
        t0 = time.perf_counter()
        out, *_ = pair_terms(worker, pairs)
        engine.backward(out.losses.sum() / len(pairs))  # the worker's scale with one rank
        step_optimizer(engine)
        times.append(time.perf_counter() - t0)
        losses.append(out.losses.mean().item())
    return losses[0], times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (batch)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (the first is not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ray_dpo_vs_trl_") as root:
        _, policy_dir, ref_dir = build_assets(root, args.hidden, args.layers)
        trl_loss, trl_times, rows = run_trl(args, policy_dir, ref_dir, os.path.join(root, "trl"))
        results = [("TRL DPOTrainer (padded)", trl_loss, trl_times)]
        for layout, row_tokens in (("padded", None), ("packed", None), ("prefix_shared", None),
                                   ("packed", 1024), ("prefix_shared", 1024)):
            loss, times = run_ray_dpo(args, policy_dir, rows, layout, row_tokens)
            rows_note = f", rows<={row_tokens}" if row_tokens else ""
            results.append((f"ray_dpo policy step ({layout}{rows_note})", loss, times))
    trl_pps = args.pairs * (len(trl_times) - 1) / sum(trl_times[1:])
    table_rows = []
    for name, loss, times in results:
        pps = args.pairs * (len(times) - 1) / sum(times[1:])
        table_rows.append([name, f"{loss:.6f}", f"{abs(loss - trl_loss):.1e}", f"{sum(times[1:]) / (len(times) - 1):.2f}",
                           f"{pps:.2f}", f"{pps / trl_pps:.2f}x"])
    body = table(["implementation", "first-batch loss", "abs(loss - TRL)", "s/step", "pairs/s", "vs TRL"], table_rows)
    notes = (f"{args.steps} steps of {args.pairs} pairs (first step not timed), Llama hidden {args.hidden}, "
             f"{args.layers} layers, fp32, sdpa, torch threads {args.threads}, reference = a different random model "
             f"(ln 2 = {math.log(2):.6f} would mean policy == reference).")
    record("ray_dpo policy step vs TRL DPOTrainer", body, packages=("trl", "deepspeed"),
           notes=notes, save=not args.no_record)


if __name__ == "__main__":
    main()
