"""Unpaired (KTO) rows: the two formats, clear errors for bad rows, pairs refused or
unpaired on request, and the mismatched (KL) completions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from ray_dpo.data.counters import TokenizeResult
from ray_dpo.data.formats import BadRowError, NormalizedPair, detect_format, normalize_row
from ray_dpo.data.tokenize import PairTokenizer
from ray_dpo.data.unpaired import assign_kl_completions, example_results, mismatched_index
from ray_dpo.testing.assets import make_preference_rows, unpaired_rows

SRC = "kto.jsonl"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- formats


def test_trl_unpaired_text_row():
    row = {"prompt": "describe the river", "completion": "bright calm", "label": False}
    assert detect_format(row) == "unpaired"
    assert normalize_row(row, source=SRC, line=2) == NormalizedPair(
        prompt="describe the river", chosen="bright calm", rejected="bright calm", is_chat=False, label=False)


def test_trl_unpaired_conversational_row():
    row = {"prompt": [user("describe the river")], "completion": [assistant("bright calm")], "label": True}
    pair = normalize_row(row, source=SRC, line=1)
    assert pair.is_chat and pair.label is True
    assert pair.prompt == (user("describe the river"),) and pair.chosen == (assistant("bright calm"),)


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "human", "value": "describe the river"}, {"from": "gpt", "value": "bright calm"}],
     "kto_tag": True},
    {"messages": [user("describe the river"), assistant("bright calm")], "kto_tag": True},
    {"messages": [user("describe the river"), assistant("bright calm")], "label": True},  # kto_en_demo.json's columns
])
def test_llama_factory_kto_rows(row):
    assert detect_format(row) == "sharegpt_kto"
    pair = normalize_row(row, source=SRC, line=4)
    assert pair == NormalizedPair(prompt=(user("describe the river"),), chosen=(assistant("bright calm"),),
                        rejected=(assistant("bright calm"),), is_chat=True, label=True)


def test_llama_factory_system_column_leads_the_prompt():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
           "system": "be kind", "kto_tag": False}
    assert normalize_row(row, source=SRC, line=1).prompt == ({"role": "system", "content": "be kind"}, user("hi"))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, "kto.jsonl:7: label must be true or false"),
    ({"prompt": "p", "completion": "c"}, "kto.jsonl:7: missing field 'label': the unpaired format needs"),
    ({"prompt": "p", "completion": "", "label": True}, "kto.jsonl:7: completion is empty"),
    ({"prompt": [user("p")], "completion": [user("c")], "label": True},
     "kto.jsonl:7: completion[0] is a 'user' message; responses must be assistant messages"),
    ({"conversations": [{"from": "human", "value": "p"}], "kto_tag": True},
     "kto.jsonl:7: conversations must end with the assistant's completion"),
    ({"conversations": [{"from": "human", "value": "p"}, {"from": "gpt", "value": "c"}], "kto_tag": 1},
     "kto.jsonl:7: kto_tag must be true or false"),
])
def test_bad_unpaired_rows_name_file_line_and_fix(row, message):
    with pytest.raises(BadRowError) as info:
        normalize_row(row, source=SRC, line=7)
    assert str(info.value).startswith(message)


# --------------------------------------------------------------------------- tokenizing


def data_config(**overrides):
    base = dict(format="auto", max_length=64, max_prompt_length=32, over_length="truncate_prompt",
                on_bad_row="error", unpaired=True, unpair=False)
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])


def test_an_example_tokenizes_with_its_label_and_completion_twice(tok):
    row = {"prompt": "describe the river", "completion": "bright calm", "label": False}
    result = PairTokenizer(tok, data_config()).tokenize_raw_row(row, source=SRC, line=3)
    assert result.status == "ok" and result.example
    assert result.row["label"] is False and result.row["chosen_ids"] == result.row["rejected_ids"]
    assert result.row["chosen_ids"][-1] == tok.eos_token_id


def test_a_pair_in_a_kto_run_says_to_set_data_unpair(tok):
    row = {"prompt": "p", "chosen": "bright", "rejected": "dull"}
    with pytest.raises(BadRowError, match=r"kto.jsonl:5: this row is a preference pair.*set data.unpair=true"):
        PairTokenizer(tok, data_config()).tokenize_raw_row(row, source=SRC, line=5)
    skipped = PairTokenizer(tok, data_config(on_bad_row="skip")).tokenize_raw_row(row, source=SRC, line=5)
    assert skipped.status == "skipped" and skipped.causes == ("bad_row",)


def test_an_example_in_a_pair_run_is_a_bad_row(tok):
    row = {"prompt": "p", "completion": "bright", "label": True}
    with pytest.raises(BadRowError, match="kto.jsonl:2: this row is an unpaired example.*use loss.type=kto"):
        PairTokenizer(tok, data_config(unpaired=False)).tokenize_raw_row(row, source=SRC, line=2)


# --------------------------------------------------------------------------- unpairing, KL completions


def ok(pair_id, prompt, completion, label=None):
    row = {"pair_id": pair_id, "prompt_ids": prompt, "chosen_ids": completion, "rejected_ids": completion,
           "truncated": False}
    if label is not None:
        row["label"] = label
    return TokenizeResult(row, "ok", example=label is not None)


def test_unpairing_makes_two_examples_and_counts_dropped_pairs_twice():
    pair = TokenizeResult({"pair_id": "f:1", "prompt_ids": [1, 2], "chosen_ids": [5, 9], "rejected_ids": [6, 9],
                           "truncated": False}, "ok")
    dropped = TokenizeResult(None, "dropped", "too long", ("over_length",))
    skipped = TokenizeResult(None, "skipped", "bad", ("bad_row",))
    other = TokenizeResult({"pair_id": "f:4", "prompt_ids": [3], "chosen_ids": [7, 9], "rejected_ids": [8, 9],
                            "truncated": False}, "ok")
    out = example_results([pair, dropped, skipped, other], unpair_pairs=True, max_length=64)
    assert [i for i, _ in out] == [0, 0, 1, 1, 2, 3, 3]
    rows = [r.row for _, r in out if r.row is not None]
    assert [(r["pair_id"], r["label"], r["chosen_ids"]) for r in rows] == [
        ("f:1/chosen", True, [5, 9]), ("f:1/rejected", False, [6, 9]),
        ("f:4/chosen", True, [7, 9]), ("f:4/rejected", False, [8, 9])]
    # Each example's KL completion is a completion of ANOTHER prompt: chosen takes the next
    # prompt's chosen, rejected its rejected.
    assert [r["rejected_ids"] for r in rows] == [[7, 9], [8, 9], [5, 9], [6, 9]]


def test_kl_completions_fit_max_length_and_fall_back_to_their_own():
    rows = [ok("a", [1] * 10, [5, 6, 7, 9], True).row, ok("b", [2], [8, 8, 8, 8, 8, 9], False).row]
    assign_kl_completions(rows, max_length=13)
    assert rows[0]["rejected_ids"] == [8, 8, 8]  # 13 − 10 prompt tokens
    assert rows[1]["rejected_ids"] == [5, 6, 7, 9]
    alone = [ok("c", [1], [5, 9], True).row, ok("d", [1], [6, 9], False).row]
    assign_kl_completions(alone, max_length=64)  # one prompt only: nothing to mismatch with
    assert [r["rejected_ids"] for r in alone] == [[5, 9], [6, 9]]
    assert mismatched_index([[1], [1], [2]], 0) == 2 and mismatched_index([[1]], 0) == 0
    assert mismatched_index([[1], [1], [2], [3]], 1) == 2  # the next run has one row only


@pytest.mark.parametrize("fmt", ["unpaired", "sharegpt_kto"])
def test_tiny_kto_rows_are_valid_examples_of_their_format(fmt):
    rows = unpaired_rows(make_preference_rows(5, seed=1), fmt)
    assert len(rows) == 10 and {detect_format(r) for r in rows} == {fmt}
    labels = [normalize_row(r, source=SRC, line=i + 1).label for i, r in enumerate(rows)]
    assert labels == [True, False] * 5
