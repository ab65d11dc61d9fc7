"""Policy workers (ray_dpo.policy.worker) under TorchTrainer: 2 CPU workers, gloo, DeepSpeed.

The workers are fed by `TinyFeeder`, an in-test actor with the BatchFeeder interface
(get_step, num_pairs_in_step, total_steps, get_eval) serving pre-tokenized rows whose
reference log-probs come from the initial model. Why not ray_dpo.feeder.BatchFeeder: these
tests pin the worker's own contract - loss normalisation, collectives with empty
micro-batches, checkpoints - independently of the data pipeline and the reference actors,
and with the reference equal to the initial policy the first loss is exactly ln 2.

Every run is compared, step by step, with a single-process torch computation of the same
global batches (`reference_trajectory`): same model, AdamW, LambdaLR and loss, one mean
over all pairs of the step. A wrong normalisation changes the gradient norm (and, with
uneven micro-batches, the update direction), so both the loss and grad-norm trajectories
would drift.
"""

from __future__ import annotations

import collections
import json
import math
import os

import pytest

# Ray Train blocks ~2 s per report at the default health-check interval (measured); the
# driver's environment must carry this before ray.init (the ray_cluster fixture).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytestmark = pytest.mark.ray

WORLD = 2
TRAIN_METRICS = ["train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                 "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/lr",
                 "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s"]
EVAL_METRICS = ["eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins",
                "eval/rewards/accuracies", "eval/logps/chosen", "eval/logps/rejected"]


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def pair_rows(tiny_assets) -> dict[str, list[dict]]:
    """{"train": 40 rows, "eval": 6 rows}: tokenized synthetic pairs with reference log-probs
    from the initial model (so policy == reference at step 0)."""
    from transformers import AutoTokenizer

    from ray_dpo.testing.assets import make_preference_rows

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])

    def response(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def tokenize(i, row, split):
        return {"pair_id": f"{split}:{i}", "prompt_ids": tok(row["prompt"])["input_ids"],
                "chosen_ids": response(row["chosen"]), "rejected_ids": response(row["rejected"])}

    rows = {split: [tokenize(i, r, split) for i, r in enumerate(make_preference_rows(n, seed=seed))]
            for split, n, seed in (("train", 40, 1), ("eval", 6, 2))}
    model = _load_model(tiny_assets["model"])
    for split in rows:
        chosen, rejected = _policy_logps(model, rows[split])
        for row, c, r in zip(rows[split], chosen.tolist(), rejected.tolist()):
            row.update(ref_chosen_logp=c, ref_rejected_logp=r)
    return rows


def _load_model(path):
    from transformers import AutoModelForCausalLM

    import torch

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _policy_logps(model, pairs):
    from ray_dpo.batching.logps import sequence_logps
    from ray_dpo.batching.padded import concat_pairs, split_pairs

    batch = concat_pairs(pairs, model.config.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return split_pairs(sequence_logps(logits, batch["input_ids"], batch["loss_mask"])[0])


def plan(rows, *, micro, accum, max_steps=None):
    """Feeder steps as [step][rank][micro] lists of rows, in order (no shuffle): micro-batch j
    of rank r takes the (j * WORLD + r)-th slice of `micro` rows of the step, so a partial
    last step leaves whole micro-batches (and whole ranks) empty."""
    per_step = WORLD * micro * accum
    steps = [rows[i:i + per_step] for i in range(0, len(rows), per_step)][:max_steps]
    return [[[s[(j * WORLD + r) * micro:(j * WORLD + r + 1) * micro] for j in range(accum)]
             for r in range(WORLD)] for s in steps]


def make_feeder(steps, eval_rows, *, eval_micro=2):
    """A TinyFeeder actor; eval micro-batches go round-robin to ranks, so ranks get unequal
    counts (3 batches -> 2 on rank 0, 1 on rank 1)."""
    import ray

    @ray.remote(num_cpus=0)
    class TinyFeeder:
        def __init__(self, steps, eval_batches):
            self.steps, self.eval_batches = steps, eval_batches

        def total_steps(self):
            return len(self.steps)

        def steps_per_epoch(self):  # one epoch: the whole plan
            return len(self.steps)

        def get_step(self, step, rank, world=None):
            return self.steps[step][rank]

        def num_pairs_in_step(self, step):
            return sum(len(mb) for rank in self.steps[step] for mb in rank)

        def get_eval(self, rank, world=None):
            return self.eval_batches[rank::WORLD]

    eval_batches = [eval_rows[i:i + eval_micro] for i in range(0, len(eval_rows), eval_micro)]
    return TinyFeeder.remote(steps, eval_batches)


# --------------------------------------------------------------------------- single-process reference


def reference_trajectory(model_path, steps, eval_rows, policy, loss_cfg, *, eval_steps=()):
    """Plain single-process training on the same global batches: the mean loss over all
    pairs of each step, one backward, clip, AdamW, LambdaLR.

    Returns (per step {"loss", "grad_norm", "eval_loss" (after the 1-based steps in
    `eval_steps`)}, the trained model)."""
    import torch

    from ray_dpo.losses import dpo_loss
    from ray_dpo.policy.ds_config import lr_lambda

    model = _load_model(model_path).train()
    opt = torch.optim.AdamW(model.parameters(), lr=policy.learning_rate, betas=tuple(policy.adam_betas),
                            weight_decay=policy.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(
        s, warmup_steps=policy.warmup_steps, total_steps=len(steps), schedule=policy.lr_scheduler))

    def losses(pairs):
        chosen, rejected = _policy_logps(model, pairs)
        ref = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in pairs])
        return dpo_loss(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                        ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1], config=loss_cfg).losses

    out = []
    for k, step in enumerate(steps, start=1):
        loss = losses([row for rank in step for mb in rank for row in mb]).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), policy.max_grad_norm or math.inf)
        opt.step(), sched.step(), opt.zero_grad()
        entry = {"loss": loss.item(), "grad_norm": norm.item()}
        if k in eval_steps:
            with torch.no_grad():
                entry["eval_loss"] = losses(eval_rows).mean().item()
        out.append(entry)
    return out, model


# --------------------------------------------------------------------------- running the trainer


def fit(tmp_path, name, feeder, *, model_path, policy, loss_cfg, eval_every, workers=WORLD):
    """TorchTrainer.fit with 2 workers (or ``workers``); returns (Result, reports), where reports is one
    list per ray.train.report: the metrics dict of each rank."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_dpo.config import ModelConfig
    from ray_dpo.policy.loop_spec import TrainLoopSpec
    from ray_dpo.policy.worker import train_loop_per_worker

    log = tmp_path / f"{name}-reports.jsonl"
    log.unlink(missing_ok=True)  # a resumed run reuses the name: record only this fit
    spec = TrainLoopSpec(model=ModelConfig(name_or_path=model_path, dtype="fp32"), policy=policy, loss=loss_cfg,
                         eval_every=eval_every, feeder=feeder, device="cpu")
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=spec.as_config(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "runs"), callbacks=[_recorder(str(log))]),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    reports = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, reports


def _recorder(path):
    """A Ray Train callback appending every report (all ranks' metrics) to a JSONL file.

    Defined inside a function so cloudpickle ships it by value: the train controller runs in
    another process that cannot import this test module.
    """
    from ray.train import UserCallback

    class Recorder(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    return Recorder()


def policy_config(**kw):
    from ray_dpo.config import PolicyConfig

    base = dict(num_workers=WORLD, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                lr_scheduler="constant", warmup_steps=1, max_grad_norm=100.0)
    return PolicyConfig(**{**base, **kw})


def check_against_reference(reports, expected, *, first_step=1):
    """Every rank reports the same aggregated numbers, equal to the single-process run."""
    assert [r[0]["step"] for r in reports] == list(range(first_step, first_step + len(reports)))
    for ranks in reports:
        step = ranks[0]["step"]
        want = expected[step - 1]
        assert ranks[0]["epoch"] == pytest.approx(step / len(expected)), step
        for key in TRAIN_METRICS + [k for k in EVAL_METRICS if k in ranks[0]]:
            assert math.isfinite(ranks[0][key]), (step, key)
            assert all(r[key] == ranks[0][key] for r in ranks if not key.startswith("perf/")), (step, key)
        assert ranks[0]["train/loss"] == pytest.approx(want["loss"], abs=1e-5), step
        assert ranks[0]["train/grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), step
        assert ("eval/loss" in ranks[0]) == ("eval_loss" in want), step
        if "eval_loss" in want:
            assert ranks[0]["eval/loss"] == pytest.approx(want["eval_loss"], abs=1e-5), step


def check_phase_metrics(reports):
    """perf/<phase>_s are logged every step, non-negative, and within perf/step_time_s (they
    split it); perf/report_s, the gap before a step, from the second step on. Structure, not
    speed: no thresholds on how long anything takes."""
    from ray_dpo.policy.step_metrics import PHASES

    for i, ranks in enumerate(reports):
        for r in ranks:
            phases = [r[f"perf/{p}_s"] for p in PHASES]
            assert all(v >= 0 for v in phases), r
            assert sum(phases) <= r["perf/step_time_s"] + 1e-9, r
            assert ("perf/report_s" in r) == (i > 0) and r.get("perf/report_s", 0.0) >= 0, r


def trained_pair_ids(reports):
    return [pid for ranks in reports for r in ranks for pid in r["pair_ids"]]


# --------------------------------------------------------------------------- tests


def test_first_loss_is_ln2_and_steps_match_single_process_with_empty_micro_batches(
        ray_cluster, tiny_assets, pair_rows, tmp_path):
    from ray_dpo.config import LossConfig

    # 26 rows at 8 per step: 3 full steps, then a partial one of 2 pairs where rank 0 has
    # one full and one EMPTY micro-batch and rank 1 only empty ones.
    rows = pair_rows["train"][:26]
    steps = plan(rows, micro=2, accum=2)
    assert [sum(map(len, rank)) for rank in steps[-1]] == [2, 0]
    policy, loss_cfg = policy_config(zero_stage=0, lr_scheduler="cosine"), LossConfig(beta=0.1)
    feeder = make_feeder(steps, pair_rows["eval"])
    _, reports = fit(tmp_path, "norm", feeder, model_path=tiny_assets["model"], policy=policy,
                     loss_cfg=loss_cfg, eval_every=2)

    assert reports[0][0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    expected, _ = reference_trajectory(tiny_assets["model"], steps, pair_rows["eval"], policy, loss_cfg,
                                       eval_steps={2, 4})
    check_against_reference(reports, expected)
    # Each rank reports the pair ids it trained; together every pair exactly once.
    assert sorted(trained_pair_ids(reports)) == sorted(r["pair_id"] for r in rows)
    assert reports[-1][1]["pair_ids"] == []
    check_phase_metrics(reports)


@pytest.mark.parametrize("stage", [0, pytest.param(1, marks=pytest.mark.extended)])
def test_one_worker_of_an_elastic_pair_trains_each_step_like_the_pair(
        stage, ray_cluster, tiny_assets, pair_rows, tmp_path):
    """policy.num_workers 2 running on 1 (an elastic group that lost a node): the worker
    accumulates 2 x 2 micro-batches, and each step's update is the single-process one over
    the same pairs, as on 2 workers. ZeRO-0 on one rank skips DeepSpeed's all-reduce
    (compat.skip_backward_allreduce): the updates must not change."""
    from ray_dpo.config import LossConfig

    steps = plan(pair_rows["train"][:26], micro=2, accum=2)
    one_rank = [[[mb for rank in step for mb in rank]] for step in steps]  # what world=1 gets
    assert len(one_rank[0][0]) == 4
    policy, loss_cfg = policy_config(zero_stage=stage), LossConfig(beta=0.1)
    _, reports = fit(tmp_path, f"one-of-two-{stage}", make_feeder(one_rank, []), model_path=tiny_assets["model"],
                     policy=policy, loss_cfg=loss_cfg, eval_every=0, workers=1)
    expected, _ = reference_trajectory(tiny_assets["model"], steps, pair_rows["eval"], policy, loss_cfg)
    check_against_reference(reports, expected)
    assert all(r[0]["perf/num_workers"] == 1.0 for r in reports)


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.extended), 3])
def test_zero_stage_trains_like_single_process_and_exports_hf_model(
        stage, ray_cluster, tiny_assets, pair_rows, tmp_path):
    import torch

    from ray_dpo.config import LossConfig

    steps = plan(pair_rows["train"], micro=2, accum=2, max_steps=3)
    policy, loss_cfg = policy_config(zero_stage=stage, max_grad_norm=1.0), LossConfig(beta=0.1)
    feeder = make_feeder(steps, pair_rows["eval"])
    result, reports = fit(tmp_path, f"zero{stage}", feeder, model_path=tiny_assets["model"], policy=policy,
                          loss_cfg=loss_cfg, eval_every=0)

    losses = [r[0]["train/loss"] for r in reports]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1e-3, losses
    expected, reference_model = reference_trajectory(tiny_assets["model"], steps, pair_rows["eval"], policy,
                                                     loss_cfg, eval_steps={3})
    check_against_reference(reports, expected)

    # The final checkpoint holds a loadable Hugging Face model (gathered under ZeRO-3) with
    # the trained weights: those of the single-process run, not the initial ones.
    hf_dir = os.path.join(result.checkpoint.path, "hf_model")
    assert os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
    exported = _load_model(hf_dir).state_dict()
    initial = _load_model(tiny_assets["model"]).state_dict()
    trained = reference_model.state_dict()
    assert exported.keys() == initial.keys()
    changed = [k for k in exported if not torch.equal(exported[k], initial[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > len(exported) // 2
    # Adam steps are ~lr = 1e-2 per weight; float rounding moves a few weights by ~1e-5.
    for key in exported:
        torch.testing.assert_close(exported[key], trained[key], atol=1e-4, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow  # two trainer runs
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.extended
def test_resume_continues_at_the_checkpoint_step(stage, ray_cluster, tiny_assets, pair_rows, tmp_path):
    """ZeRO-2: only rank 0 writes model states; ZeRO-3: every rank writes its own partition."""
    from ray_dpo.config import LossConfig

    steps = plan(pair_rows["train"][:32], micro=2, accum=2)  # 4 full steps
    # warmup_steps=3 with a constant schedule: the LR path depends on the restored scheduler
    # step, but not on how many steps each run plans.
    loss_cfg = LossConfig(beta=0.1)
    first_policy = policy_config(zero_stage=stage, warmup_steps=3, checkpoint_every_steps=2, max_steps=2)
    # The feeder plans all 4 steps; policy.max_steps stops the first run after 2.
    first_result, first = fit(tmp_path, "resume", make_feeder(steps, pair_rows["eval"]),
                              model_path=tiny_assets["model"], policy=first_policy, loss_cfg=loss_cfg,
                              eval_every=0)
    assert [r[0]["step"] for r in first] == [1, 2]
    ckpt_files = os.listdir(os.path.join(first_result.checkpoint.path, "deepspeed", "step2"))
    # Both ranks' optimizer shards were merged into one checkpoint directory.
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)} <= set(ckpt_files)

    second_policy = policy_config(zero_stage=stage, warmup_steps=3, checkpoint_every_steps=2)
    _, second = fit(tmp_path, "resume", make_feeder(steps, pair_rows["eval"]),
                    model_path=tiny_assets["model"], policy=second_policy, loss_cfg=loss_cfg, eval_every=0)
    assert [r[0]["step"] for r in second] == [3, 4]
    counts = collections.Counter(trained_pair_ids(first) + trained_pair_ids(second))
    assert set(counts) == {r["pair_id"] for r in pair_rows["train"][:32]} and set(counts.values()) == {1}
    # Weights, AdamW moments and the LR scheduler came back exactly: the resumed steps match
    # an uninterrupted single-process run. Both runs evaluate at their last step (2 and 4).
    expected, _ = reference_trajectory(tiny_assets["model"], steps, pair_rows["eval"], second_policy,
                                       loss_cfg, eval_steps={2, 4})
    check_against_reference(first, expected)
    check_against_reference(second, expected, first_step=3)


# --------------------------------------------------------------------------- layouts and token budget


def _layout_run(tmp_path, tiny_assets, pair_rows, name, **policy_kw):
    from ray_dpo.config import LossConfig

    steps = plan(pair_rows["train"][:24], micro=3, accum=2)  # 2 steps of 12 pairs
    feeder = make_feeder(steps, pair_rows["eval"])
    _, reports = fit(tmp_path, name, feeder, model_path=tiny_assets["model"],
                     policy=policy_config(**policy_kw), loss_cfg=LossConfig(beta=0.1), eval_every=2)
    return steps, reports


@pytest.mark.extended
def test_packed_prefix_shared_and_token_budget_train_like_padded(ray_cluster, tiny_assets, pair_rows, tmp_path):
    """Same per-step losses, grad norms and eval loss (fp32, 1e-5) for every layout; packed
    and prefix_shared (one row per forward) compute no padding, capped rows some.
    The token-budget run splits each micro-batch into several forwards (a different number
    per rank, so the worker pads with empty ones) under ZeRO-2, and must not change a thing."""
    runs = {}
    for name, kw in [("padded", {}), ("packed", {"layout": "packed"}),
                     ("prefix", {"layout": "prefix_shared"}),
                     ("prefix-rows", {"layout": "prefix_shared", "max_tokens_per_row": 48}),
                     ("budget", {"layout": "packed", "max_tokens_per_micro_batch": 60, "zero_stage": 2})]:
        steps, runs[name] = _layout_run(tmp_path, tiny_assets, pair_rows, f"layout-{name}", **kw)
    padded = runs["padded"]
    assert padded[0][0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    for name, reports in runs.items():
        assert [r[0]["step"] for r in reports] == [1, 2], name
        assert sorted(trained_pair_ids(reports)) == sorted(r["pair_id"] for r in pair_rows["train"][:24]), name
        for got, want in zip(reports, padded):
            for key in ("train/loss", "train/logps/chosen", "train/logps/rejected", "train/rewards/margins"):
                assert got[0][key] == pytest.approx(want[0][key], abs=1e-5), (name, key)
            assert got[0]["train/grad_norm"] == pytest.approx(want[0]["train/grad_norm"], rel=1e-4), name
        assert reports[-1][0]["eval/loss"] == pytest.approx(padded[-1][0]["eval/loss"], abs=1e-5), name
        assert "perf/mfu" not in reports[0][0]  # CPU: no known peak FLOP/s
    fraction = {name: reports[0][0]["perf/padding_fraction"] for name, reports in runs.items()}
    assert 0.1 < fraction["padded"] < 1
    assert fraction["packed"] < fraction["padded"] and fraction["prefix"] < fraction["padded"]
    assert fraction["packed"] == fraction["prefix"] == 0.0  # one row per forward: no padding at all
    assert 0 < fraction["prefix-rows"] < 1  # capped rows: tail padding (much, with 48-token rows)
    # The budget really split the micro-batches, into unequal counts per rank on step 2.
    from ray_dpo.batching.budget import token_budget_micro_batches

    counts = [[sum(len(token_budget_micro_batches(mb, max_tokens=60, layout="packed").micro_batches)
                   for mb in rank) for rank in step] for step in steps]
    assert all(c > 2 for step in counts for c in step) and counts[1][0] != counts[1][1], counts
