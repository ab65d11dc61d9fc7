"""Held-out evaluation helpers: prompt loading/selection, KL estimate and eval metrics."""

import json
import math

import pytest

from ray_dpo.config import SamplingConfig
from ray_dpo.engines.evaluation import (
    Prompt,
    as_pair_rows,
    eval_metrics,
    eval_sampling,
    kl_estimate,
    load_prompts,
    select_prompts,
)


def test_load_prompts_from_jsonl_and_text(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "describe the river", "chosen": "x", "rejected": "y"},
            {"prompt": [{"role": "user", "content": "write a letter"}]}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_prompts(str(path)) == [Prompt("prompts.jsonl:1", "describe the river"),
                                       Prompt("prompts.jsonl:3", rows[1]["prompt"])]
    txt = tmp_path / "prompts.txt"
    txt.write_text("tell a story\n\n  list the boats  \n")
    assert load_prompts(str(txt)) == [Prompt("prompts.txt:1", "tell a story"),
                                      Prompt("prompts.txt:3", "list the boats")]


@pytest.mark.parametrize("line,msg", [("{not json", "not valid JSON"),
                                      ('{"text": "x"}', 'expected an object with "prompt"'),
                                      ('{"prompt": ""}', "non-empty"),
                                      ('{"prompt": [{"role": "user"}]}', "messages")])
def test_load_prompts_names_key_file_and_line(tmp_path, line, msg):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"eval\.prompts_file: .*p\.jsonl line 2: .*{msg}"):
        load_prompts(str(path))


def test_select_prompts_is_seeded_in_file_order_and_caps_at_all():
    prompts = [Prompt(f"f:{i}", f"p{i}") for i in range(100)]
    a = select_prompts(prompts, num=10, seed=3)
    assert a == select_prompts(prompts, num=10, seed=3)
    assert len(a) == 10 and a == sorted(a, key=lambda p: int(p.prompt_id[2:]))
    assert a != select_prompts(prompts, num=10, seed=4)
    assert select_prompts(prompts[:5], num=10, seed=0) == prompts[:5]
    with pytest.raises(ValueError, match="eval.num_prompts must be >= 1"):
        select_prompts(prompts, num=0, seed=0)


def test_eval_sampling_draws_from_the_policy_itself():
    s = eval_sampling(SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=33))
    assert (s.temperature, s.top_p, s.max_new_tokens) == (1.0, 1.0, 33)


def test_kl_estimate_is_the_mean_log_ratio():
    assert kl_estimate([-3.0, -5.0, -2.0], [-4.0, -4.5, -2.0]) == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    assert kl_estimate([-1.0], [-1.0]) == 0.0
    with pytest.raises(ValueError, match="2 policy log-probs but 1 reference"):
        kl_estimate([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="no samples"):
        kl_estimate([], [])
    with pytest.raises(ValueError, match="probability 0"):
        kl_estimate([-1.0], [-math.inf])


def test_eval_metrics_hand_computed():
    m = eval_metrics(scores=[0.2, 0.6], policy_logps=[-3.0, -6.0], ref_logps=[-4.0, -8.0], response_lengths=[2, 4])
    # log-ratios 1.0 and 2.0: std 0.5; standard errors are std / sqrt(2)
    assert m == pytest.approx({"eval/judge_score": 0.4, "eval/judge_score_std": 0.2, "eval/samples": 2.0,
                               "eval/judge_score_se": 0.2 / 2 ** 0.5, "eval/kl": 1.5, "eval/kl_se": 0.5 / 2 ** 0.5,
                               "eval/response_len": 3.0, "eval/kl_per_token": 0.5})
    assert set(eval_metrics(scores=[1.0])) == {"eval/judge_score", "eval/judge_score_std", "eval/judge_score_se",
                                               "eval/samples"}
    with pytest.raises(ValueError, match="both policy_logps and ref_logps"):
        eval_metrics(scores=[1.0], policy_logps=[-1.0])


def test_as_pair_rows_puts_the_sample_in_both_slots():
    rows = as_pair_rows([[1, 5], [1, 6]], [[7, 2], [8]])
    assert rows[1] == {"pair_id": "eval-sample:1", "prompt_ids": [1, 6], "chosen_ids": [8], "rejected_ids": [8],
                       "truncated": False}


def test_kl_on_real_samples_is_zero_for_the_same_model_and_positive_for_another(tiny_assets):
    """Samples of the tiny model (TransformersEngine, no Ray): its logprob_sum is the policy's
    log pi(y|x); against itself the estimate is 0, against a perturbed reference > 0."""
    import torch

    from ray_dpo.engines.generation import TransformersEngine
    from ray_dpo.batching.probe import torch_probe_logps

    engine = TransformersEngine(tiny_assets["model"], seed=0)
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in ("describe the river", "write about a garden")]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # the template adds BOS
    out = engine.generate(prompts, n=8, sampling=eval_sampling(SamplingConfig(max_new_tokens=8)), seed=1)
    probe = [(p, c.token_ids) for p, comps in zip(prompts, out) for c in comps]
    policy = [c.logprob_sum for comps in out for c in comps]
    same = torch_probe_logps(engine.model, probe, pad_token_id=engine.pad_id)
    assert same == pytest.approx(policy, abs=1e-4)
    assert kl_estimate(policy, same) == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ref = torch_probe_logps(engine.model, probe, pad_token_id=engine.pad_id)
    assert kl_estimate(policy, ref) > 0.5


# --------------------------------------------------------------------------- per-sample records


def _record(**overrides):
    from ray_dpo.engines.evaluation import heldout_record

    args = dict(step=8, samples_per_prompt=2, seed=7919, max_new_tokens=16,
                prompts=["describe the river", [{"role": "user", "content": "write a letter"}]],
                scores=[0.2, 0.6, 1.0, 0.0], policy_logps=[-3.0, -6.0, -2.0, -1.0], ref_logps=[-4.0, -8.0, -2.5, -0.5],
                response_lengths=[2, 4, 3, 1])
    return heldout_record(**{**args, **overrides})


def test_heldout_record_groups_the_samples_by_prompt():
    from ray_dpo.engines.evaluation import heldout_artifact_path, prompt_means

    record = _record()
    assert heldout_artifact_path(8) == "heldout/step_000008.json"
    assert {k: record[k] for k in ("step", "samples_per_prompt", "seed", "max_new_tokens")} == {
        "step": 8, "samples_per_prompt": 2, "seed": 7919, "max_new_tokens": 16}
    # log-ratios: -3 - -4 = 1, -6 - -8 = 2 | -2 - -2.5 = 0.5, -1 - -0.5 = -0.5
    assert record["prompts"] == [
        {"prompt": "describe the river", "scores": [0.2, 0.6], "log_ratios": [1.0, 2.0], "response_lengths": [2, 4]},
        {"prompt": [{"role": "user", "content": "write a letter"}], "scores": [1.0, 0.0], "log_ratios": [0.5, -0.5],
         "response_lengths": [3, 1]}]
    assert prompt_means(record, "scores") == pytest.approx([0.4, 0.5])
    # The mean of the per-prompt means is what eval/kl logged (equal samples per prompt).
    kl = eval_metrics(scores=[0.2, 0.6, 1.0, 0.0], policy_logps=[-3.0, -6.0, -2.0, -1.0],
                      ref_logps=[-4.0, -8.0, -2.5, -0.5])["eval/kl"]
    assert sum(prompt_means(record, "log_ratios")) / 2 == pytest.approx(kl) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 prompts x 2 samples but 3 scores"):
        _record(scores=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one of"):
        prompt_means(record, "policy_logps")


def test_read_heldout_record_round_trips_and_says_what_is_wrong():
    from ray_dpo.engines.evaluation import read_heldout_record

    record = _record()
    assert read_heldout_record(json.dumps(record)) == record
    older = {k: v for k, v in record.items() if k != "max_new_tokens"}
    assert read_heldout_record(json.dumps(older))["max_new_tokens"] is None
    short = json.loads(json.dumps(record))
    short["prompts"][1]["log_ratios"] = [0.5]
    for text, msg in [("{", "invalid JSON"), ("[1]", "expected a JSON object"),
                      (json.dumps({**record, "seed": "x"}), "seed is not an integer"),
                      (json.dumps({**record, "prompts": []}), "no prompts"),
                      (json.dumps(short), "prompt 1: log_ratios does not hold 2 values"),
                      (json.dumps(record).replace("0.6", "NaN"), "prompt 0: scores holds a non-number")]:
        with pytest.raises(ValueError, match=f"not a held-out record: {msg}"):
            read_heldout_record(text)


class _Completion:
    def __init__(self, token_ids, logprob_sum):
        self.text, self.token_ids, self.logprob_sum = None, token_ids, logprob_sum


class _Generation:
    """Two prompts x 2 samples, handed back as the engines would (prompt-major)."""

    def submit(self, prompts, *, n, sampling, seed):
        return [[_Completion([7] * (1 + i + j), -1.0 - i - j) for j in range(n)] for i in range(len(prompts))]

    def collect(self, chunks):
        return chunks


class _Judge:
    def score(self, prompts, texts):
        return [len(t) / 10 for t in texts]


class _Reference:
    def score_batches(self, batches):
        return [[{"ref_chosen_logp": -2.0} for _ in batch] for batch in batches]


def test_reference_rows_are_scored_in_batches_and_come_back_in_order():
    from ray_dpo.seams import ReferenceRows

    class Counting:
        sizes: list = []

        def score_batches(self, batches):
            out = []
            for batch in batches:
                self.sizes.append(len(batch))
                out.append([{**row, "ref_chosen_logp": -float(row["i"])} for row in batch])
            return out

    group = Counting()
    scored = ReferenceRows(group, 3).score([{"i": i} for i in range(7)])
    assert group.sizes == [3, 3, 1]
    assert [r["ref_chosen_logp"] for r in scored] == [-float(i) for i in range(7)]


def _evaluator(log_artifact, logged):
    from ray_dpo.config import EvalConfig
    from ray_dpo.engines.heldout import EVAL_SEED_OFFSET, HeldOutEvaluator
    from ray_dpo.seams import ReferenceRows, RunLog, Scorer

    evaluator = HeldOutEvaluator(
        EvalConfig(samples_per_prompt=2), prompts=[("p one", [1, 2]), ("p two", [1, 3])], generation=_Generation(),
        scorer=Scorer(_Judge(), lambda ids: "x" * len(ids)), reference=ReferenceRows(_Reference(), 3),
        sampling=SamplingConfig(temperature=0.5, max_new_tokens=9), seed=3,
        run=RunLog(lambda metrics, step: logged.append((step, metrics)), lambda err: logged.append(("error", err)),
                   log_artifact))
    return evaluator, 3 + EVAL_SEED_OFFSET


def test_every_heldout_eval_writes_its_per_sample_record_next_to_the_means():
    """The evaluator hands its log_artifact the record of the same samples eval/* averaged,
    under heldout/step_<step>.json (fake engines, judge and reference: no Ray)."""
    from ray_dpo.engines.evaluation import prompt_means, read_heldout_record

    logged, written = [], {}
    evaluator, seed = _evaluator(lambda text, path: written.update({path: text}), logged)
    evaluator.start(4)
    evaluator.wait()
    (step, metrics), = logged
    record = read_heldout_record(written["heldout/step_000004.json"])
    assert step == 4 and set(written) == {"heldout/step_000004.json"}
    assert (record["step"], record["samples_per_prompt"], record["seed"], record["max_new_tokens"]) == (4, 2, seed, 9)
    # sample (i, j) has 1 + i + j tokens, log-prob -1 - i - j, reference -2: log-ratio 1 - i - j
    assert [e["prompt"] for e in record["prompts"]] == ["p one", "p two"]
    assert [e["response_lengths"] for e in record["prompts"]] == [[1, 2], [2, 3]]
    assert [e["log_ratios"] for e in record["prompts"]] == [[1.0, 0.0], [0.0, -1.0]]
    assert [e["scores"] for e in record["prompts"]] == [[0.1, 0.2], [0.2, 0.3]]
    assert sum(prompt_means(record, "scores")) / 2 == pytest.approx(metrics["eval/judge_score"])
    assert sum(prompt_means(record, "log_ratios")) / 2 == pytest.approx(metrics["eval/kl"]) == pytest.approx(0.0)


def test_a_record_the_store_refuses_does_not_fail_the_eval(caplog):
    def refuse(text, path):
        raise OSError("artifact store unreachable")

    logged = []
    evaluator, _ = _evaluator(refuse, logged)
    evaluator.start(0)
    evaluator.wait()
    assert [step for step, _ in logged] == [0], "the metrics are logged, no error reaches the run"
    assert "could not write heldout/step_000000.json" in caplog.text and "unreachable" in caplog.text


def test_policy_follower_log_artifact_writes_to_the_run_and_is_a_no_op_without_tracking(tmp_path):
    """What HeldOutEvaluator writes through (PolicyFollower.log_artifact): MlflowClient.log_text
    to the follower's run. Built without __init__ (no engines needed for the logging part)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from ray_dpo.engines.follower import PolicyFollower

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("art", artifact_location=f"file://{tmp_path}/artifacts")
    run_id = client.create_run(exp).info.run_id
    follower = object.__new__(PolicyFollower)
    follower._tracking, follower._client = (uri, run_id), None
    follower.log_artifact('{"a": 1}', "heldout/step_000002.json")
    follower.log({"eval/kl": 0.5}, 2)
    assert [f.path for f in client.list_artifacts(run_id, "heldout")] == ["heldout/step_000002.json"]
    local = client.download_artifacts(run_id, "heldout/step_000002.json", str(tmp_path))
    assert open(local).read() == '{"a": 1}'
    untracked = object.__new__(PolicyFollower)
    untracked._tracking, untracked._client = (None, None), None
    untracked.log_artifact("x", "heldout/step_000000.json")  # no store: nothing happens, nothing raised
    assert untracked._client is None
