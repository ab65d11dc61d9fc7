"""The sentiment example trained by TRL's DPOTrainer and by ray_dpo: speed and held-out quality.

Question: on examples/sentiment/sentiment.yaml (SmolLM2-135M-Instruct, 508 Rotten Tomatoes
pairs, 1 epoch of 8 pairs a step, beta 0.1, lr 5e-6 cosine, 4 warmup steps, fp32, CPU), how
long does each implementation take per step and to its last step, and where does each end
on the held-out judge score and KL when both are measured by the same evaluator?

Back to back, on the same machine (nothing else running):

    .venv/bin/ray-dpo train examples/sentiment/sentiment.yaml --set run.name=sent-bench
    .venv/bin/python benchmarks/sentiment_vs_trl.py --trl --ray-dpo-run sent-bench --record

    --trl                  train with TRL (needs the bench extra: pip install -e '.[bench]')
    --ray-dpo-run NAME     read that run's timings and held-out evals from its MLflow store
    --eval-model DIR       also evaluate any other HF model directory (repeatable)
    --max-steps N          stop TRL after N steps (tests); --eval-prompts N: fewer prompts
    --record               append the table to BENCHMARKS.md (benchmarks/_common.py)

What each side's time includes:
* TRL: wall = process start (this interpreter, so Python/torch/TRL imports count) -> end of
  the last optimizer step. It includes model and tokenizer loading, TRL's tokenization
  (datasets.map), the reference log-prob precompute (precompute_ref_log_probs=True, batch
  reference.batch_size, as ray_dpo's reference.precompute) and every step; it excludes
  saving the model and the evaluation. No eval runs during TRL's training.
* ray_dpo: wall = MLflow run start (created by the driver after ray.init, so Ray startup
  and the CLI's imports are NOT included) -> the last step's train metrics in MLflow. It
  includes Ray Data tokenization, the reference precompute (unless the reference cache
  hit), worker + DeepSpeed + vLLM engine startup, the held-out evals at step 0, every
  eval.every_steps and at the end (each 128 prompts x 2 samples), and the final checkpoint
  with the Hugging Face export (the last step's metrics are reported after both).
* s/step, both: mean interval between the ends of consecutive optimizer steps, steps 2..N
  (step 1 is warm-up and excluded); for ray_dpo the MLflow timestamps of train/loss, and
  steps that carried a held-out eval or the checkpoint are excluded too. So it is a
  steady-state rate that includes data loading and logging between steps.

Same training on both sides: the pairs are tokenized by ray_dpo's PairTokenizer to find
what ray_dpo keeps, and TRL gets those text rows in ray_dpo's exact batch order (the
feeder's seeded permutation; checked against the run's ledger when there is one) through a
sequential sampler. TRL tokenizes them itself (prompt alone, prompt + response + EOS text,
split at the common prefix; how the differences are counted is printed). Optimizer: torch
AdamW with ray_dpo's betas / weight decay and ray_dpo's own LR schedule (lr_lambda: warmup
starts at lr/(warmup+1), not TRL's 0), max_grad_norm, seed 0; dropout is 0 in this model.

Held-out evaluator (one, for every model directory), mirroring ray_dpo's in-run eval:
select_prompts(eval.prompts_file, eval.num_prompts, run.seed), prompts tokenized by
PairTokenizer.encode_prompt, eval.samples_per_prompt samples each from one in-process
VLLMEngine (eval_sampling: temperature 1, top_p 1, online.sampling.max_new_tokens; seed
run.seed + the coordinator's EVAL_SEED_OFFSET; weights swapped in with load_weights, as
ray_dpo's sync does), judged by online.judge on the completion text; KL = mean over
samples of log pi(y|x) - log pi_ref(y|x), both summed over the sampled tokens (EOS
included) by transformers fp32 forwards, pi_ref = the initial model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

try:  # process start, so "wall" counts the imports too
    import psutil

    PROCESS_START = psutil.Process().create_time()
except ImportError:  # pragma: no cover
    PROCESS_START = time.time()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from _common import ROOT, record, table  # noqa: E402

CONFIG = "examples/sentiment/sentiment.yaml"


# --------------------------------------------------------------------------- config and pairs


def load_run_config(path: str):
    """The example's RunConfig with absolute paths (relative ones resolve from the repo root)."""
    from ray_dpo.config import load_config, with_absolute_paths

    os.chdir(ROOT)
    return with_absolute_paths(load_config(path))


def ray_dpo_pairs(cfg) -> tuple[list[dict], list[dict]]:
    """(text rows, ray_dpo token rows) of the pairs ray_dpo keeps, in its epoch-0 order.

    PairTokenizer is the code ray_dpo's tokenize stage runs; the order is BatchFeeder's
    permutation np.random.default_rng([seed, epoch]) over the kept pairs in file order.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from ray_dpo.data.tokenize import PairTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.name_or_path)
    encode = PairTokenizer(tokenizer, cfg.data)
    texts, tokens = [], []
    for path in cfg.data.train_files:
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                row = json.loads(raw)
                result = encode.tokenize_raw_row(row, source=os.path.basename(path), line=line)
                if result.row is not None:
                    texts.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
                    tokens.append(result.row)
    order = np.random.default_rng([cfg.run.seed, 0]).permutation(len(tokens)) if cfg.data.shuffle \
        else np.arange(len(tokens))
    return [texts[i] for i in order], [tokens[i] for i in order]


def check_ledger(cfg, run_name: str, tokens: list[dict], steps: int) -> str:
    """Whether the first `steps` batches equal the ray_dpo run's ledger (pair ids per step)."""
    path = os.path.join(cfg.run.storage_path, run_name, "ledger.jsonl")
    if not os.path.exists(path):
        return f"batch order: no ledger at {path} to check against"
    batch = cfg.policy.num_workers * cfg.policy.micro_batch_size * cfg.policy.gradient_accumulation_steps
    with open(path, encoding="utf-8") as f:
        ledger = {e["step"]: sorted(e["pair_ids"]) for e in map(json.loads, f)}
    mine = {s + 1: sorted(r["pair_id"] for r in tokens[s * batch:(s + 1) * batch]) for s in range(steps)}
    same = [s for s in mine if ledger.get(s) == mine[s]]
    return f"batch order: {len(same)}/{len(mine)} TRL steps hold the same pairs as {run_name}'s ledger"


def token_differences(trl_rows, tokens: list[dict]) -> str:
    """How TRL's own tokenization of the rows differs from ray_dpo's (same order)."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    diff = [i for i, (a, b) in enumerate(zip(trl_rows, tokens)) if any(list(a[k]) != list(b[k]) for k in keys)]
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in tokens)
    longest_prompt = max(len(r["prompt_ids"]) for r in tokens)
    note = (f"tokenization: TRL's token ids equal ray_dpo's for {len(tokens) - len(diff)}/{len(tokens)} pairs; "
            f"longest ray_dpo prompt {longest_prompt} tokens, longest pair {longest} (so neither side truncates)")
    if diff:
        r, t = trl_rows[diff[0]], tokens[diff[0]]
        note += (f"; e.g. {t['pair_id']}: TRL prompt ends {list(r['prompt_ids'][-2:])} + chosen starts "
                 f"{list(r['chosen_ids'][:2])}, ray_dpo {t['prompt_ids'][-2:]} + {t['chosen_ids'][:2]} "
                 "(a response not starting with a space merges with the prompt's last token in TRL's "
                 "prompt+response tokenization; ray_dpo tokenizes the two apart)")
    return note


# --------------------------------------------------------------------------- TRL


def _trl_classes():
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.step_end: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end.append(time.time())

    class InOrder(DPOTrainer):
        """DPOTrainer on the rows in the given order (ray_dpo's batches), timing the precompute."""

        ref_seconds = 0.0

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.time()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.ref_seconds += time.time() - t0
            return out

    return Timer, InOrder


def _trl_config(cfg, out_dir: str, steps: int):
    from trl import DPOConfig

    p = cfg.policy
    return DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=p.num_workers * p.micro_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps, num_train_epochs=p.num_epochs,
        max_steps=steps, beta=cfg.loss.beta, loss_type=[cfg.loss.type], max_grad_norm=p.max_grad_norm,
        max_length=cfg.data.max_length, truncation_mode="keep_start",
        precompute_ref_log_probs=cfg.reference.precompute, precompute_ref_batch_size=cfg.reference.batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing, use_cpu=True, bf16=False, fp16=False,
        eval_strategy="no", save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=cfg.run.seed, data_seed=cfg.run.seed,
    )


def _ray_dpo_optimizer(model, cfg, total_steps: int):
    """ray_dpo's optimizer and LR schedule (policy/worker.py setup_engine), handed to Trainer."""
    from ray_dpo.policy.ds_config import lr_lambda

    p = cfg.policy
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, betas=tuple(p.adam_betas),
                                  weight_decay=p.weight_decay)
    schedule = {"warmup_steps": p.warmup_steps, "total_steps": total_steps, "schedule": p.lr_scheduler}
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, **schedule))


def run_trl(cfg, texts: list[dict], tokens: list[dict], out_dir: str, max_steps: int | None) -> dict:
    """Train with TRL on `texts` (in order), save to out_dir; timings and logged losses."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Timer, InOrder = _trl_classes()
    batch = cfg.policy.num_workers * cfg.policy.micro_batch_size * cfg.policy.gradient_accumulation_steps
    steps = math.ceil(len(texts) / batch) * cfg.policy.num_epochs
    steps = min(steps, max_steps) if max_steps else steps
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype, **extra)
    timer = Timer()
    trainer = InOrder(model=model, args=_trl_config(cfg, out_dir, steps), train_dataset=Dataset.from_list(texts),
                      processing_class=tokenizer, callbacks=[timer],
                      optimizers=_ray_dpo_optimizer(model, cfg, steps))
    ready = time.time()
    trainer.train()
    trainer.save_model(out_dir)
    tokens_note = token_differences(trainer.train_dataset, tokens)
    if len(trainer.train_dataset) != len(texts):
        tokens_note += f"; TRL dropped {len(texts) - len(trainer.train_dataset)} rows (prompt >= max_length)"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ends = timer.step_end
    return {"steps": len(ends), "ready_s": ready - PROCESS_START, "ref_s": trainer.ref_seconds,
            "step1_s": ends[0] - ready, "wall_s": ends[-1] - PROCESS_START,
            "s_per_step": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan"),
            "loss_first": losses[0], "loss_last": losses[-1], "out_dir": out_dir, "tokens_note": tokens_note}
