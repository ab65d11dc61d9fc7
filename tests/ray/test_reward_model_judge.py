"""Judges on a local Ray cluster: a reward model in its own actors, a function judge in tasks.

The reward model is a tiny random LlamaForSequenceClassification (num_labels=1) built
offline on the tiny tokenizer; its scores in the actors must match this process's
unpadded forward of the same texts, in input order.
"""

from __future__ import annotations

import pytest
import torch

from ray_dpo.config import JudgeConfig
from ray_dpo.engines.judges import JudgeError, RewardModelJudge, build_judge, reward_model_text
from ray_dpo.testing.assets import build_tiny_reward_model

pytestmark = pytest.mark.ray

PROMPTS = ["describe the river", [{"role": "user", "content": "write about a garden"}], "tell a story",
           "list the boat", "sketch a tower"]
COMPLETIONS = ["bright calm kind", "angry", "the river near the bridge and the mountain", "", "witty warm rude"]


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tokenizer) -> str:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", tokenizer, num_labels=1)


def _local_scores(path, tokenizer) -> list[float]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    scores = []
    with torch.inference_mode():
        for p, c in zip(PROMPTS, COMPLETIONS):  # one at a time: no padding involved
            ids = tokenizer(reward_model_text(tokenizer, p, c), return_tensors="pt", add_special_tokens=False)
            scores.append(model(**ids).logits[0, 0].item())
    return scores


def test_reward_model_judge_matches_a_local_forward_in_order(ray_cluster, reward_model, tokenizer):
    expected = _local_scores(reward_model, tokenizer)
    assert len(set(round(s, 5) for s in expected)) == len(expected)  # distinct: order is checked
    judge = RewardModelJudge(model_path=reward_model, config=JudgeConfig(reward_model=reward_model, num_actors=2),
                             batch_size=2)
    try:
        assert judge.num_actors == 2
        scores = judge.score(PROMPTS, COMPLETIONS)
        assert scores == pytest.approx(expected, abs=1e-4)
        assert judge.score([], []) == []
    finally:
        judge.shutdown()


def test_build_judge_starts_reward_model_actors(ray_cluster, reward_model):
    judge = build_judge(JudgeConfig(reward_model=reward_model, num_actors=1))
    try:
        assert isinstance(judge, RewardModelJudge)
        assert len(judge.score(PROMPTS[:2], COMPLETIONS[:2])) == 2
    finally:
        judge.shutdown()


def test_reward_model_with_several_labels_is_refused(ray_cluster, tmp_path, tokenizer):
    path = build_tiny_reward_model(tmp_path / "rm2", tokenizer, num_labels=2)
    with pytest.raises(JudgeError, match=r"online\.judge\.reward_model: .*num_labels=2; a reward model must "
                                         r"output one score"):
        RewardModelJudge(model_path=path, config=JudgeConfig(reward_model=path))
