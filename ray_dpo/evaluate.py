"""``ray-dpo eval CONFIG --model PATH``: any model measured with a run config's yardstick.

One evaluation, as a training run's at step 0, of the model at PATH (a Hugging Face
directory: a base model, a TRL-trained or merged model, or a LoRA adapter directory, merged
into its base first):

    held-out (eval.prompts_file)  a PolicyFollower whose engines load PATH samples the same
                                  prompts with the same seeds and sampling, the same judge
                                  scores them, and the config's reference (reference.model or
                                  model.name_or_path) gives eval/kl; the engines are checked on
                                  the probe against a ReferenceGroup loaded from PATH first
    pairs (data.eval_files)       that group scores chosen / rejected under PATH, the reference
                                  group under the reference, and the config's loss turns them
                                  into eval/loss, eval/rewards/* as the policy workers do
                                  (eval_pair_metrics)

logged to its own MLflow run in the config's experiment (tag ray_dpo.mode=eval), so
``ray-dpo compare`` puts it beside the training runs. Prompts and pairs are tokenized with
the config's tokenizer and chat template (model.tokenizer, else model.name_or_path): every
model is scored on the same token ids.

``--chat``: an interactive loop on the model (stdin lines -> replies, its own chat template,
transformers generate on CPU, no Ray).

    command(cfg, model=, name=, chat=) -> exit code        what cmd_eval runs
    evaluate_model(cfg, model_path, name=) -> EvalSummary
    eval_pair_metrics(loss, rows, policy, reference, num_workers=, micro_batch_size=) -> eval/...
    chat(cfg, model_path, stdin=, stdout=)

Heavy imports (ray, torch, transformers) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence, TextIO

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
MODE = "eval"
MODEL_TAG = "ray_dpo.eval.model"
# The console's summary, in this order (those the eval logged).
SUMMARY_METRICS = ("eval/judge_score", "eval/kl", "eval/response_len", "eval/loss", "eval/rewards/accuracies",
                   "eval/rewards/margins", "sync/max_logprob_diff")


class EvalInputError(ValueError):
    """The command line or config cannot be evaluated (exit 2); the message says what to fix."""


@dataclasses.dataclass
class EvalSummary:
    run_id: str
    tracking_uri: str
    experiment: str
    model: str
    metrics: dict
    seconds: float
    pairs: int = 0
    """data.eval_files pairs scored (0: none)."""


# --------------------------------------------------------------------------- the command


def command(cfg: Any, *, model: str, name: Optional[str] = None, chat_mode: bool = False) -> int:
    """``ray-dpo eval``: the exit code (0 done, 1 the eval failed, 2 bad input)."""
    try:
        if chat_mode:
            chat(cfg, model)
            return EXIT_OK
        summary = evaluate_model(cfg, model, name=name)
    except EvalInputError as err:
        print(f"[ray_dpo] {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("[ray_dpo] interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # the MLflow run is already marked FAILED
        print(f"[ray_dpo] eval failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(summary)
    return EXIT_OK


def print_summary(s: EvalSummary) -> None:
    print(f"[ray_dpo] eval done in {s.seconds:.0f}s: {s.model}")
    for key in SUMMARY_METRICS:
        if key not in s.metrics:
            continue
        se = s.metrics.get(f"{key}_se")
        spread = f" ± {se:.4f}" if se is not None else ""
        unit = " nats/sequence" if key == "eval/kl" else " tokens" if key == "eval/response_len" else ""
        if key == "eval/judge_score" and "eval/samples" in s.metrics:
            unit = f" ({int(s.metrics['eval/samples'])} held-out samples)"
        if key == "eval/loss":
            unit = f" ({s.pairs} data.eval_files rows)"
        if key == "sync/max_logprob_diff":
            print(f"[ray_dpo]   {key} = {s.metrics[key]:.2e} (the engines against transformers on the probe)")
            continue
        print(f"[ray_dpo]   {key} = {s.metrics[key]:.4f}{spread}{unit}")
    print(f"[ray_dpo] MLflow run id: {s.run_id} (experiment {s.experiment!r}, tag ray_dpo.mode=eval)")
    print(f"[ray_dpo] beside the runs: ray-dpo compare --experiment {s.experiment} --tracking-uri {s.tracking_uri}")


# --------------------------------------------------------------------------- inputs


def check_inputs(cfg: Any, model_path: str, *, chat_mode: bool = False) -> str:
    """The model path, absolute if local; EvalInputError for a path that is not a model or
    adapter directory, or (unless chatting) a config with nothing to evaluate on."""
    from ray_dpo.config.paths import looks_local

    if not chat_mode and not cfg.eval.prompts_file and not cfg.data.eval_files:
        raise EvalInputError(
            "the config sets neither eval.prompts_file (held-out prompts: eval/judge_score, eval/kl) nor "
            "data.eval_files (preference pairs: eval/loss, eval/rewards/*): set one, e.g. "
            "--set eval.prompts_file=PROMPTS.jsonl --set eval.judge.function=package.module:function")
    if not looks_local(model_path):
        return model_path  # a hub id: transformers and the engines resolve it
    path = os.path.abspath(os.path.expanduser(model_path))
    if not os.path.isdir(path):
        raise EvalInputError(
            f"--model {model_path}: no such directory; pass a Hugging Face model directory (with config.json, "
            "e.g. a run's checkpoint hf_model/) or a LoRA adapter directory (with adapter_config.json, e.g. a "
            "LoRA run's adapter/)")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        raise EvalInputError(
            f"--model {model_path}: holds neither config.json (a Hugging Face model) nor adapter_config.json "
            "(a LoRA adapter); pass the directory save_pretrained wrote (e.g. a run's checkpoint hf_model/ "
            "or adapter/)")
    return path


def adapter_base(cfg: Any, adapter_dir: str) -> str:
    """The base model of a LoRA adapter directory: the one its adapter_config.json names if it
    exists here, else the config's model.name_or_path; EvalInputError if neither does."""
    from ray_dpo.config.paths import looks_local

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        named = json.load(f).get("base_model_name_or_path")
    for base in (named, cfg.model.name_or_path):
        if base and (os.path.exists(base) or not looks_local(base)):
            return base
    raise EvalInputError(
        f"--model {adapter_dir}: its base model {named!r} (adapter_config.json) is not here, nor is "
        f"model.name_or_path {cfg.model.name_or_path!r}: --set model.name_or_path=BASE, the model the adapter "
        "was trained on")


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


@contextlib.contextmanager
def plain_model(cfg: Any, model_path: str, *, scratch: str) -> Iterator[str]:
    """A Hugging Face model directory for ``model_path``: itself, or for a LoRA adapter
    directory its base with the adapter merged in (lora.merge_adapter), written under
    ``scratch`` (where every node reads it: the run's storage root) and removed afterwards."""
    if not is_adapter(model_path):
        yield model_path
        return
    import shutil
    import uuid

    from ray_dpo.data.chat_template import export_tokenizer
    from ray_dpo.lora import merge_adapter

    base = adapter_base(cfg, model_path)
    out = os.path.join(scratch, f"eval-merged-{uuid.uuid4().hex[:8]}")
    print(f"[ray_dpo] LoRA adapter: merging {model_path} into its base {base} ({out}, removed afterwards)",
          flush=True)
    try:
        merge_adapter(dataclasses.replace(cfg.model, name_or_path=base), model_path, out)
        has_tokenizer = os.path.exists(os.path.join(model_path, "tokenizer_config.json"))
        export_tokenizer(model_path if has_tokenizer else (cfg.model.tokenizer or base), out)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _tokenizer_note(model_dir: str, tokenizer_path: str) -> Optional[str]:
    """A warning when the model's own tokenizer has another vocabulary than the config's."""
    if not os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):
        return None
    from ray_dpo.data.tokenizer_cache import load_tokenizer

    try:
        own, config = len(load_tokenizer(model_dir)), len(load_tokenizer(tokenizer_path))
    except Exception:  # noqa: BLE001 - only a note
        return None
    if own == config:
        return None
    return (f"the model's tokenizer has {own} tokens, the config's ({tokenizer_path}) {config}: prompts and "
            "pairs are tokenized with the config's, so eval/kl and the rewards assume the same vocabulary")


# --------------------------------------------------------------------------- evaluation


def evaluate_model(cfg: Any, model_path: str, *, name: Optional[str] = None) -> EvalSummary:
    """The held-out eval and / or the pair metrics of the model at ``model_path`` (see the
    module docstring), logged to a new MLflow run; raises EvalInputError for bad input."""
    from ray_dpo.config import with_absolute_paths

    t0 = time.monotonic()
    cfg = with_absolute_paths(cfg)
    model_path = check_inputs(cfg, model_path)
    if is_adapter(model_path):
        adapter_base(cfg, model_path)  # a missing base is bad input, before Ray starts
    from ray_dpo.driver import init_ray, storage_root, use_gpus

    storage = storage_root(cfg)
    if "://" in storage:  # an object store: a merged adapter goes to this host's temp directory
        import tempfile

        scratch = tempfile.gettempdir()
    else:
        scratch = storage
        os.makedirs(scratch, exist_ok=True)
    init_ray(cfg)
    gpu = use_gpus(cfg)
    tracker = _open_run(cfg, model_path, name=name, storage=storage)
    try:
        with plain_model(cfg, model_path, scratch=scratch) as model_dir:
            pairs = _evaluate(cfg, model_dir, tracker, gpu=gpu)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    metrics = dict(tracker.client.get_run(tracker.run_id).data.metrics)
    return EvalSummary(run_id=tracker.run_id, tracking_uri=tracker.uri, experiment=cfg.tracking.mlflow.experiment,
                       model=model_path, metrics=metrics, seconds=time.monotonic() - t0, pairs=pairs)


def _open_run(cfg: Any, model_path: str, *, name: Optional[str], storage: str):
    """A new MLflow run in the config's experiment (the driver's store resolution), with the
    flattened config as params and tags ray_dpo.mode=eval, ray_dpo.eval.model=PATH."""
    from ray_dpo.config import flatten, to_yaml
    from ray_dpo.loss_rules import needs_reference
    from ray_dpo.tracking.mlflow_sink import MLflowRun, resolve_tracking_uri

    local = "://" not in storage
    tracker = MLflowRun.open(
        uri=resolve_tracking_uri(cfg.tracking.mlflow, storage), experiment=cfg.tracking.mlflow.experiment,
        run_name=name or f"eval-{os.path.basename(model_path.rstrip('/')) or model_path}",
        artifact_root=os.path.join(storage, "mlartifacts") if local else None)
    tracker.set_tags({"ray_dpo.mode": MODE, MODEL_TAG: model_path, "ray_dpo.run_name": cfg.run.name,
                      "ray_dpo.loss": cfg.loss.type,
                      "ray_dpo.eval.reference": cfg.reference.model or cfg.model.name_or_path,
                      **cfg.tracking.mlflow.tags})
    tracker.log_params(flatten(cfg))
    tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
    print(f"[ray_dpo] eval of {model_path}: MLflow run {tracker.run_id} in {tracker.uri}", flush=True)
    if needs_reference(cfg) or cfg.eval.prompts_file:
        print(f"[ray_dpo] reference: {cfg.reference.model or cfg.model.name_or_path} "
              f"({'reference.model' if cfg.reference.model else 'model.name_or_path'}); loss.type={cfg.loss.type}",
              flush=True)
    else:
        print(f"[ray_dpo] reference: none (loss.type={cfg.loss.type} is reference-free)", flush=True)
    return tracker


def _evaluate(cfg: Any, model_dir: str, tracker, *, gpu: bool) -> int:
    """Start the groups and engines, evaluate, log; returns the number of pairs scored."""
    from ray_dpo.driver import close_follower, reference_group_kwargs
    from ray_dpo.loss_rules import needs_reference
    from ray_dpo.reference import ReferenceGroup

    tokenizer = cfg.model.tokenizer or cfg.model.name_or_path
    if note := _tokenizer_note(model_dir, tokenizer):
        print(f"[ray_dpo] warning: {note}", flush=True)
    evaluation = _eval_pairs(cfg, tokenizer) if cfg.data.eval_files else None
    kwargs = reference_group_kwargs(cfg, gpu)
    wants_reference = bool(cfg.eval.prompts_file) or (evaluation is not None and needs_reference(cfg))
    groups, follower = [], None
    try:
        reference = ReferenceGroup(**kwargs) if wants_reference else None
        groups.append(reference)
        same = reference is not None and _same_path(model_dir, kwargs["model_path"])
        scorer = reference if same else ReferenceGroup(**{**kwargs, "model_path": model_dir},
                                                       name_prefix="ray_dpo-eval-model")
        groups.append(scorer)
        if cfg.eval.prompts_file:
            follower = _heldout(cfg, model_dir, tokenizer, reference=reference, scorer=scorer, tracker=tracker,
                                gpu=gpu)
        if evaluation is not None:
            metrics = _pair_metrics(cfg, evaluation, scorer=scorer, reference=reference)
            tracker.log_metrics(metrics, step=0)
        if follower is not None:
            import ray

            ray.get(follower.finish.remote())  # the held-out eval, still being judged and scored
    finally:
        if follower is not None:
            close_follower(follower)
        for group in {id(g): g for g in groups if g is not None}.values():
            group.shutdown()
    return len(evaluation) if evaluation is not None else 0


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) if os.path.exists(a) and os.path.exists(b) else a == b


def _heldout(cfg: Any, model_dir: str, tokenizer: str, *, reference, scorer, tracker, gpu: bool):
    """A PolicyFollower whose engines load ``model_dir``, checked on the probe against
    ``scorer`` (the model under transformers) and then evaluating step 0, as a training run's
    engines do at its start. Returns the follower (finish() waits for the eval)."""
    import ray

    from ray_dpo.config import LoraSection
    from ray_dpo.driver import close_follower
    from ray_dpo.engines.evaluation import as_pair_rows
    from ray_dpo.engines.follower import start_follower

    # The engines serve the model itself (no adapter syncs); the prompts keep the config's tokens.
    as_model = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name_or_path=model_dir, tokenizer=tokenizer),
        policy=dataclasses.replace(cfg.policy, lora=LoraSection()))
    follower = start_follower(as_model, reference=reference, total_steps=0, tracking_uri=tracker.uri,
                              run_id=tracker.run_id, use_gpu=gpu)
    try:
        probe = ray.get(follower.probe.remote())
        rows = as_pair_rows([p for p, _ in probe], [c for _, c in probe], id_prefix="probe:")
        expected = [r["ref_chosen_logp"] for r in scorer.score(rows)]
        ray.get(follower.advance.remote(0, None, expected))  # verify the engines, start the step-0 eval
    except BaseException:
        close_follower(follower)
        raise
    return follower


def _eval_pairs(cfg: Any, tokenizer: str) -> list[dict]:
    """data.eval_files as a training run's feeder serves them: tokenized (config tokenizer and
    template), the first eval.max_pairs, in file order."""
    from ray_dpo.data.files import expand_files
    from ray_dpo.data.pipeline import build_pair_data
    from ray_dpo.feeder.store import PairStore
    from ray_dpo.loss_rules import prompt_only_refusal, trains_unpaired

    files = expand_files(cfg.data.eval_files, key="data.eval_files")
    data = build_pair_data(files, tokenizer_path=tokenizer, data=cfg.data, chat_template=cfg.model.chat_template,
                           name="eval", unpaired=trains_unpaired(cfg),
                           refuse_prompt_only=prompt_only_refusal(cfg.online, key="data.eval_files"))
    store = PairStore.from_source(data)
    if cfg.eval.max_pairs is not None:
        store = store.limit(cfg.eval.max_pairs)
    if len(store) == 0:
        raise EvalInputError(f"data.eval_files: no usable pair in {len(files)} file(s); counters: "
                             f"{data.counters.as_dict()}")
    print(f"[ray_dpo] data.eval_files: {len(store)} {'examples' if trains_unpaired(cfg) else 'pairs'} "
          f"from {len(files)} file(s)", flush=True)
    return [store.row(i) for i in range(len(store))]


def _score(group, rows: list[dict], batch_size: int) -> list[tuple[float, float]]:
    batches = (rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for batch in group.score_batches(batches) for r in batch]


def _pair_metrics(cfg: Any, rows: list[dict], *, scorer, reference) -> dict[str, float]:
    from ray_dpo.loss_rules import needs_reference

    size = cfg.reference.batch_size
    policy = _score(scorer, rows, size)
    ref = _score(reference, rows, size) if needs_reference(cfg) else None
    return eval_pair_metrics(cfg.loss, rows, policy, ref, num_workers=cfg.policy.num_workers,
                             micro_batch_size=cfg.policy.micro_batch_size)


def eval_forwards(n: int, *, num_workers: int, micro_batch_size: int) -> list[list[int]]:
    """The eval rows of each forward of a training run's eval, all ranks together: rank r
    holds rows r, r + W, ... (BatchFeeder.get_eval) in micro-batches, and forward i runs every
    rank's i-th micro-batch at once (what KTO's z_ref averages over)."""
    mine = [list(range(r, n, num_workers)) for r in range(num_workers)]
    count = math.ceil(math.ceil(n / num_workers) / micro_batch_size) if n else 0
    out = [[j for rows in mine for j in rows[i * micro_batch_size:(i + 1) * micro_batch_size]] for i in range(count)]
    return [f for f in out if f]


def eval_pair_metrics(loss: Any, rows: Sequence[dict], policy: Sequence[tuple[float, float]],
                      reference: Optional[Sequence[tuple[float, float]]], *, num_workers: int,
                      micro_batch_size: int) -> dict[str, float]:
    """eval/loss, eval/rewards/*, eval/logps/* (and the loss's own eval/... metrics) of pair
    (or KTO example) ``rows``, from summed log-probs (chosen, rejected) under the model
    (``policy``) and the reference (None for a reference-free loss): the losses.dpo_loss and
    step_metrics code the policy workers' evaluate() runs, on the same forwards."""
    import torch

    from ray_dpo.batching.logps import mean_nll
    from ray_dpo.batching.padded import TokenCounts
    from ray_dpo.losses import dpo_loss, kto_kl, loss_spec
    from ray_dpo.policy.step_metrics import loss_metrics, metric_sums, sum_names

    spec = loss_spec(loss.type)
    sums = torch.zeros(len(sum_names(spec)), dtype=torch.float64)
    for forward in eval_forwards(len(rows), num_workers=num_workers, micro_batch_size=micro_batch_size):
        pc, pr = (torch.tensor([policy[i][k] for i in forward], dtype=torch.float32) for k in (0, 1))
        rc = rr = None
        if spec.needs_reference:
            rc, rr = (torch.tensor([reference[i][k] for i in forward], dtype=torch.float32) for k in (0, 1))
        n_c, n_r = (torch.tensor([len(rows[i][key]) for i in forward]) for key in ("chosen_ids", "rejected_ids"))
        labels = kl = None
        if spec.data == "unpaired":
            labels = torch.tensor([bool(rows[i].get("label", True)) for i in forward])
            kl = kto_kl(pr - rr)
        out = dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                       ref_rejected_logps=rr, config=loss, chosen_n_tokens=n_c, rejected_n_tokens=n_r,
                       policy_chosen_nll=mean_nll(pc, n_c) if loss.sft_weight > 0 else None, labels=labels, kl=kl)
        sums += metric_sums(spec, out, TokenCounts(0, 0))
    return loss_metrics(spec, "eval", dict(zip(sum_names(spec), sums.tolist())))


# --------------------------------------------------------------------------- --chat


def load_chat_model(cfg: Any, model_path: str):
    """(tokenizer, model) on CPU: a model directory, or a LoRA adapter on its base (peft). The
    tokenizer is the directory's own (else the config's), its chat template the tokenizer's
    (else model.chat_template); EvalInputError without one."""
    from transformers import AutoModelForCausalLM

    from ray_dpo.data.chat_template import resolve_chat_template
    from ray_dpo.data.tokenizer_cache import load_tokenizer
    from ray_dpo.dtypes import torch_dtype

    own = os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) or not os.path.isdir(model_path)
    base = adapter_base(cfg, model_path) if is_adapter(model_path) else model_path
    tokenizer = load_tokenizer(model_path if own else (cfg.model.tokenizer or base))
    if not tokenizer.chat_template:
        tokenizer.chat_template = resolve_chat_template(cfg.model.chat_template)
    if not tokenizer.chat_template:
        raise EvalInputError(f"--model {model_path}: its tokenizer has no chat template; set model.chat_template "
                             "(a Jinja file, or --set 'model.chat_template={% for m in messages %}...')")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(cfg.model.dtype),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    if base != model_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_path)
    model.eval()
    return tokenizer, model


def reply(tokenizer: Any, model: Any, messages: list[dict], *, sampling: Any, seed: int) -> str:
    """The model's next assistant turn after ``messages``, as text: sampled with ``sampling``
    (a SamplingConfig; temperature 0 is greedy) from torch seed ``seed``."""
    import torch

    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": False}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, **options)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat(cfg: Any, model_path: str, *, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> None:
    """Read user turns from ``stdin`` (one per line), write each reply to ``stdout`` (one line).
    The conversation is kept; "/reset" starts a new one, "/exit" or end of input ends it.
    Replies sample as the config's generation does (online.sampling's temperature and top_p,
    temperature 0: greedy; the held-out eval's max_new_tokens), turn k from seed run.seed + k,
    so the same input gives the same conversation."""
    from ray_dpo.engines.spec import heldout_sampling

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model_path = check_inputs(cfg, model_path, chat_mode=True)
    tokenizer, model = load_chat_model(cfg, model_path)
    sampling = heldout_sampling(cfg)
    how = "greedy" if sampling.temperature <= 0 else f"temperature {sampling.temperature:g}, top_p {sampling.top_p:g}"
    print(f"[ray_dpo] chat with {model_path} ({how}, up to {sampling.max_new_tokens} new tokens): one line per "
          "turn, /reset starts over, /exit or Ctrl+D ends", file=sys.stderr, flush=True)
    interactive = stdin.isatty()
    messages: list[dict] = []
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages, turn = [], 0
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(tokenizer, model, messages, sampling=sampling, seed=cfg.run.seed + turn)
        messages.append({"role": "assistant", "content": answer})
        turn += 1
        print(answer, file=stdout, flush=True)
