"""Held-out evaluation helpers: prompt loading/selection, KL estimate and eval metrics."""

import json
import math

import pytest

from ray_dpo.config import SamplingConfig
from ray_dpo.online.evaluation import (
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

    from ray_dpo.online.generation import TransformersEngine
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
