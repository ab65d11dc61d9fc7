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


# --------------------------------------------------------------------------- the t distribution (pure)


@pytest.mark.parametrize("t,df,p", [(2.228, 10, 0.05), (2.0, 10, 0.0734), (1.812, 10, 0.10), (3.169, 10, 0.01),
                                    (12.706, 1, 0.05), (4.303, 2, 0.05), (2.042, 30, 0.05), (1.96, 10**6, 0.05)])
def test_two_sided_p_matches_the_student_t_table(t, df, p):
    from ray_dpo.tracking.stats import t_two_sided_p

    assert t_two_sided_p(t, df) == pytest.approx(p, abs=3e-4)
    assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)


def test_two_sided_p_matches_the_closed_forms_and_critical_values_invert_it():
    """df 1 (Cauchy): p = 1 - 2 atan(|t|) / pi; df 2: p = 1 - |t| / sqrt(2 + t^2)."""
    import math

    from ray_dpo.tracking.stats import incomplete_beta, t_critical, t_two_sided_p

    for t in (0.1, 1.0, 3.7, 40.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert t_two_sided_p(0.0, 7) == 1.0 and t_two_sided_p(math.inf, 7) == 0.0
    # I_0.4(2, 3) = P(Binomial(4, 0.4) >= 2) = 6(.16)(.36) + 4(.064)(.6) + .0256 = .5248
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    for df, crit in [(1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (30, 2.042)]:
        assert t_critical(df) == pytest.approx(crit, abs=1e-3)
    assert t_critical(3, 0.99) == pytest.approx(5.841, abs=1e-3)


def test_paired_difference_by_hand_not_significant():
    """Differences a - b = [1, 2, 6] (b's prompts differ by a lot; it cancels):
    mean 3; deviations -2, -1, 3; squares 4 + 1 + 9 = 14; sd = sqrt(14 / 2) = sqrt(7) = 2.6458;
    se = sqrt(7) / sqrt(3) = 1.5275; t = 3 / 1.5275 = 1.9640 (t^2 = 27/7); df 2;
    p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(27/41) = 0.18850;
    95% CI = 3 -+ 4.303 * 1.5275 = [-3.573, 9.573]: holds 0, so not significant."""
    import math

    from ray_dpo.tracking.stats import paired_difference

    b = [10.0, -5.0, 0.5]
    r = paired_difference([x + d for x, d in zip(b, [1.0, 2.0, 6.0])], b)
    assert (r.n, r.df) == (3, 2)
    assert r.mean_diff == pytest.approx(3.0)
    assert r.mean_a - r.mean_b == pytest.approx(3.0) and r.mean_b == pytest.approx(5.5 / 3)
    assert r.sd == pytest.approx(math.sqrt(7))
    assert r.se == pytest.approx(1.5275, abs=1e-4)
    assert r.t == pytest.approx(1.9640, abs=1e-4)
    assert r.p == pytest.approx(1 - math.sqrt(27 / 41), rel=1e-9) == pytest.approx(0.1885, abs=1e-4)
    assert (r.ci_low, r.ci_high) == (pytest.approx(-3.573, abs=2e-3), pytest.approx(9.573, abs=2e-3))
    assert not r.significant


def test_paired_difference_by_hand_significant():
    """Differences 1, 2, ..., 11: mean 6; squared deviations 2 (25 + 16 + 9 + 4 + 1) = 110;
    sd = sqrt(110 / 10) = sqrt(11); se = sqrt(11) / sqrt(11) = 1; t = 6; df 10;
    p < 0.001 (the table's 0.001 point for df 10 is t = 4.587); CI = 6 -+ 2.228 = [3.772, 8.228]."""
    from ray_dpo.tracking.stats import paired_difference

    r = paired_difference([2.0 * d for d in range(1, 12)], [float(d) for d in range(1, 12)])
    assert (r.mean_diff, r.se, r.t, r.df) == (pytest.approx(6.0), pytest.approx(1.0), pytest.approx(6.0), 10)
    assert 1e-5 < r.p < 0.001
    assert (r.ci_low, r.ci_high) == (pytest.approx(3.772, abs=1e-3), pytest.approx(8.228, abs=1e-3))
    assert r.significant


def test_paired_difference_edges():
    from ray_dpo.tracking.stats import paired_difference

    same = paired_difference([0.3, 0.5], [0.3, 0.5])  # the same samples scored the same: no difference
    assert (same.t, same.p, same.significant) == (0.0, 1.0, False)
    shifted = paired_difference([1.5, 2.5], [1.0, 2.0])  # every prompt +0.5 exactly
    assert shifted.p == 0.0 and shifted.significant
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_difference([1.0], [0.0])
    with pytest.raises(ValueError, match="2 values against 3"):
        paired_difference([1.0, 2.0], [0.0, 1.0, 2.0])


# --------------------------------------------------------------------------- standard error bars


def _run_data(name, points, se=True, **fields):
    """A RunData whose held-out points are [(step, kl, score)], SE kl/10 and 0.01 * step when se."""
    from ray_dpo.tracking.compare import RunData

    history = {"eval/kl": [(s, k) for s, k, _ in points], "eval/judge_score": [(s, v) for s, _, v in points]}
    if se:
        history["eval/kl_se"] = [(s, k / 10) for s, k, _ in points]
        history["eval/judge_score_se"] = [(s, 0.01 * s) for s, _, _ in points]
    return RunData(run_id=name + "-id", name=name, mode="offline", status="FINISHED", history=history, **fields)


def _bars(container):
    """(x error segments, y error segments) of an ErrorbarContainer, as [((x0, y0), (x1, y1))]."""
    cols = container.lines[2]
    segments = [[tuple(map(float, p)) for p in seg] for col in cols for seg in col.get_segments()]
    segments = [s for s in segments if len(s) == 2]  # a NaN error (not logged at that step) draws no segment
    xs = [tuple(s) for s in segments if s[0][1] == s[1][1] and s[0][0] != s[1][0]]
    ys = [tuple(s) for s in segments if s[0][0] == s[1][0] and s[0][1] != s[1][1]]
    return xs, ys


def test_the_frontier_draws_plus_minus_one_se_where_logged_and_old_runs_still_plot():
    from matplotlib.container import ErrorbarContainer

    from ray_dpo.tracking.compare import frontier_figure

    new = _run_data("new", [(0, 0.0, 0.3), (10, 1.0, 0.5)])
    old = _run_data("old", [(0, 0.0, 0.3), (10, 2.0, 0.6)], se=False)
    fig = frontier_figure([new, old])
    ax = fig.axes[0]
    assert len(ax.lines) >= 2, "both runs are drawn"
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # only the run with SEs
    assert bars.has_xerr and bars.has_yerr
    xs, ys = _bars(bars)
    # step 10: kl 1.0 +- 0.1, score 0.5 +- 0.1; step 0: kl_se 0 and score_se 0 draw zero-length bars
    assert ((0.9, 0.5), (1.1, 0.5)) in [tuple((round(x, 9), round(y, 9)) for x, y in s) for s in xs]
    assert ((1.0, 0.4), (1.0, 0.6)) in [tuple((round(x, 9), round(y, 9)) for x, y in s) for s in ys]


def test_metrics_panels_of_the_held_out_metrics_draw_se_bars():
    from matplotlib.container import ErrorbarContainer

    from ray_dpo.tracking.compare import metrics_figure

    run = _run_data("new", [(0, 0.0, 0.3), (10, 1.0, 0.5), (20, 1.5, 0.55)])
    del run.history["eval/judge_score_se"][0]  # a step without its SE: no bar there, the others drawn
    run.history["train/loss"] = [(1, 0.69), (20, 0.4)]
    fig = metrics_figure([run, _run_data("old", [(0, 0.0, 0.3)], se=False)])
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert set(panels) == {"train/loss", "eval/judge_score (±1 SE)", "eval/kl (±1 SE)"}
    assert not [c for c in panels["train/loss"].containers if isinstance(c, ErrorbarContainer)]
    (judge,) = [c for c in panels["eval/judge_score (±1 SE)"].containers if isinstance(c, ErrorbarContainer)]
    _, ys = _bars(judge)
    rounded = sorted(tuple((round(x, 9), round(y, 9)) for x, y in s) for s in ys)
    assert rounded == [((10.0, 0.4), (10.0, 0.6)), ((20.0, 0.35), (20.0, 0.75))]
    (kl,) = [c for c in panels["eval/kl (±1 SE)"].containers if isinstance(c, ErrorbarContainer)]
    _, ys = _bars(kl)
    assert ((20.0, 1.35), (20.0, 1.65)) in [tuple((round(x, 9), round(y, 9)) for x, y in s) for s in ys]


# --------------------------------------------------------------------------- paired comparison


def _scores_record(step, seed, per_prompt, kl_per_prompt, order=None):
    """A held-out record of 4 prompts x 2 samples (samples given per prompt)."""
    from ray_dpo.engines.evaluation import heldout_record

    prompts = ["the river", "a garden", [{"role": "user", "content": "a letter"}], "the boats"]
    order = order or range(4)
    scores = [v for i in order for v in per_prompt[i]]
    ratios = [v for i in order for v in kl_per_prompt[i]]
    return heldout_record(step=step, samples_per_prompt=2, seed=seed, prompts=[prompts[i] for i in order],
                          scores=scores, policy_logps=ratios, ref_logps=[0.0] * 8, response_lengths=[3] * 8,
                          max_new_tokens=16)


BASE = ([[0.1, 0.3], [0.4, 0.6], [0.0, 0.2], [0.7, 0.9]], [[0.1, -0.1], [0.0, 0.0], [0.2, -0.2], [0.0, 0.0]])
# judge per prompt +0.3, +0.2, +0.3, +0.2 over BASE; KL per-prompt means 2, 1, 3, 2
TUNED = ([[0.4, 0.6], [0.6, 0.8], [0.3, 0.5], [0.9, 1.1]], [[1.0, 3.0], [0.5, 1.5], [2.5, 3.5], [-0.5, 4.5]])
# judge per prompt +0.1, -0.1, +0.05, -0.05 over BASE: mean 0
RERUN = ([[0.2, 0.4], [0.3, 0.5], [0.05, 0.25], [0.65, 0.85]], BASE[1])


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory):
    """Experiment "pairs": base and tuned (records at steps 0 and 8; tuned's prompts in
    another order), rerun, other-seed (eval seed differs), two runs named dup, no-records."""
    import json

    from mlflow.tracking import MlflowClient

    from ray_dpo.engines.evaluation import heldout_artifact_path

    root = tmp_path_factory.mktemp("paired")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("pairs", artifact_location=f"file://{root}/artifacts")
    runs = [("base", 7919, BASE, None), ("tuned", 7919, TUNED, [3, 1, 0, 2]), ("rerun", 7919, RERUN, None),
            ("other-seed", 7920, TUNED, None), ("dup", 7919, BASE, None), ("dup", 7919, BASE, None)]
    ids = {}
    for name, seed, (scores, kls), order in runs:
        run_id = client.create_run(exp, run_name=name, tags={"ray_dpo.mode": "offline"}).info.run_id
        ids.setdefault(name, run_id)
        for step, (s, k) in ((0, BASE), (8, (scores, kls))):
            record = _scores_record(step, seed, s, k, order)
            client.log_text(run_id, json.dumps(record), heldout_artifact_path(step))
            _log(client, run_id, "eval/judge_score", [(step, sum(map(sum, s)) / 8)])
            _log(client, run_id, "eval/kl", [(step, sum(map(sum, k)) / 8)])
        client.set_terminated(run_id, "FINISHED")
    bare = client.create_run(exp, run_name="no-records", tags={"ray_dpo.mode": "offline"}).info.run_id
    _log(client, bare, "train/loss", [(1, 0.69)])
    return uri, ids


def test_paired_compare_end_to_end_prints_and_writes_the_hand_computed_test(paired_store, tmp_path, capsys):
    """tuned - base, judge: per-prompt differences 0.3, 0.2, 0.3, 0.2 -> mean 0.25; deviations
    +-0.05, squares 4 x 0.0025 = 0.01; sd = sqrt(0.01 / 3) = 0.057735; se = 0.057735 / 2 =
    0.028868; t = 0.25 / 0.028868 = 8.660 (= 5 sqrt 3); df 3 (5.841 < t < 12.924: 0.001 < p < 0.01);
    CI 0.25 -+ 3.182 x 0.028868 = [0.1581, 0.3419].
    KL: per-prompt means 2, 1, 3, 2 against ~0 (base's log-ratios cancel per prompt): mean 2;
    deviations 0, -1, 1, 0 -> sd = sqrt(2 / 3) = 0.8165, se 0.40825, t 4.899 (3.182 < t < 5.841:
    0.01 < p < 0.05); CI 2 -+ 3.182 x 0.40825 = [0.7008, 3.2992]."""
    import csv

    uri, ids = paired_store
    out_dir = tmp_path / "out"
    assert main(["compare", "--experiment", "pairs", "--tracking-uri", uri, "--out", str(out_dir),
                 "--paired", "tuned", "base", "--paired", "rerun", ids["base"][:10]]) == 0
    out = capsys.readouterr().out
    assert "# paired: A = tuned (step 8), B = base (step 8); 4 prompts x 2 samples, eval seed 7919" in out
    judge = next(line for line in out.splitlines() if line.startswith("eval/judge_score  A"))
    assert "A 0.6500  B 0.4000  A-B +0.2500 ± 0.0289  t 8.66" in judge
    assert "95% CI [+0.1581, +0.3419]  significant at 95%" in judge
    kl = next(line for line in out.splitlines() if line.startswith("eval/kl") and "A 2.0000" in line)
    assert "A-B +2.0000 ± 0.4082  t 4.90" in kl and "[+0.7008, +3.2992]  significant at 95%" in kl
    assert "# paired: A = rerun (step 8), B = base (step 8)" in out
    assert "A-B +0.0000 ± 0.0456  t 0.00  p 1.0000" in out and "not significant (inside the noise)" in out
    assert f"wrote {out_dir / 'paired.csv'}" in out
    rows = list(csv.DictReader((out_dir / "paired.csv").open()))
    assert [(r["a"], r["b"], r["metric"]) for r in rows] == [
        ("tuned", "base", "eval/judge_score"), ("tuned", "base", "eval/kl"),
        ("rerun", "base", "eval/judge_score"), ("rerun", "base", "eval/kl")]
    first = rows[0]
    assert (first["a_run_id"], first["b_run_id"]) == (ids["tuned"], ids["base"])
    assert (first["step_a"], first["step_b"], first["prompts"], first["samples_per_prompt"], first["df"]) == (
        "8", "8", "4", "2", "3")
    assert float(first["diff"]) == pytest.approx(0.25)
    assert float(first["se"]) == pytest.approx(0.0288675, abs=1e-6)
    assert float(first["t"]) == pytest.approx(5 * 3 ** 0.5)
    assert 0.001 < float(first["p"]) < 0.01 and first["significant"] == "True"
    assert 0.01 < float(rows[1]["p"]) < 0.05
    assert float(rows[2]["p"]) == 1.0 and rows[2]["significant"] == "False"


def test_paired_at_a_chosen_step_and_without_paired_no_stale_csv(paired_store, tmp_path, capsys):
    uri, _ = paired_store
    out_dir = tmp_path / "out"
    base = ["compare", "--experiment", "pairs", "--tracking-uri", uri, "--out", str(out_dir)]
    assert main(base + ["--paired", "tuned", "base", "--step", "0"]) == 0
    out = capsys.readouterr().out
    assert "A = tuned (step 0), B = base (step 0)" in out and "significant at 95%" not in out
    assert (out_dir / "paired.csv").exists()
    assert main(base) == 0
    assert "# paired" not in capsys.readouterr().out
    assert not (out_dir / "paired.csv").exists(), "a paired.csv of an earlier call would pass for this one's"


@pytest.mark.parametrize("pair,step,message", [
    (["nope", "base"], None, "no run named 'nope' or with a run id starting with it; runs: base ("),
    (["dup", "base"], None, "'dup' matches 2 runs: dup ("),
    (["tuned", "other-seed"], None, "refusing to pair step 8 of A with step 8 of B: seed differs (A 7919, B 7920)"),
    (["tuned", "no-records"], None, "run no-records ("),
    (["tuned", "base"], 5, "run tuned has no held-out record at step 5; its steps: 0, 8"),
])
def test_paired_refuses_clearly(paired_store, tmp_path, capsys, pair, step, message):
    uri, _ = paired_store
    args = ["compare", "--experiment", "pairs", "--tracking-uri", uri, "--out", str(tmp_path / "o"),
            "--paired", *pair] + (["--step", str(step)] if step is not None else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "o").exists(), "nothing is written when a pair is refused"


def test_records_of_different_prompts_do_not_pair():
    from ray_dpo.tracking.paired import PairedError, paired_metrics, record_mismatch

    a = _scores_record(8, 1, *TUNED)
    b = _scores_record(8, 1, *BASE)
    b["prompts"][2]["prompt"] = "another prompt"
    assert "the prompts differ (A 4, B 4; 1 only in A, 1 only in B; A only: [{\"content\": \"a letter\"" in (
        record_mismatch(a, b))
    with pytest.raises(PairedError, match="the prompts differ"):
        paired_metrics(a, b)
    c = _scores_record(8, 1, *BASE)
    c["max_new_tokens"] = 32
    assert record_mismatch(a, c) == "max_new_tokens differs (A 16, B 32)"
    c["max_new_tokens"] = None  # a record that does not say: not held against it
    assert record_mismatch(a, c) is None


# --------------------------------------------------------------------------- sweeps


def _trial(name, overrides, kl, score, status="finished"):
    return _run_data(name, [(0, 0.0, 0.3), (16, kl, score)], sweep="beta-grid", overrides=overrides,
                     sweep_status=status)


def test_sweep_lines_run_along_the_key_with_most_values_one_per_other_combination():
    from ray_dpo.tracking.compare import order_key, sweep_lines

    trials = [_trial("t3", {"loss.beta": 0.3, "online.enabled": False}, 0.5, 0.40),
              _trial("t1", {"loss.beta": 0.1, "online.enabled": False}, 1.5, 0.50),
              _trial("t2", {"loss.beta": 0.2, "online.enabled": False}, 1.0, 0.45),
              _trial("o1", {"loss.beta": 0.1, "online.enabled": True}, 2.0, 0.70),
              _trial("o3", {"loss.beta": 0.3, "online.enabled": True}, 0.8, 0.55, status="stopped"),
              _run_data("never-evaluated", [], sweep="beta-grid", overrides={"loss.beta": 0.2, "online.enabled": True})]
    assert order_key(trials) == "loss.beta"  # 3 values; online.enabled is not a number
    key, lines, missing = sweep_lines(trials)
    assert key == "loss.beta" and missing == ["never-evaluated"]
    assert [(line.label, [r.name for r in line.runs]) for line in lines] == [
        ("online.enabled=false", ["t1", "t2", "t3"]), ("online.enabled=true", ["o1", "o3"])]
    assert [(p.step, p.kl, p.score, p.kl_se) for p in lines[1].points] == [
        (16, 2.0, 0.70, pytest.approx(0.2)), (16, 0.8, 0.55, pytest.approx(0.08))]
    two_lrs = [_trial("a", {"lr": 1e-5, "loss.beta": 0.1}, 1, 1), _trial("b", {"lr": 2e-5, "loss.beta": 0.1}, 1, 1)]
    assert order_key(two_lrs) == "lr"  # 2 values against loss.beta's 1


def test_sweep_figure_annotates_values_and_draws_stopped_trials_hollow():
    from matplotlib.container import ErrorbarContainer

    from ray_dpo.tracking.compare import sweep_figure

    trials = [_trial("t1", {"loss.beta": 0.1}, 1.5, 0.50), _trial("t3", {"loss.beta": 0.3}, 0.5, 0.40, "stopped"),
              _trial("t2", {"loss.beta": 0.2}, 1.0, 0.45)]
    ax = sweep_figure(trials, "beta-grid").axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["beta=0.1", "beta=0.2", "beta=0.3"]
    joined = next(line for line in ax.lines if line.get_linestyle() == "-")
    assert list(joined.get_xdata()) == [1.5, 1.0, 0.5], "joined in beta order"
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.5]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    xs, _ = _bars(bars)
    assert ((1.35, 0.5), (1.65, 0.5)) in [tuple((round(x, 9), round(y, 9)) for x, y in s) for s in xs]


def test_compare_draws_a_frontier_per_sweep_and_tables_its_overrides(tmp_path, capsys):
    """A sweep as `ray-dpo sweep` logs it: a parent run (no trial: left out) and trials tagged
    with the sweep, their overrides and their outcome."""
    import json

    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sw", artifact_location=f"file://{tmp_path}/artifacts")
    parent = client.create_run(exp, run_name="beta grid", tags={
        "ray_dpo.mode": "sweep", "ray_dpo.sweep": "beta grid", "ray_dpo.sweep.parent": "1"}).info.run_id
    _log(client, parent, "eval/judge_score", [(0, 9.0)])
    for name, beta, online, kl, score, status in [("b1", 0.1, False, 1.5, 0.5, "finished"),
                                                  ("b3", 0.3, False, 0.5, 0.4, "stopped"),
                                                  ("o1", 0.1, True, 2.0, 0.7, "finished")]:
        run_id = client.create_run(exp, run_name=name, tags={
            "ray_dpo.mode": "online" if online else "offline", "ray_dpo.sweep": "beta grid",
            "ray_dpo.sweep.overrides": json.dumps({"loss.beta": beta, "online.enabled": online}),
            "ray_dpo.sweep.status": status}).info.run_id
        _log(client, run_id, "eval/judge_score", [(0, 0.3), (16, score)])
        _log(client, run_id, "eval/judge_score_se", [(0, 0.02), (16, 0.03)])
        _log(client, run_id, "eval/kl", [(0, 0.0), (16, kl)])
        _log(client, run_id, "eval/kl_se", [(0, 0.0), (16, kl / 10)])
    alone = client.create_run(exp, run_name="alone", tags={"ray_dpo.mode": "offline"}).info.run_id
    _log(client, alone, "eval/judge_score", [(0, 0.3)])
    out_dir = tmp_path / "out"
    assert main(["compare", "--experiment", "sw", "--tracking-uri", uri, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "run") == ["run", "b1", "b3", "o1", "alone"], "the parent is not a trial"
    sweep_line = next(line for line in out.splitlines() if line.startswith("sweep "))  # the name holds a space
    assert sweep_line.split("  ")[0] == "sweep" and sweep_line.count("beta grid") == 3
    assert sweep_line.rstrip().endswith(" -")
    assert _row(out, "overrides") == ["overrides", "loss.beta=0.1;online.enabled=false",
                                      "loss.beta=0.3;online.enabled=false", "loss.beta=0.1;online.enabled=true", "-"]
    assert _row(out, "trial") == ["trial", "finished", "stopped", "finished", "-"]
    png = out_dir / "sweep_beta_grid_frontier.png"
    assert f"wrote {png}" in out
    assert imread(str(png))[..., :3].std() > 0.05
    assert "overrides" in (out_dir / "summary.csv").read_text()
