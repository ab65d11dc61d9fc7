"""`ray-dpo compare` on a real MLflow SQLite store: the table, summary.csv and the PNG plots."""

import os

import pytest

from ray_dpo.cli import main

pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")


def _log(client, run_id, key, points):
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(key, v, 1_700_000_000_000 + s, s) for s, v in points])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment "cmp": an offline and an online run; experiment "bare": train/loss only."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cmp", artifact_location=f"file://{root}/artifacts")
    for name, mode, final_loss, scores in [("tiny-offline", "offline", 0.5, [0.30, 0.42, 0.51]),
                                           ("tiny-online", "online", 0.25, [0.30, 0.55, 0.71])]:
        run_id = client.create_run(exp, run_name=name, tags={"ray_dpo.mode": mode}).info.run_id
        _log(client, run_id, "train/loss", [(s, 0.6931 - (0.6931 - final_loss) * s / 20) for s in range(1, 21)])
        _log(client, run_id, "train/rewards/accuracies", [(s, min(1.0, 0.5 + s / 30)) for s in range(1, 21)])
        _log(client, run_id, "eval/loss", [(0, 0.6931), (10, 0.6), (20, final_loss + 0.05)])
        _log(client, run_id, "eval/judge_score", list(zip([0, 10, 20], scores)))
        _log(client, run_id, "eval/kl", [(0, 0.0), (10, 0.8 if mode == "offline" else 1.1),
                                         (20, 1.5 if mode == "offline" else 2.4)])
        if mode == "online":
            _log(client, run_id, "online/pairs_kept", [(10, 48), (20, 52)])
        client.set_terminated(run_id, "FINISHED")
    bare = client.create_experiment("bare", artifact_location=f"file://{root}/artifacts2")
    run_id = client.create_run(bare, run_name="only-loss", tags={"ray_dpo.mode": "offline"}).info.run_id
    _log(client, run_id, "train/loss", [(1, 0.69), (2, 0.68)])
    return uri


def _row(out: str, name: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(name + " ") or line == name)
    return line.split()


def test_compare_prints_the_table_and_writes_valid_pngs(store, tmp_path, capsys):
    from matplotlib.image import imread

    out_dir = tmp_path / "cmp-out"
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", store, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "run") == ["run", "tiny-offline", "tiny-online"]
    assert _row(out, "mode") == ["mode", "offline", "online"]
    assert _row(out, "status") == ["status", "FINISHED", "FINISHED"]
    assert _row(out, "steps") == ["steps", "20", "20"]
    assert _row(out, "train/loss") == ["train/loss", "0.5000", "0.2500"]
    assert _row(out, "eval/loss") == ["eval/loss", "0.5500", "0.3000"]
    assert _row(out, "eval/judge_score") == ["eval/judge_score", "0.5100", "0.7100"]
    assert _row(out, "eval/kl") == ["eval/kl", "1.5000", "2.4000"]
    assert _row(out, "online/pairs_kept") == ["online/pairs_kept", "-", "52"]
    assert "sync/max_logprob_diff" not in out  # no run has it: no row
    assert "note:" not in out
    for name in ("metrics_vs_step.png", "judge_vs_kl.png"):
        path = out_dir / name
        assert f"wrote {path}" in out
        assert path.stat().st_size > 10_000
        image = imread(str(path))
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # not a blank canvas
    csv_text = (out_dir / "summary.csv").read_text()
    assert csv_text.splitlines()[0] == "run,tiny-offline,tiny-online"
    assert "eval/judge_score,0.5100,0.7100" in csv_text


def test_compare_skips_the_frontier_without_judge_and_kl(store, tmp_path, capsys):
    out_dir = tmp_path / "bare-out"
    (out_dir).mkdir()
    (out_dir / "judge_vs_kl.png").write_bytes(b"stale")
    assert main(["compare", "--experiment", "bare", "--tracking-uri", store, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "status") == ["status", "RUNNING"]
    assert "note: skipped judge_vs_kl.png: no run logged both eval/judge_score and eval/kl" in out
    assert (out_dir / "metrics_vs_step.png").stat().st_size > 5_000
    assert not (out_dir / "judge_vs_kl.png").exists()


def test_compare_unknown_experiment_lists_the_existing_ones(store, tmp_path, capsys):
    assert main(["compare", "--experiment", "cpm", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'cpm'" in err and "bare, cmp" in err


def test_compare_defaults_to_mlflow_tracking_uri(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--experiment", "bare"]) == 0
    out = capsys.readouterr().out
    assert f"in {store}" in out
    assert (tmp_path / "compare-bare" / "metrics_vs_step.png").exists()


def test_comparability_notes_name_the_param_that_differs():
    from ray_dpo.tracking.compare import RunData, comparability_notes, heldout_params

    def run(name, tokens, judged=True):
        history = {"eval/judge_score": [(0, 0.3)], "eval/kl": [(0, 0.0)]} if judged else {}
        return RunData(run_id=name, name=name, mode="offline", status="FINISHED", history=history,
                       params=heldout_params({"eval.prompts_file": "/p/eval.jsonl",
                                              "online.sampling.max_new_tokens": tokens}))

    assert comparability_notes([run("a", "16"), run("b", "16")]) == []
    # A run without held-out metrics does not count.
    assert comparability_notes([run("a", "16"), run("c", "128", judged=False)]) == []
    (note,) = comparability_notes([run("a", "16"), run("b", "128")])
    assert "eval.max_new_tokens differs (a=16, b=128)" in note


def test_heldout_params_are_what_the_run_used():
    """eval.judge / eval.max_new_tokens unset fall back to online.*, so an offline run judged
    through eval.judge compares with an online run judged through online.judge."""
    from ray_dpo.tracking.compare import heldout_params

    offline = heldout_params({"eval.judge.function": "m:f", "eval.judge.reward_model": "None",
                              "online.judge.function": "None", "eval.max_new_tokens": "16",
                              "online.sampling.max_new_tokens": "64"})
    online = heldout_params({"eval.judge.function": "None", "online.judge.function": "m:f",
                             "eval.max_new_tokens": "None", "online.sampling.max_new_tokens": "16"})
    assert offline == online
    assert offline["eval.judge.function"] == "m:f" and offline["eval.max_new_tokens"] == "16"


def test_a_dpo_and_a_simpo_run_share_their_rows(tmp_path, capsys):
    """Every loss logs train/rewards/* and eval/rewards/* under the same names, so runs of
    different losses line up; the loss row says what each reward means. A run without the
    tag falls back to its loss.type param."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("family", artifact_location=f"file://{tmp_path}/artifacts")
    for name, tags, params, acc in [("dpo", {"ray_dpo.loss": "sigmoid"}, {}, 0.93),
                                    ("simpo", {"ray_dpo.loss": "simpo"}, {}, 0.97),
                                    ("old", {}, {"loss.type": "ipo"}, 0.9)]:
        run_id = client.create_run(exp, run_name=name, tags={"ray_dpo.mode": "offline", **tags}).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
        _log(client, run_id, "eval/rewards/accuracies", [(0, 0.5), (8, acc)])
        client.set_terminated(run_id, "FINISHED")
    assert main(["compare", "--experiment", "family", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert _row(out, "loss") == ["loss", "sigmoid", "simpo", "ipo"]
    assert _row(out, "eval/rewards/accuracies") == ["eval/rewards/accuracies", "0.9300", "0.9700", "0.9000"]
