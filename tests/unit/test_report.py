"""The data report: per-cause counts and length percentiles reach the console and MLflow."""

import json

from ray_dpo.data.report import data_metrics, format_report
from ray_dpo.data.counters import DataCounters, TokenizeResult


def _report(counters):
    part = {"num_pairs": counters.kept, "num_files": 1, "fingerprint": "ab" * 32,
            "counters": counters.as_dict(), "lengths": counters.length_summary()}
    return json.loads(json.dumps({"train": part, "eval": None}))  # as logged: JSON


def _counters():
    counters = DataCounters()
    for i in range(3):
        counters.add(TokenizeResult({}, "truncated", "prompt: dropped", ("prompt_turns_dropped",), (900 + i, 40)))
    counters.add(TokenizeResult({}, "truncated", "both", ("prompt_turns_dropped", "response_cut"), (700, 500)))
    for i in range(4):
        counters.add(TokenizeResult({}, "ok", "", (), (20 + i, 30)))
    counters.add(TokenizeResult(None, "dropped", "f:9: no room", ("prompt_no_room",), (3000, 10)))
    counters.add(TokenizeResult(None, "skipped", "f:10: missing field", ("bad_row",)))
    return counters


def test_console_report_says_why_with_shares_of_the_rows_read():
    text = format_report(_report(_counters()))
    lines = text.splitlines()
    assert lines[0].startswith("train: 8 pairs from 1 file(s); read 10, ok 4, truncated 4, dropped 1, skipped 1")
    assert lines[1] == (
        "    truncated 4 (40.0% of read): 4 (40.0%) lost the start of the conversation (earliest turns "
        "dropped) [prompt_turns_dropped]; 1 (10.0%) had a response cut at max_length [response_cut]")
    assert lines[2].startswith("    dropped 1 (10.0% of read): 1 (10.0%) system prompt + role headers")
    assert lines[2].endswith("[prompt_no_room]")
    assert lines[3].startswith("    skipped 1 (10.0% of read): 1 (10.0%) malformed row")
    # Before fitting, 9 tokenized rows: prompts 20..23, 700, 900..902, 3000 -> median 700, reported
    # as its histogram bucket's upper bound 703 (buckets 32 wide in 512..1023); responses 10, 30 x4,
    # 40 x3, 500 -> 30 (exact below 128); totals 50..53, 940..942, 1200, 3010 -> 940 -> 959.
    assert lines[4] == ("    tokens before fitting, p50/p90/p99/max: prompt 703/3000/3000/3000, "
                        "response 30/500/500/500, total 959/3010/3010/3010")
    assert "    e.g. f:10: missing field" in lines and "    e.g. f:9: no room" in lines


def test_data_metrics_name_each_cause_and_percentile():
    metrics = data_metrics(_counters())
    assert metrics["data/read"] == 10 and metrics["data/truncated"] == 4
    assert metrics["data/truncated/prompt_turns_dropped"] == 4
    assert metrics["data/truncated/response_cut"] == 1
    assert metrics["data/dropped/prompt_no_room"] == 1 and metrics["data/skipped/bad_row"] == 1
    assert metrics["data/tokens/prompt_p50"] == 703 and metrics["data/tokens/total_max"] == 3010
    assert all(isinstance(v, float) for v in metrics.values())


def test_report_names_examples_and_a_reference_free_loss():
    report = {**_report(_counters()), "loss": {"type": "kto", "rows": "examples", "reference": "streamed",
                                               "summary": "loss.type=kto on unpaired examples; reference: streamed"}}
    lines = format_report(report).splitlines()
    assert lines[0].startswith("train: 8 examples from 1 file(s)")
    assert lines[-1] == "loss: loss.type=kto on unpaired examples; reference: streamed"


def test_the_eval_split_gets_its_own_metric_prefix():
    counters = DataCounters()
    counters.add(TokenizeResult(None, "ok", "", (), (3, 4)))
    assert data_metrics(counters, prefix="data/eval/")["data/eval/read"] == 1
    assert "data/read" not in data_metrics(counters, prefix="data/eval/")


def test_kto_balance_states_the_weighted_ratio_and_whether_it_is_advised():
    from ray_dpo.data.report import kto_balance, kto_line

    even = kto_balance({"desirable": 300, "undesirable": 300}, desirable_weight=1.0, undesirable_weight=1.0)
    assert even["weighted_ratio"] == 1.0 and even["advised"]
    # 100 desirable of 400: 1*100/(1*300) = 0.333, outside [1, 4/3]; lambda_D = 3 brings it to 1.
    skewed = kto_balance({"desirable": 100, "undesirable": 300}, desirable_weight=1.0, undesirable_weight=1.0)
    assert skewed["weighted_ratio"] == 100 / 300 and not skewed["advised"]
    assert "= 0.333, OUTSIDE the KTO paper's advised [1, 4/3]" in kto_line(skewed)
    fixed = kto_balance({"desirable": 100, "undesirable": 300}, desirable_weight=4.0, undesirable_weight=1.0)
    assert fixed["weighted_ratio"] == 4 / 3 and fixed["advised"]
    none = kto_balance({"desirable": 5, "undesirable": 0}, desirable_weight=1.0, undesirable_weight=1.0)
    assert none["weighted_ratio"] is None and not none["advised"] and "undefined" in kto_line(none)
    report = {"loss": {"summary": "loss.type=kto", "kto": even}}
    assert format_report(report).splitlines()[-1].startswith("KTO examples: 300 desirable, 300 undesirable")
