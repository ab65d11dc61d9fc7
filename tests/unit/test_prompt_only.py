"""Prompt-only rows for online DPO: detection, tokenization, who may read them, the counters
and report, and the weight-sync probe they give."""

from types import SimpleNamespace

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from ray_dpo.config import OnlineConfig
from ray_dpo.data.counters import DataCounters, TokenizeResult
from ray_dpo.data.errors import DataError
from ray_dpo.data.formats import PROMPT_ONLY_NEEDS_ONLINE, BadRowError, detect_format, normalize_row
from ray_dpo.data.report import data_metrics, format_report
from ray_dpo.data.schemas import READ_SCHEMA
from ray_dpo.data.tokenize import PairTokenizer
from ray_dpo.data.tokenize_stage import tokenize_batch
from ray_dpo.loss_rules import prompt_only_refusal
from ray_dpo.online.pairs import PAIR_STRATEGIES, register_pair_strategy

USER = {"role": "user", "content": "describe the river"}
ASSISTANT = {"role": "assistant", "content": "bright calm"}


def data_config(**overrides):
    base = dict(max_length=64, max_prompt_length=32, over_length="truncate_prompt", on_bad_row="error",
                format="auto", refuse_prompt_only=None)
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("row, is_chat", [
    ({"prompt": "describe the river"}, False),
    ({"prompt": [USER]}, True),
    ({"messages": [{"role": "system", "content": "be kind"}, USER]}, True),
    ({"prompt": "describe the river", "id": 7, "source": "logs"}, False),
])
def test_a_prompt_without_responses_is_a_prompt_only_row(row, is_chat):
    assert detect_format(row) == "prompt_only"
    pair = normalize_row(row, source="p.jsonl", line=2)
    assert pair.prompt_only and pair.is_chat == is_chat and pair.label is None
    assert not pair.chosen and not pair.rejected


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),
    ({"prompt": "p", "chosen": "a"}, "standard"),  # still a pair missing its rejected: a bad row
    ({"messages": [USER, ASSISTANT], "label": True}, "sharegpt_kto"),
    ({"prompt": "p", "completion": "c", "label": False}, "unpaired"),
    ({"conversations": [{"from": "human", "value": "p"}]}, "sharegpt"),
])
def test_rows_with_responses_keep_their_formats(row, fmt):
    assert detect_format(row) == fmt


@pytest.mark.parametrize("row, message", [
    ({"messages": [USER, ASSISTANT]}, r"^p\.jsonl:4: messages must end with a user turn.*last 'assistant'"),
    ({"prompt": "  "}, r"^p\.jsonl:4: prompt is empty"),
    ({"prompt": []}, r"^p\.jsonl:4: prompt is an empty list"),
    ({"prompt": 3}, r"^p\.jsonl:4: prompt must be a list of messages"),
])
def test_malformed_prompt_only_rows_name_file_and_line(row, message):
    with pytest.raises(BadRowError, match=message):
        normalize_row(row, source="p.jsonl", line=4)


def test_explicit_prompt_only_format_reads_the_prompt_of_a_preference_row():
    pair = normalize_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "prompt_only")
    assert pair.prompt_only and pair.prompt == "p" and pair.chosen == ""


# --------------------------------------------------------------------------- tokenization


def test_a_prompt_only_row_has_the_pairs_prompt_ids_and_no_responses(tok):
    pt = PairTokenizer(tok, data_config())
    for prompt, chosen in (("describe the river", "bright"), ([USER], [ASSISTANT])):
        pair_row = pt.tokenize_raw_row({"prompt": prompt, "chosen": chosen, "rejected": "dull"},
                                       source="t.jsonl", line=1).row
        result = pt.tokenize_raw_row({"prompt": prompt}, source="p.jsonl", line=3)
        assert result.status == "ok" and result.prompt_only and not result.example
        assert result.row == {"pair_id": "p.jsonl:3", "prompt_ids": pair_row["prompt_ids"], "chosen_ids": [],
                              "rejected_ids": [], "truncated": False}
        assert result.lengths == (len(pair_row["prompt_ids"]), 0)


@pytest.mark.parametrize("policy, status", [("truncate_prompt", "truncated"), ("truncate_response", "dropped"),
                                            ("drop", "dropped")])
def test_a_long_prompt_only_row_follows_over_length(tok, policy, status):
    pt = PairTokenizer(tok, data_config(max_prompt_length=4, over_length=policy))
    result = pt.tokenize_raw_row({"prompt": "describe the river near the bridge"}, source="p.jsonl", line=1)
    assert result.status == status and result.prompt_only
    if status == "truncated":
        assert len(result.row["prompt_ids"]) == 4 and result.row["chosen_ids"] == []


def test_prompt_only_rows_are_refused_by_default_naming_file_line_and_keys(tok):
    plain = SimpleNamespace(**{k: v for k, v in vars(data_config()).items() if k != "refuse_prompt_only"})
    with pytest.raises(BadRowError, match=r"^p\.jsonl:5: this row is prompt-only .*online\.enabled=true with "
                                          r"online\.pair_strategy=best_vs_worst"):
        PairTokenizer(tok, plain).tokenize_raw_row({"prompt": "describe"}, source="p.jsonl", line=5)
    skip = PairTokenizer(tok, data_config(on_bad_row="skip", refuse_prompt_only="no prompts here"))
    result = skip.tokenize_raw_row({"prompt": "describe"}, source="p.jsonl", line=5)
    assert (result.status, result.causes, result.reason) == ("skipped", ("bad_row",), "p.jsonl:5: no prompts here")


def test_the_tokenize_stage_carries_the_kind_and_stops_offline_runs_with_a_data_error(tiny_assets):
    rows = ['{"prompt": "describe the river"}', '{"prompt": "tell", "chosen": "kind", "rejected": "rude"}']
    batch = pa.Table.from_pylist([{"file_index": 0, "line": i + 1, "source": "mix.jsonl", "raw": raw,
                                   "read_error": None} for i, raw in enumerate(rows)], schema=READ_SCHEMA)
    out = tokenize_batch(batch, tokenizer_path=tiny_assets["tokenizer"], chat_template=None,
                         settings=data_config(unpaired=False, unpair=False))
    assert out.column("prompt_only").to_pylist() == [True, False]
    assert [len(ids) for ids in out.column("chosen_ids").to_pylist()][0] == 0
    with pytest.raises(DataError, match=r"^mix\.jsonl:1: this row is prompt-only .*data\.on_bad_row=error"):
        tokenize_batch(batch, tokenizer_path=tiny_assets["tokenizer"], chat_template=None,
                       settings=data_config(unpaired=False, unpair=False, refuse_prompt_only=PROMPT_ONLY_NEEDS_ONLINE))


# --------------------------------------------------------------------------- who may read them


def test_only_online_train_files_with_a_strategy_that_needs_no_chosen_accept_prompt_only_rows():
    assert prompt_only_refusal(OnlineConfig(enabled=False)) == PROMPT_ONLY_NEEDS_ONLINE
    assert prompt_only_refusal(OnlineConfig(enabled=True, pair_strategy="best_vs_worst")) is None
    refusal = prompt_only_refusal(OnlineConfig(enabled=True, pair_strategy="regenerate_rejected"))
    assert "online.pair_strategy=regenerate_rejected" in refusal and "online.pair_strategy=best_vs_worst" in refusal
    refusal = prompt_only_refusal(OnlineConfig(enabled=True, pair_strategy="best_vs_worst"), key="data.eval_files")
    assert "data.eval_files rows are preference pairs" in refusal and "eval.prompts_file" in refusal


def test_the_refusal_asks_the_strategys_facts_not_its_name():
    register_pair_strategy("needs_a_chosen", needs_chosen=True)(lambda group: None)
    register_pair_strategy("samples_only", min_samples=2)(lambda group: None)
    try:
        refusal = prompt_only_refusal(OnlineConfig(enabled=True, pair_strategy="needs_a_chosen"))
        assert "online.pair_strategy=best_vs_worst or samples_only" in refusal
        assert prompt_only_refusal(OnlineConfig(enabled=True, pair_strategy="samples_only")) is None
    finally:
        PAIR_STRATEGIES.remove("needs_a_chosen")
        PAIR_STRATEGIES.remove("samples_only")


# --------------------------------------------------------------------------- counters and report


def test_counters_and_report_say_how_many_prompt_only_rows_were_read():
    a, b = DataCounters(), DataCounters()
    a.add(TokenizeResult({"pair_id": "p:1"}, "ok", lengths=(5, 0), prompt_only=True))
    a.add(TokenizeResult(None, "dropped", "p:2: too long", ("over_length",), (50, 0), prompt_only=True))
    b.add(TokenizeResult({"pair_id": "q:1"}, "ok", lengths=(5, 3)))
    merged = DataCounters().merge(a).merge(b)
    assert (merged.read, merged.prompt_only, merged.ok) == (3, 2, 2)
    assert DataCounters.from_dict(merged.as_dict()).prompt_only == 2
    assert data_metrics(merged)["data/prompt_only"] == 2.0
    assert "data/prompt_only" not in data_metrics(b)
    part = {"num_pairs": 2, "num_files": 1, "fingerprint": "ab" * 32, "counters": merged.as_dict()}
    first = format_report({"train": part}).splitlines()[0]
    assert first.startswith("train: 2 rows from 1 file(s); read 3, prompt-only 2, ok 2, truncated 0, dropped 1")
    b_part = {**part, "counters": b.as_dict()}
    assert format_report({"train": b_part}).startswith("train: 2 pairs from 1 file(s); read 1, ok 1,")


# --------------------------------------------------------------------------- weight-sync probe


def test_the_probe_of_prompt_only_rows_scores_the_end_of_their_prompts():
    from ray_dpo.engines.weight_sync import row_probe

    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 2]},
            {"prompt_ids": list(range(10, 30)), "chosen_ids": []},
            {"prompt_ids": [5, 6, 7], "chosen_ids": []},
            {"prompt_ids": [9], "chosen_ids": []}]
    assert row_probe(rows) == [([1, 2, 3], [4, 2]), (list(range(10, 22)), list(range(22, 30))), ([5, 6], [7])]
