"""`ray-dpo eval` against a training run's own evals: the same yardstick for any model.

A two-step offline run of configs/tiny-cpu.yaml with held-out prompts logs eval/judge_score
and eval/kl at steps 0 and 2, and eval/rewards/* on data.eval_files at step 2 (a run
evaluates its pairs every eval.every_steps and at the end, not at step 0). Then `ray-dpo
eval` with the same config on
  - the initial model: its held-out numbers must be the run's step 0, and its pair metrics
    what a step-0 eval of the initial model is (policy = reference: margins 0, loss ln 2);
  - the run's exported hf_model/: its held-out and pair numbers must be the run's step 2.
`ray-dpo compare` then shows both eval runs beside the training run.
"""

from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = "configs/tiny-cpu.yaml"
JUDGE = "ray_dpo.testing.assets:judge_score"
EXPERIMENT = "eval-command"
HELDOUT = ("eval/judge_score", "eval/kl")
PAIRS = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss")


def settings(tiny_assets, root) -> dict:
    return {
        "model.name_or_path": tiny_assets["model"], "data.train_files": f"[{tiny_assets['train_glob']}]",
        "data.eval_files": f"[{tiny_assets['eval_file']}]", "run.storage_path": str(root), "run.name": "trained",
        "tracking.mlflow.experiment": EXPERIMENT, "policy.max_steps": 2, "eval.every_steps": 0,
        "eval.max_pairs": 32, "eval.prompts_file": tiny_assets["eval_file"], "eval.num_prompts": 8,
        "eval.samples_per_prompt": 2, "eval.max_new_tokens": 8, "eval.judge.function": JUDGE,
        "eval.backend": "transformers",
    }


def at(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def eval_run(client, name: str):
    [run] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                               filter_string=f"attributes.run_name = '{name}'")
    return run


def test_eval_command_measures_any_model_as_a_run_does(ray_cluster, tiny_assets, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ray_dpo.cli import main
    from ray_dpo.config import load_config
    from ray_dpo.driver import run_dpo

    overrides = [f"{k}={v}" for k, v in settings(tiny_assets, tmp_path / "runs").items()]
    sets = [arg for o in overrides for arg in ("--set", o)]
    summary = run_dpo(load_config(CONFIG, overrides))
    client = MlflowClient(summary.tracking_uri)
    trained = client.get_run(summary.run_id)
    run_values = {key: at(client, summary.run_id, key) for key in HELDOUT + PAIRS}
    assert sorted(run_values["eval/kl"]) == [0, 2] and sorted(run_values["eval/loss"]) == [2]

    # The initial model: the run's step-0 held-out eval, to 1e-6.
    capsys.readouterr()
    assert main(["eval", CONFIG, "--model", tiny_assets["model"], "--name", "eval-initial", *sets]) == 0
    printed = capsys.readouterr().out
    assert "[ray_dpo]   eval/judge_score = " in printed and "[ray_dpo]   eval/rewards/accuracies = " in printed
    initial = eval_run(client, "eval-initial")
    assert initial.info.status == "FINISHED"
    assert initial.data.tags["ray_dpo.mode"] == "eval"
    assert initial.data.tags["ray_dpo.eval.model"] == tiny_assets["model"]
    assert initial.data.params == trained.data.params, "params: the flattened config, as the run's"
    got = {key: at(client, initial.info.run_id, key) for key in HELDOUT + PAIRS}
    for key in HELDOUT:
        assert list(got[key]) == [0]
        assert got[key][0] == pytest.approx(run_values[key][0], abs=1e-6), key
    # Pairs at step 0: the policy is the reference, as in a run's (not logged) step-0 eval.
    assert got["eval/rewards/margins"][0] == pytest.approx(0.0, abs=1e-6)
    assert got["eval/rewards/accuracies"][0] == 0.0
    assert got["eval/loss"][0] == pytest.approx(math.log(2), abs=1e-6)

    # The trained model, exported by the run: the run's step-2 evals.
    assert main(["eval", CONFIG, "--model", summary.hf_model_path, "--name", "eval-trained", *sets]) == 0
    final = eval_run(client, "eval-trained")
    got = {key: at(client, final.info.run_id, key)[0] for key in HELDOUT + PAIRS}
    expected = {key: run_values[key][2] for key in HELDOUT + PAIRS}
    assert expected["eval/rewards/accuracies"] > 0.5 and expected["eval/rewards/margins"] > 0, expected
    for key in HELDOUT:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), (key, got, expected)
    for key in PAIRS:  # the policy workers' DeepSpeed forward against a reference actor's
        assert got[key] == pytest.approx(expected[key], abs=1e-5), (key, got, expected)

    # `ray-dpo compare`: the eval runs beside the run, in the table and on the frontier.
    capsys.readouterr()
    assert main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", summary.tracking_uri,
                 "--out", str(tmp_path / "compare")]) == 0
    printed = capsys.readouterr().out
    mode = next(line for line in printed.splitlines() if line.startswith("mode "))
    assert mode.split()[1:] == ["offline", "eval", "eval"]
    assert "note:" not in printed, printed  # same held-out settings, every run on both plots
