"""Tokenization: chat template split, EOS handling, over-length policies, bad-row policy, counters."""

import copy
import functools
import json
from types import SimpleNamespace

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ray_dpo.data.counters import DataCounters, LengthHistogram, TokenizeResult
from ray_dpo.data.fitting import fit_chat_prompt, fit_lengths
from ray_dpo.data.formats import BadRowError, normalize_row
from ray_dpo.data.tokenize import ChatTemplateError, PairTokenizer


def data_config(**overrides):
    base = dict(max_length=64, max_prompt_length=32, over_length="truncate_prompt",
                on_bad_row="error", format="auto")
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def words(n, pool=("bright", "calm", "kind", "warm", "gentle", "honest")):
    return " ".join(pool[i % len(pool)] for i in range(n))


# --------------------------------------------------------------------------- text pairs


def test_standard_pair_gets_bos_prompt_and_eos_responses(tok):
    pt = PairTokenizer(tok, data_config())
    pair = normalize_row({"prompt": "describe the river", "chosen": "bright calm",
                          "rejected": "dull grim rude"})
    result = pt(pair, source="train.jsonl", line=3)
    assert result.status == "ok" and result.reason == ""
    assert result.row == {
        "pair_id": "train.jsonl:3",
        "prompt_ids": [tok.bos_token_id] + ids(tok, "describe the river"),
        "chosen_ids": ids(tok, "bright calm") + [tok.eos_token_id],
        "rejected_ids": ids(tok, "dull grim rude") + [tok.eos_token_id],
        "truncated": False,
    }
    assert tok.unk_token_id not in result.row["prompt_ids"]


# --------------------------------------------------------------------------- chat pairs


def test_single_turn_chat_pair_splits_at_generation_prompt(tok):
    pt = PairTokenizer(tok, data_config())
    row = {"prompt": [{"role": "user", "content": "describe the river"}],
           "chosen": [{"role": "assistant", "content": "bright calm"}],
           "rejected": [{"role": "assistant", "content": "dull grim"}]}
    result = pt.tokenize_raw_row(row, source="c.jsonl", line=1)
    r = result.row
    assert result.status == "ok"
    assert tok.decode(r["prompt_ids"]) == "<|bos|> <|user|> describe the river <|assistant|>"
    assert tok.decode(r["chosen_ids"]) == "bright calm <|eos|>"
    assert tok.decode(r["rejected_ids"]) == "dull grim <|eos|>"
    assert r["prompt_ids"].count(tok.bos_token_id) == 1  # template BOS, not doubled
    assert r["chosen_ids"].count(tok.eos_token_id) == 1


def test_multi_turn_conversation_through_chat_template(tok):
    pt = PairTokenizer(tok, data_config(max_length=128, max_prompt_length=64))
    row = {
        "prompt": [
            {"role": "system", "content": "kind and calm"},
            {"role": "user", "content": "describe the river"},
            {"role": "assistant", "content": "calm river"},
            {"role": "user", "content": "describe the garden"},
        ],
        "chosen": [{"role": "assistant", "content": "bright warm garden"}],
        "rejected": [{"role": "assistant", "content": "messy garden"}],
    }
    r = pt.tokenize_raw_row(row, source="c.jsonl", line=2).row
    assert tok.decode(r["prompt_ids"]) == (
        "<|bos|> <|system|> kind and calm <|user|> describe the river <|assistant|> calm river <|eos|> "
        "<|user|> describe the garden <|assistant|>"
    )
    assert r["prompt_ids"][-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(r["chosen_ids"]) == "bright warm garden <|eos|>"
    assert tok.decode(r["rejected_ids"]) == "messy garden <|eos|>"
    # prompt + response is exactly the template's rendering of the whole conversation.
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert r["prompt_ids"] + r["chosen_ids"] == ids(tok, full)


def test_all_chat_formats_tokenize_identically(tok):
    pt = PairTokenizer(tok, data_config())
    conversational = {
        "prompt": [{"role": "system", "content": "kind"}, {"role": "user", "content": "describe"}],
        "chosen": [{"role": "assistant", "content": "bright"}],
        "rejected": [{"role": "assistant", "content": "dull"}],
    }
    sharegpt = {
        "conversations": [{"from": "system", "value": "kind"}, {"from": "human", "value": "describe"}],
        "chosen": {"from": "gpt", "value": "bright"},
        "rejected": {"from": "gpt", "value": "dull"},
    }
    implicit = {"chosen": conversational["prompt"] + conversational["chosen"],
                "rejected": conversational["prompt"] + conversational["rejected"]}
    rows = [pt.tokenize_raw_row(r, source="s", line=1).row for r in (conversational, sharegpt, implicit)]
    assert rows[0] == rows[1] == rows[2]


def test_multi_message_response_keeps_each_turn_end(tok):
    pt = PairTokenizer(tok, data_config())
    row = {"prompt": [{"role": "user", "content": "describe"}],
           "chosen": [{"role": "assistant", "content": "bright"}, {"role": "assistant", "content": "calm"}],
           "rejected": [{"role": "assistant", "content": "dull"}]}
    r = pt.tokenize_raw_row(row, source="s", line=1).row
    assert tok.decode(r["chosen_ids"]) == "bright <|eos|> <|assistant|> calm <|eos|>"


@functools.lru_cache(maxsize=None)
def _char_level_tokenizer():
    """A Qwen-style tokenizer: "<|im_end|>" (EOS) is followed by "\\n", no BOS."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz \n"))
    specials = ["<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.add_special_tokens(specials)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                   unk_token="[UNK]", chat_template=template)


def test_whitespace_after_template_eos_is_cut_and_eos_not_doubled():
    ctok = _char_level_tokenizer()
    pt = PairTokenizer(ctok, data_config())
    row = {"prompt": [{"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "yo"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    r = pt.tokenize_raw_row(row, source="s", line=1).row
    # The template renders "yo<|im_end|>\n"; generation stops at EOS, so "\n" is dropped.
    assert r["chosen_ids"] == ctok.convert_tokens_to_ids(["y", "o", "<|im_end|>"])
    assert ctok.convert_ids_to_tokens(r["prompt_ids"])[-10:] == list("assistant\n")


def test_text_pair_without_bos_tokenizer_has_no_bos():
    ctok = _char_level_tokenizer()
    r = PairTokenizer(ctok, data_config())(normalize_row({"prompt": "ab", "chosen": "c", "rejected": "d"})).row
    assert r["prompt_ids"] == ctok.convert_tokens_to_ids(["a", "b"])
    assert r["chosen_ids"] == ctok.convert_tokens_to_ids(["c", "<|im_end|>"])


def test_template_that_is_not_prefix_stable_raises_clear_error(tok):
    bad = copy.deepcopy(tok)
    # Generation prompt "<|assistant|>\n\n" but the rendered assistant turn is "<|assistant|>\n...".
    bad.chat_template = tok.chat_template.replace("{{ '<|assistant|>\n' }}", "{{ '<|assistant|>\n\n' }}")
    assert bad.chat_template != tok.chat_template
    pt = PairTokenizer(bad, data_config(on_bad_row="skip"))
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "bright", "rejected": "dull"}
    with pytest.raises(ChatTemplateError, match=r"not prefix-stable.*differ at character"):
        pt.tokenize_raw_row(row, source="s", line=1)  # raised even with on_bad_row=skip


def test_chat_row_without_chat_template_raises(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    pt = PairTokenizer(plain, data_config())
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "bright", "rejected": "dull"}
    with pytest.raises(ChatTemplateError, match="no chat template.*model.chat_template"):
        pt.tokenize_raw_row(row, source="s", line=1)


def test_row_rejected_by_chat_template_is_a_bad_row(tok):
    row = {"prompt": [{"role": "tool", "content": "hi"}], "chosen": "bright", "rejected": "dull"}
    with pytest.raises(BadRowError, match=r"^t\.jsonl:8: the chat template rejected this row: .*roles"):
        PairTokenizer(tok, data_config()).tokenize_raw_row(row, source="t.jsonl", line=8)
    result = PairTokenizer(tok, data_config(on_bad_row="skip")).tokenize_raw_row(row, source="t.jsonl", line=8)
    assert result.status == "skipped" and result.reason.startswith("t.jsonl:8: the chat template")


# --------------------------------------------------------------------------- over-length policies

P10, P6 = list(range(100, 110)), list(range(100, 106))
C13, R5 = list(range(200, 213)), list(range(300, 305))


@pytest.mark.parametrize("policy,prompt,chosen,rejected,expected", [
    # within both limits: untouched
    ("truncate_prompt", P6, R5, R5[:4], ("ok", 6, 5, 4)),
    ("drop", P6, R5, R5[:4], ("ok", 6, 5, 4)),
    # prompt over max_prompt_length=8, total 14 <= 16
    ("truncate_prompt", P10, C13[:4], R5[:3], ("truncated", 8, 4, 3)),
    ("truncate_response", P10, C13[:4], R5[:3], ("dropped",)),
    ("drop", P10, C13[:4], R5[:3], ("dropped",)),
    # prompt fits, total 6 + 13 = 19 > max_length=16: responses get 16 - 6 = 10
    ("truncate_prompt", P6, C13, R5, ("truncated", 6, 10, 5)),
    ("truncate_response", P6, C13, R5, ("truncated", 6, 10, 5)),
    ("drop", P6, C13, R5, ("dropped",)),
    # both over: prompt -> 8, responses get 8
    ("truncate_prompt", P10, C13, R5, ("truncated", 8, 8, 5)),
])
def test_over_length_policies_exact_lengths(policy, prompt, chosen, rejected, expected):
    fitted = fit_lengths(prompt, chosen, rejected, max_length=16, max_prompt_length=8, policy=policy)
    assert fitted.status == expected[0]
    if fitted.status == "dropped":
        assert fitted.reason
        return
    assert (len(fitted.prompt), len(fitted.chosen), len(fitted.rejected)) == expected[1:]
    assert fitted.prompt == prompt[len(prompt) - expected[1]:]  # left truncation keeps the end
    assert fitted.chosen == chosen[:expected[2]]  # right truncation keeps the start
    assert fitted.rejected == rejected[:expected[3]]


def test_left_truncation_keeps_bos_in_front():
    fitted = fit_lengths([1] + P10, C13[:2], R5[:2], max_length=16, max_prompt_length=4,
                         policy="truncate_prompt", bos_id=1)
    assert fitted.prompt == [1, 107, 108, 109]


def test_pair_dropped_when_no_room_or_identical_after_cut():
    no_room = fit_lengths(P10, C13, R5, max_length=8, max_prompt_length=8, policy="truncate_prompt")
    assert no_room.status == "dropped" and "leaves no room for responses" in no_room.reason
    same_start = fit_lengths(P6, [7, 7, 7, 1], [7, 7, 7, 2], max_length=9, max_prompt_length=8,
                             policy="truncate_response")
    assert same_start.status == "dropped"
    assert "identical within the first 3 response tokens" in same_start.reason
    same_ids = fit_lengths(P6, [7, 1], [7, 1], max_length=16, max_prompt_length=8, policy="drop")
    assert (same_ids.status, same_ids.reason) == ("dropped", "chosen and rejected tokenize to the same ids")


def test_texts_that_tokenize_identically_are_dropped(tok):
    pair = normalize_row({"prompt": "describe", "chosen": "zebra", "rejected": "yak"})  # both [UNK]
    result = PairTokenizer(tok, data_config())(pair, source="u.jsonl", line=2)
    assert result.status == "dropped"
    assert result.reason == "u.jsonl:2: chosen and rejected tokenize to the same ids"


def test_truncated_pair_through_tokenizer(tok):
    cfg = data_config(max_length=12, max_prompt_length=5, over_length="truncate_prompt")
    pair = normalize_row({"prompt": "describe " + words(6, ("river", "garden")),
                          "chosen": words(10), "rejected": "dull grim"})
    result = PairTokenizer(tok, cfg)(pair, source="x", line=1)
    r = result.row
    assert result.status == "truncated" and r["truncated"] is True
    # prompt 1 BOS + 7 words -> BOS + last 4; responses get 12 - 5 = 7 of 11 (10 words + EOS)
    assert r["prompt_ids"] == [tok.bos_token_id] + ids(tok, "river garden river garden")
    assert r["chosen_ids"] == ids(tok, words(7))  # cut: no EOS
    assert r["rejected_ids"] == ids(tok, "dull grim") + [tok.eos_token_id]
    assert "prompt cut from 8 to 5" in result.reason and "chosen cut from 11 to 7" in result.reason


def test_dropped_pair_through_tokenizer(tok):
    cfg = data_config(max_length=6, max_prompt_length=4, over_length="drop")
    result = PairTokenizer(tok, cfg)(normalize_row({"prompt": "describe", "chosen": words(8),
                                                    "rejected": "dull"}), source="x", line=4)
    assert result == TokenizeResult(None, "dropped", result.reason, ("over_length",), (2, 9))
    assert result.reason.startswith("x:4: prompt 2 + longest response 9 tokens exceeds")


# --------------------------------------------------------------------------- bad rows and counters


def test_on_bad_row_error_raises_with_location(tok):
    pt = PairTokenizer(tok, data_config(on_bad_row="error"))
    with pytest.raises(BadRowError, match=r"^train-00001\.jsonl:12: missing field 'chosen'"):
        pt.tokenize_raw_row({"prompt": "p", "rejected": "r"}, source="train-00001.jsonl", line=12)


def test_on_bad_row_skip_counts_instead_of_raising(tok):
    cfg = data_config(max_length=10, max_prompt_length=4, on_bad_row="skip")
    pt = PairTokenizer(tok, cfg)
    rows = [
        {"prompt": "describe", "chosen": "bright", "rejected": "dull"},          # ok
        {"prompt": "describe", "chosen": words(12), "rejected": "dull"},         # truncated
        {"prompt": "describe", "chosen": "bright"},                              # skipped
        {"prompt": "describe", "chosen": "", "rejected": "dull"},                # skipped
        {"prompt": "describe", "chosen": "same", "rejected": "same"},            # skipped
        {"prompt": "describe the river", "chosen": "calm kind", "rejected": "x"},  # ok
    ]
    results = [pt.tokenize_raw_row(row, source="f.jsonl", line=i + 1) for i, row in enumerate(rows)]
    assert [r.status for r in results] == ["ok", "truncated", "skipped", "skipped", "skipped", "ok"]
    assert results[2].reason.startswith("f.jsonl:3: missing field 'rejected'")
    assert results[2].row is None

    counters = DataCounters()
    for result in results:
        counters.add(result)
    assert (counters.read, counters.ok, counters.truncated, counters.dropped, counters.skipped) == (6, 2, 1, 0, 3)
    assert counters.read == counters.ok + counters.truncated + counters.dropped + counters.skipped
    assert counters.kept == 3
    assert counters.skip_reasons == [results[i].reason for i in (2, 3, 4)]


def test_counters_merge_equals_counting_all_and_keeps_few_examples():
    statuses = ["ok", "truncated", "dropped", "skipped"] * 5 + ["ok"] * 3
    results = [TokenizeResult(None, s, f"{s} {i}") for i, s in enumerate(statuses)]
    whole = DataCounters(max_examples=3)
    for result in results:
        whole.add(result)
    parts = [DataCounters(max_examples=3) for _ in range(3)]
    for i, result in enumerate(results):
        parts[i % 3].add(result)
    merged = functools.reduce(DataCounters.merge, parts, DataCounters(max_examples=3))
    counts = lambda c: (c.read, c.ok, c.truncated, c.dropped, c.skipped)  # noqa: E731
    assert counts(merged) == counts(whole) == (23, 8, 5, 5, 5)
    assert len(merged.skip_reasons) == len(merged.drop_reasons) == 3
    assert whole.skip_reasons == ["skipped 3", "skipped 7", "skipped 11"]
    assert DataCounters.from_dict(whole.as_dict()) == whole
    with pytest.raises(ValueError, match="unknown status 'weird'"):
        whole.add(TokenizeResult(None, "weird"))


def test_invalid_config_is_rejected_listing_valid_values(tok):
    with pytest.raises(ValueError, match=r"over_length='cut' \(valid: truncate_prompt, truncate_response, drop\)"):
        PairTokenizer(tok, data_config(over_length="cut"))
    with pytest.raises(ValueError, match=r"max_length=0 \(a positive integer\)"):
        PairTokenizer(tok, data_config(max_length=0))


def test_works_with_the_real_data_config(tok):
    from ray_dpo.config import DataConfig

    pt = PairTokenizer(tok, DataConfig())
    result = pt.tokenize_raw_row({"prompt": "describe", "chosen": "bright", "rejected": "dull"},
                                 source="f", line=1)
    assert result.status == "ok"


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_whole_tiny_dataset_tokenizes_without_unknown_words(tok, fmt):
    from ray_dpo.testing.assets import make_preference_rows

    pt = PairTokenizer(tok, data_config())
    counters = DataCounters()
    for i, row in enumerate(make_preference_rows(200, seed=1, fmt=fmt)):
        result = pt.tokenize_raw_row(row, source="tiny", line=i + 1)
        counters.add(result)
        r = result.row
        assert tok.unk_token_id not in r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"]
        assert r["chosen_ids"][-1] == r["rejected_ids"][-1] == tok.eos_token_id
    assert counters.ok == counters.read == 200


# --------------------------------------------------------------------------- encode_prompt


def test_encode_prompt_text_equals_the_pair_rows_prompt(tok):
    pt = PairTokenizer(tok, data_config())
    prompt = "describe the river near the village"
    row = pt(normalize_row({"prompt": prompt, "chosen": "bright calm", "rejected": "dull grim"})).row
    assert pt.encode_prompt(prompt) == row["prompt_ids"]
    assert pt.encode_prompt(prompt) == [tok.bos_token_id] + ids(tok, prompt)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "describe the river"}],
    [{"role": "system", "content": "be kind"},
     {"role": "user", "content": "describe the river"},
     {"role": "assistant", "content": "calm river"},
     {"role": "user", "content": "tell about the forest"}],
])
def test_encode_prompt_chat_equals_the_pair_rows_prompt(tok, messages):
    pt = PairTokenizer(tok, data_config(max_length=128, max_prompt_length=64))
    row = pt.tokenize_raw_row({"prompt": messages,
                               "chosen": [{"role": "assistant", "content": "bright calm"}],
                               "rejected": [{"role": "assistant", "content": "dull grim"}]},
                              source="c", line=1).row
    got = pt.encode_prompt(messages)
    assert got == row["prompt_ids"]
    assert got[0] == tok.bos_token_id and got.count(tok.bos_token_id) == 1  # the template's BOS, once
    assert tok.decode(got[-1:]) == "<|assistant|>"  # ends with the generation prompt


def test_encode_prompt_chat_without_template_raises(tok):
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        PairTokenizer(no_template, data_config()).encode_prompt([{"role": "user", "content": "hi"}])


def test_encode_prompt_over_long_keeps_bos_and_the_last_tokens(tok):
    cfg = data_config(max_length=64, max_prompt_length=5)
    pt = PairTokenizer(tok, cfg)
    prompt = "describe " + words(9, ("river", "garden", "stone"))  # BOS + 10 words = 11 tokens
    got = pt.encode_prompt(prompt)
    assert len(got) == 5
    assert got == [tok.bos_token_id] + ids(tok, "stone river garden stone")  # words 6..9 of the 9
    row = pt(normalize_row({"prompt": prompt, "chosen": "bright", "rejected": "dull"})).row
    assert got == row["prompt_ids"]  # same cut as truncate_prompt


def test_encode_prompt_over_long_chat_cuts_inside_the_message_not_the_header(tok):
    pt = PairTokenizer(tok, data_config(max_length=64, max_prompt_length=4))
    messages = [{"role": "user", "content": "describe the river"}]
    # <|bos|> <|user|> describe the river <|assistant|> = 6 tokens: the user message keeps
    # its header and the last word of its content (a token-level tail would lose <|user|>).
    assert pt.encode_prompt(messages) == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")] + \
        ids(tok, "river") + [tok.convert_tokens_to_ids("<|assistant|>")]


def test_encode_prompt_over_long_without_bos_keeps_the_last_tokens():
    ctok = _char_level_tokenizer()
    pt = PairTokenizer(ctok, data_config(max_length=64, max_prompt_length=3))
    assert pt.encode_prompt("abcdef") == ctok.convert_tokens_to_ids(["d", "e", "f"])
    assert pt.encode_prompt("ab") == ctok.convert_tokens_to_ids(["a", "b"])  # short: untouched


# --------------------------------------------------------------------------- chat-aware truncation

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = ("system", "user", "assistant", "be", "kind", "and", "brief", "how", "to", "use",
              "those", "tools", "river", "garden", "stone", "lamp", "bright", "calm", "dull", "grim")


@functools.lru_cache(maxsize=None)
def _chatml_tokenizer():
    """SmolLM2-like: BOS is "<|im_start|>" (the template writes it before every message),
    EOS and pad are "<|im_end|>"; the tokenizer adds no BOS by itself."""
    specials = ["<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + list(CHAT_WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="[UNK]", chat_template=CHATML)


def _long_conversation(turns=8, words_per_turn=8):
    pool = CHAT_WORDS[7:]
    messages = [{"role": "system", "content": "be kind and brief"}]
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        text = " ".join(pool[(t * 3 + i) % len(pool)] for i in range(words_per_turn))
        messages.append({"role": role, "content": text})
    return messages  # odd turns: ends with a user turn


def _chat_row(prompt):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": "bright calm"}],
            "rejected": [{"role": "assistant", "content": "dull grim"}]}


def _assert_well_formed(ctok, prompt_ids):
    """Every message starts with a full header: <|im_start|> then a role, never doubled."""
    start = ctok.bos_token_id
    roles = set(ctok.convert_tokens_to_ids(["system", "user", "assistant"]))
    assert prompt_ids[0] == start
    for i, token in enumerate(prompt_ids):
        if token == start:
            assert prompt_ids[i + 1] in roles, ctok.convert_ids_to_tokens(prompt_ids[i:i + 3])
    text = ctok.decode(prompt_ids).replace(" ", "")
    assert "<|im_start|><|im_start|>" not in text


def test_long_chat_drops_earliest_turns_keeps_system_prompt_and_headers():
    ctok = _chatml_tokenizer()
    limit = 40
    messages = _long_conversation(turns=9)  # system + 9 turns, user first and last: ~110 tokens
    assert messages[-1]["role"] == "user"
    pt = PairTokenizer(ctok, data_config(max_length=64, max_prompt_length=limit))
    full = ids(ctok, ctok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert len(full) > 2 * limit
    result = pt.tokenize_raw_row(_chat_row(messages), source="long.jsonl", line=3)
    prompt = result.row["prompt_ids"]
    assert result.status == "truncated" and result.causes == ("prompt_turns_dropped",)
    assert result.lengths == (len(full), 3)  # before fitting: whole prompt, "bright calm <|im_end|>"
    assert len(prompt) <= limit
    _assert_well_formed(ctok, prompt)
    # It is exactly the rendering of the system prompt + the last turns, starting at a user turn.
    kept = [m for m in messages[1:] if m["content"] in ctok.decode(prompt)]
    assert kept == messages[len(messages) - len(kept):] and kept[0]["role"] == "user"
    assert prompt == ids(ctok, ctok.apply_chat_template([messages[0]] + kept, add_generation_prompt=True,
                                                        tokenize=False))
    # The fewest turns were dropped: one more user turn (and its answer) would not fit.
    longer = [messages[0]] + messages[len(messages) - len(kept) - 2:]
    assert len(ids(ctok, ctok.apply_chat_template(longer, add_generation_prompt=True, tokenize=False))) > limit
    assert "dropped the first" in result.reason and "long.jsonl:3" not in result.reason
    # Held-out / online prompts are fitted the same way.
    assert pt.encode_prompt(messages) == prompt
    # truncate_response never cuts: the same row is dropped, with its own cause.
    dropped = PairTokenizer(ctok, data_config(max_length=64, max_prompt_length=limit,
                                              over_length="truncate_response")).tokenize_raw_row(
        _chat_row(messages), source="long.jsonl", line=3)
    assert (dropped.status, dropped.causes) == ("dropped", ("prompt_over_limit",))


def test_long_last_message_is_cut_inside_its_content_from_the_left():
    ctok = _chatml_tokenizer()
    words_ = " ".join(CHAT_WORDS[7 + i % 13] for i in range(60))
    messages = [{"role": "system", "content": "be kind and brief"},
                {"role": "user", "content": "how to use those tools"},
                {"role": "assistant", "content": "calm river"},
                {"role": "user", "content": words_}]
    pt = PairTokenizer(ctok, data_config(max_length=64, max_prompt_length=30))
    result = pt.tokenize_raw_row(_chat_row(messages), source="s", line=1)
    prompt = result.row["prompt_ids"]
    assert result.status == "truncated"
    assert result.causes == ("prompt_turns_dropped", "prompt_message_cut")
    assert len(prompt) == 30  # the cut takes as much of the message as fits
    _assert_well_formed(ctok, prompt)
    tokens = ctok.convert_ids_to_tokens(prompt)
    assert tokens[:7] == ["<|im_start|>", "system", "be", "kind", "and", "brief", "<|im_end|>"]
    assert tokens[7:9] == ["<|im_start|>", "user"] and tokens[-2:] == ["<|im_start|>", "assistant"]
    kept_words = tokens[9:-3]  # ... <|im_end|> <|im_start|> assistant
    assert tokens[-3] == "<|im_end|>"
    assert kept_words == words_.split()[-len(kept_words):]  # the end of the message, closest to the answer
    assert "cut the user message to its last" in result.reason


def test_prompt_that_cannot_fit_is_dropped_with_a_reason():
    ctok = _chatml_tokenizer()
    messages = [{"role": "system", "content": " ".join(["kind"] * 40)},
                {"role": "user", "content": "how to use those tools"}]
    pt = PairTokenizer(ctok, data_config(max_length=64, max_prompt_length=20))
    result = pt.tokenize_raw_row(_chat_row(messages), source="n.jsonl", line=5)
    assert (result.row, result.status, result.causes) == (None, "dropped", ("prompt_no_room",))
    assert result.lengths == (53, 3)  # system 43 + user 8 + generation prompt 2
    assert result.reason.startswith("n.jsonl:5: prompt of 53 tokens cannot fit max_prompt_length=20")
    assert "shorten the system prompt or raise data.max_prompt_length" in result.reason
    with pytest.raises(BadRowError, match=r"^held\.jsonl:2: prompt of 53 tokens cannot fit"):
        pt.encode_prompt(messages, source="held.jsonl", line=2)


def test_fit_chat_prompt_never_starts_with_an_assistant_turn():
    def encode(msgs):  # one token per message: easy to count
        return [0] * len(msgs)

    msgs = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e"})
    # 4 tokens allowed: dropping only "a" would start at an assistant turn; drop a, b.
    fit = fit_chat_prompt(msgs, 4, encode, lambda text: [0])
    assert fit.messages == msgs[2:] and fit.causes == ("prompt_turns_dropped",) and fit.raw_length == 5
    assert fit_chat_prompt(msgs, 5, encode, lambda text: [0]).messages == msgs  # fits: untouched


def test_text_prompt_cut_keeps_todays_tail_and_names_its_cause(tok):
    cfg = data_config(max_length=12, max_prompt_length=5)
    pair = normalize_row({"prompt": "describe " + words(6, ("river", "garden")), "chosen": words(10),
                          "rejected": "dull grim"})
    result = PairTokenizer(tok, cfg)(pair, source="x", line=1)
    assert result.row["prompt_ids"] == [tok.bos_token_id] + ids(tok, "river garden river garden")
    assert result.causes == ("prompt_text_cut", "response_cut") and result.lengths == (8, 11)


def test_text_prompt_cut_never_keeps_a_template_token_the_tokenizer_did_not_add():
    ctok = _chatml_tokenizer()  # BOS "<|im_start|>" is never added to plain text
    pt = PairTokenizer(ctok, data_config(max_length=64, max_prompt_length=3))
    got = pt.encode_prompt("<|im_start|> user how to use those tools")
    assert ctok.convert_ids_to_tokens(got) == ["use", "those", "tools"]


# --------------------------------------------------------------------------- exactly one EOS


def test_text_response_already_ending_with_eos_gets_no_second_one(tok):
    pt = PairTokenizer(tok, data_config())
    r = pt(normalize_row({"prompt": "describe", "chosen": "bright calm <|eos|>", "rejected": "dull grim"})).row
    assert r["chosen_ids"] == ids(tok, "bright calm") + [tok.eos_token_id]
    assert r["rejected_ids"] == ids(tok, "dull grim") + [tok.eos_token_id]
    ctok = _char_level_tokenizer()
    r = PairTokenizer(ctok, data_config())(normalize_row({"prompt": "a", "chosen": "yo<|im_end|>",
                                                          "rejected": "no"})).row
    assert r["chosen_ids"] == ctok.convert_tokens_to_ids(["y", "o", "<|im_end|>"])
    assert r["rejected_ids"] == ctok.convert_tokens_to_ids(["n", "o", "<|im_end|>"])


# --------------------------------------------------------------------------- per-reason counters


def test_counters_count_each_cause_and_length_percentiles_merge():
    ctok = _chatml_tokenizer()
    pt = PairTokenizer(ctok, data_config(max_length=48, max_prompt_length=30, on_bad_row="skip"))
    long_turns = _long_conversation(turns=9)
    rows = [
        _chat_row([{"role": "user", "content": "how to use those tools"}]),            # ok
        _chat_row(long_turns),                                                       # turns dropped
        _chat_row(long_turns[:2] + [{"role": "user", "content": " ".join(["river"] * 40)}]),  # + message cut
        _chat_row([{"role": "system", "content": " ".join(["kind"] * 40)},
                   {"role": "user", "content": "how"}]),                             # no room
        {"prompt": "how to use", "chosen": " ".join(["calm"] * 60), "rejected": "dull"},  # response cut
        {"prompt": "how to use", "chosen": "zebra", "rejected": "yak"},             # identical ids
        {"prompt": "how to use", "chosen": "bright"},                               # bad row
    ]
    results = [pt.tokenize_raw_row(row, source="f", line=i + 1) for i, row in enumerate(rows)]
    assert [r.status for r in results] == ["ok", "truncated", "truncated", "dropped", "truncated",
                                           "dropped", "skipped"]
    whole = DataCounters()
    for r in results:
        whole.add(r)
    assert (whole.read, whole.ok, whole.truncated, whole.dropped, whole.skipped) == (7, 1, 3, 2, 1)
    assert whole.truncated_by == {"prompt_turns_dropped": 2, "prompt_message_cut": 1, "response_cut": 1}
    assert whole.dropped_by == {"prompt_no_room": 1, "identical_responses": 1}
    assert whole.skipped_by == {"bad_row": 1}
    assert sum(whole.dropped_by.values()) == whole.dropped and sum(whole.skipped_by.values()) == whole.skipped
    # Merged per-block counters equal counting everything at once, histograms included.
    parts = [DataCounters(), DataCounters(), DataCounters()]
    for i, r in enumerate(results):
        parts[i % 3].add(r)
    merged = functools.reduce(DataCounters.merge, parts, DataCounters())
    assert merged == whole
    assert DataCounters.from_dict(json.loads(json.dumps(whole.as_dict()))) == whole
    lengths = [r.lengths for r in results if r.lengths is not None]
    prompts = sorted(p for p, _ in lengths)
    summary = whole.length_summary()
    assert summary["prompt"] == {"p50": prompts[2], "p90": prompts[-1], "p99": prompts[-1],
                                 "max": prompts[-1], "n": 6}
    assert summary["total"]["max"] == max(p + r for p, r in lengths)


def test_length_histogram_is_bounded_and_close():
    h = LengthHistogram()
    for value in range(1, 100_001):
        h.add(value)
    assert len(h.counts) < 400
    assert h.percentile(50) == pytest.approx(50_000, rel=0.0625) and h.percentile(50) >= 50_000
    assert h.percentile(100) == h.max == 100_000
    small = LengthHistogram()
    for value in (3, 1, 2, 100, 7):
        small.add(value)
    assert [small.percentile(q) for q in (20, 50, 90)] == [1, 3, 100]  # exact below 128
    assert LengthHistogram().percentile(50) == 0


def test_counters_from_results_without_causes_stay_consistent():
    counters = DataCounters()
    counters.add(TokenizeResult(None, "dropped", "old-style result"))
    assert counters.dropped_by == {"unspecified": 1} and counters.lengths["prompt"].n == 0
