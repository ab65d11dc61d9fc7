"""Row formats: detection, normalisation, and one clear error per kind of bad row."""

import pickle

import pytest

from ray_dpo.data.formats import FORMATS, BadRowError, NormalizedPair, detect_format, normalize_row

SRC = "data/train-00001.jsonl"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------- good rows


def test_standard_row():
    row = {"prompt": "describe the river", "chosen": "bright calm", "rejected": "dull grim"}
    assert detect_format(row) == "standard"
    pair = normalize_row(row, source=SRC, line=3)
    assert pair == NormalizedPair(prompt="describe the river", chosen="bright calm", rejected="dull grim",
                        is_chat=False)


def test_conversational_row_keeps_turns_in_order():
    row = {
        "prompt": [system("be nice"), user("hi"), assistant("hello"), user("describe the river")],
        "chosen": [assistant("bright calm")],
        "rejected": [assistant("dull grim")],
        "extra": "ignored",
    }
    assert detect_format(row) == "conversational"
    pair = normalize_row(row)
    assert pair.is_chat
    assert pair.prompt == (system("be nice"), user("hi"), assistant("hello"), user("describe the river"))
    assert pair.chosen == (assistant("bright calm"),)
    assert pair.rejected == (assistant("dull grim"),)


def test_conversational_is_lenient_about_strings_and_single_messages():
    row = {"prompt": "describe", "chosen": "bright", "rejected": assistant("dull")}
    pair = normalize_row(row, "conversational")
    assert pair.prompt == (user("describe"),)
    assert pair.chosen == (assistant("bright"),)
    assert pair.rejected == (assistant("dull"),)


def test_conversational_drops_extra_message_keys():
    row = {"prompt": [{"role": "user", "content": "hi", "name": "bob"}],
           "chosen": [assistant("a")], "rejected": [assistant("b")]}
    assert normalize_row(row).prompt == (user("hi"),)


def test_sharegpt_row_maps_speakers_to_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "describe"},
        ],
        "chosen": {"from": "gpt", "value": "bright"},
        "rejected": [{"from": "gpt", "value": "dull"}],
    }
    assert detect_format(row) == "sharegpt"
    pair = normalize_row(row)
    assert pair.prompt == (system("be nice"), user("hi"), assistant("hello"), user("describe"))
    assert pair.chosen == (assistant("bright"),)
    assert pair.rejected == (assistant("dull"),)
    assert pair.is_chat


def test_implicit_row_splits_at_the_longest_common_prefix():
    shared = [system("be nice"), user("hi"), assistant("hello"), user("describe")]
    row = {"chosen": shared + [assistant("bright"), assistant("calm")],
           "rejected": shared + [assistant("dull")]}
    assert detect_format(row) == "implicit"
    pair = normalize_row(row)
    assert pair.prompt == tuple(shared)
    assert pair.chosen == (assistant("bright"), assistant("calm"))
    assert pair.rejected == (assistant("dull"),)


def test_implicit_responses_may_share_leading_assistant_turns():
    # Prefix is by whole message: a shared first assistant turn belongs to the prompt.
    shared = [user("describe"), assistant("well")]
    row = {"chosen": shared + [assistant("bright")], "rejected": shared + [assistant("dull")]}
    pair = normalize_row(row, "implicit")
    assert pair.prompt == tuple(shared)
    assert pair.chosen == (assistant("bright"),)


def test_explicit_format_overrides_detection():
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert normalize_row(row, "conversational").is_chat
    assert not normalize_row(row, "standard").is_chat


def test_unknown_format_name_is_a_config_error_not_a_bad_row():
    with pytest.raises(ValueError, match="valid formats: auto, standard") as info:
        normalize_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "alpaca")
    assert not isinstance(info.value, BadRowError)
    assert FORMATS[0] == "auto"


# --------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    # (row, fmt, expected message after the "source:line: " prefix)
    ({"prompt": "p", "chosen": "a"}, "auto",
     r"missing field 'rejected': the standard format needs"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "auto", r"missing field 'chosen'"),
    ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}},
     "auto", r"missing field 'rejected': the sharegpt format needs"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "b"}, "auto",
     r"chosen is empty; give it some text or remove the row"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "standard", r"prompt is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "auto", r"chosen must be a string, got int"),
    ({"prompt": "p", "chosen": [assistant("a")], "rejected": "b"}, "standard",
     r"chosen must be a string, got list \(rows with message lists need format 'conversational'\)"),
    ({"prompt": [{"role": "user", "text": "hi"}], "chosen": [assistant("a")],
      "rejected": [assistant("b")]}, "auto",
     r"prompt\[0\] must be a message object with 'role' and 'content', got keys \['role', 'text'\]"),
    ({"prompt": ["hi"], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "auto",
     r"prompt\[0\] must be a message object with 'role' and 'content', got string"),
    ({"prompt": [{"role": "bot", "content": "hi"}], "chosen": [assistant("a")],
      "rejected": [assistant("b")]}, "auto",
     r"prompt\[0\] has role 'bot'; expected one of system, user, assistant, tool"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
      "chosen": [assistant("a")], "rejected": [assistant("b")]}, "auto",
     r"prompt\[0\]\.content must be a string, got list"),
    ({"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "auto",
     r"prompt is an empty list"),
    ({"prompt": [user("hi")], "chosen": [user("a")], "rejected": [assistant("b")]}, "auto",
     r"chosen\[0\] is a 'user' message; responses must be assistant messages"),
    ({"conversations": [{"from": "robot", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "auto",
     r"conversations\[0\] has from 'robot'; expected one of human, gpt"),
    ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "human", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "auto",
     r"chosen\[0\] is a 'user' message; responses must be assistant messages \(from 'gpt'\)"),
    ({"conversations": [{"role": "user", "content": "hi"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "auto",
     r"conversations\[0\] must be a message object with 'from' and 'value'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "auto",
     r"chosen and rejected are identical; a preference pair needs two different responses"),
    ({"prompt": [user("p")], "chosen": [assistant("x")], "rejected": assistant("x")}, "auto",
     r"chosen and rejected are identical"),
    ({"chosen": [user("p"), assistant("x")], "rejected": [user("p"), assistant("x")]}, "auto",
     r"chosen and rejected are identical"),
    ({"question": "p", "answer": "a"}, "auto",
     r"unknown row format \(keys: \['answer', 'question'\]\); expected prompt\+chosen\+rejected"),
    ([1, 2], "auto", r"a row must be a JSON object with preference fields, got list"),
    ("text", "standard", r"a row must be a JSON object, got string"),
    ({"chosen": "p a", "rejected": "p b"}, "auto",
     r"implicit-prompt rows need chosen and rejected as lists of messages"),
    ({"chosen": [user("p"), assistant("a")], "rejected": [user("q"), assistant("b")]}, "auto",
     r"chosen and rejected share no leading messages, so there is no common prompt"),
    ({"chosen": [user("p"), assistant("a")], "rejected": [user("p"), assistant("a"), user("more"),
                                                          assistant("b")]}, "auto",
     r"chosen is a prefix of the other conversation"),
    ({"chosen": [user("p"), assistant("a"), user("x"), assistant("c")],
      "rejected": [user("p"), assistant("b"), user("x"), assistant("c")]}, "auto",
     r"chosen and rejected first differ at message 1, but chosen has non-assistant turns after that point"),
]


@pytest.mark.parametrize("row,fmt,message", BAD_ROWS)
def test_bad_row_message_names_file_line_and_fix(row, fmt, message):
    with pytest.raises(BadRowError, match=rf"^data/train-00001\.jsonl:42: {message}") as info:
        normalize_row(row, fmt, source=SRC, line=42)
    assert (info.value.source, info.value.line) == (SRC, 42)


def test_detect_format_error_names_location():
    with pytest.raises(BadRowError, match=r"^f\.jsonl:9: unknown row format"):
        detect_format({"text": "x"}, source="f.jsonl", line=9)


def test_bad_row_error_survives_pickling():
    # Ray ships exceptions between processes.
    err = pickle.loads(pickle.dumps(BadRowError("f.jsonl", 5, "chosen is empty")))
    assert str(err) == "f.jsonl:5: chosen is empty"
    assert (err.source, err.line, err.problem) == ("f.jsonl", 5, "chosen is empty")
