"""Function judges without Ray: import-path loading, its errors, scoring and score checks."""

import math

import pytest

from ray_dpo.config import JudgeConfig
from ray_dpo.engines.judges import (
    FunctionJudge,
    JudgeError,
    build_judge,
    check_scores,
    judge_kinds,
    load_function_judge,
    reward_model_text,
)
from ray_dpo.testing.assets import judge_score


def test_load_function_judge_returns_the_function():
    assert load_function_judge("ray_dpo.testing.assets:judge_score") is judge_score


def test_load_function_judge_accepts_a_dotted_attribute():
    fn = load_function_judge("ray_dpo.engines.judges:FunctionJudge.score")
    assert fn is FunctionJudge.score


@pytest.mark.parametrize("spec", ["ray_dpo.testing.assets.judge_score", "a:b:c", ":judge_score", "mod:"])
def test_malformed_spec_names_the_key_and_the_format(spec):
    with pytest.raises(JudgeError, match=r"online\.judge\.function: .*'package\.module:function'"):
        load_function_judge(spec)


def test_missing_module_names_key_and_module():
    with pytest.raises(JudgeError, match=r"online\.judge\.function: module 'no_such_pkg\.judges' not found"):
        load_function_judge("no_such_pkg.judges:score")


def test_a_judge_module_that_moved_to_the_engines_package_says_where():
    with pytest.raises(JudgeError, match=r"'ray_dpo\.online\.sentiment' has moved to 'ray_dpo\.engines\.sentiment'; "
                                         r"set online\.judge\.function: ray_dpo\.engines\.sentiment:positive_sentiment"):
        load_function_judge("ray_dpo.online.sentiment:positive_sentiment")
    with pytest.raises(JudgeError, match="not found"):
        load_function_judge("ray_dpo.online.no_such_module:f")


def test_missing_dependency_of_the_judge_module_is_told_apart(tmp_path, monkeypatch):
    (tmp_path / "my_judge_mod.py").write_text("import not_installed_dep_xyz\n\ndef score(p, c):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(JudgeError, match=r"importing module 'my_judge_mod' failed: it needs 'not_installed_dep_xyz'"):
        load_function_judge("my_judge_mod:score")


def test_module_that_raises_at_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "my_broken_judge.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(JudgeError, match=r"online\.judge\.function: importing module 'my_broken_judge' raised "
                                         r"RuntimeError: boom at import"):
        load_function_judge("my_broken_judge:score")


def test_missing_attribute_suggests_close_names():
    with pytest.raises(JudgeError, match=r"online\.judge\.function: module 'ray_dpo\.testing\.assets' has no "
                                         r"attribute 'judge_scor'; did you mean 'judge_score'"):
        load_function_judge("ray_dpo.testing.assets:judge_scor")


def test_not_callable_is_rejected():
    with pytest.raises(JudgeError, match=r"online\.judge\.function: .*GOOD_WORDS' is a tuple, not a function"):
        load_function_judge("ray_dpo.testing.assets:GOOD_WORDS")


def test_function_judge_scores_locally_in_order():
    judge = FunctionJudge("ray_dpo.testing.assets:judge_score")
    scores = judge.score(["p1", "p2", "p3"], ["bright calm", "angry calm river stone", ""])
    assert scores == [1.0, 0.25, 0.0]
    assert judge.name == "ray_dpo.testing.assets:judge_score"


def test_function_judge_takes_a_callable_and_passes_the_prompt():
    judge = FunctionJudge(lambda p, c: float(len(p) - len(c)))
    assert judge.score(["abcd", ["m1", "m2"]], ["ab", "x"]) == [2.0, 1.0]


def test_function_judge_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        FunctionJudge(judge_score).score(["a", "b"], ["c"])


@pytest.mark.parametrize("bad", [float("nan"), math.inf, None, "0.5", True])
def test_non_finite_or_non_number_scores_are_rejected(bad):
    judge = FunctionJudge(lambda p, c: bad if c == "bad" else 0.5)
    with pytest.raises(JudgeError, match=r"returned .* for completion 1; a score must be a finite number"):
        judge.score(["p", "p"], ["ok", "bad"])


def test_a_judge_that_raises_names_the_completion():
    def judge(p, c):
        raise KeyError("oops")

    with pytest.raises(JudgeError, match=r"raised KeyError on completion 0 \(completion 'hello'\)"):
        FunctionJudge(judge).score(["p"], ["hello"])


def test_check_scores_converts_ints_and_numpy():
    np = pytest.importorskip("numpy")
    assert check_scores([1, np.float32(0.5)], 2, name="x") == [1.0, 0.5]
    with pytest.raises(JudgeError, match="returned 1 scores for 2 completions"):
        check_scores([1.0], 2, name="x")


def test_build_judge_picks_the_function_judge_without_ray():
    judge = build_judge(JudgeConfig(function="ray_dpo.testing.assets:judge_score"))
    assert isinstance(judge, FunctionJudge)
    assert judge.score(["p"], ["kind warm"]) == [1.0]


def test_build_judge_needs_exactly_one_judge():
    assert judge_kinds() == ["function", "reward_model"]
    with pytest.raises(JudgeError, match=r"no judge configured; set one of online\.judge\.function, "
                                         r"online\.judge\.reward_model"):
        build_judge(JudgeConfig())
    with pytest.raises(JudgeError, match="set only one of"):
        build_judge(JudgeConfig(function="a.b:c", reward_model="/rm"))


def test_build_judge_fails_early_on_a_bad_function():
    with pytest.raises(JudgeError, match=r"online\.judge\.function: module 'nope' not found"):
        build_judge(JudgeConfig(function="nope:fn"))


class _Tok:
    def __init__(self, template):
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize):
        assert tokenize is False
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)


def test_reward_model_text_uses_the_chat_template_or_plain_lines():
    assert reward_model_text(_Tok("t"), "hi", "yo") == "user:hi|assistant:yo"
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert reward_model_text(_Tok("t"), conv, "yo") == "system:s|user:u|assistant:yo"
    assert reward_model_text(_Tok(None), "hi", "yo") == "hi\nyo"


def test_reward_model_actors_request_the_configured_cpus_gpus_and_resources():
    from ray_dpo.engines.judges import reward_model_actor_options

    config = JudgeConfig(reward_model="/rm", num_cpus_per_actor=3, num_gpus_per_actor=0.5,
                         resources={"judge_node": 0.01})
    opts = reward_model_actor_options(config, use_gpu=True)
    assert (opts["num_cpus"], opts["num_gpus"], opts["resources"]) == (3, 0.5, {"judge_node": 0.01})
    opts["resources"]["judge_node"] = 9  # a copy: the config is not changed through it
    assert config.resources == {"judge_node": 0.01}
    # CPU runs take no GPU; a GPU run with num_gpus_per_actor 0 takes one; an explicit argument wins.
    assert reward_model_actor_options(config, use_gpu=False)["num_gpus"] == 0
    assert reward_model_actor_options(JudgeConfig(reward_model="/rm"), use_gpu=True)["num_gpus"] == 1.0
    assert reward_model_actor_options(config, use_gpu=False, num_cpus_per_actor=0.5)["num_cpus"] == 0.5
    assert reward_model_actor_options(JudgeConfig(), use_gpu=False)["resources"] == {}
