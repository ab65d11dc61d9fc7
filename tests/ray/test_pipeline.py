"""ray_dpo.data.pipeline on a local Ray cluster: file discovery, Ray Data tokenization,
counters, bad-row errors and fingerprints (tiny word-level tokenizer of ray_dpo.testing)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.ray

SETTINGS = {"max_length": 64, "max_prompt_length": 32}


def data_config(**overrides):
    from ray_dpo.config import DataConfig

    return DataConfig(**{**SETTINGS, **overrides})


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def rows_of(n, seed):
    from ray_dpo.testing.assets import make_preference_rows

    return make_preference_rows(n, seed=seed)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """jsonl/ (nested, plus files that are not data), pq/, glob/ -> {"root", "rows": {name: rows}}."""
    root = tmp_path_factory.mktemp("pipeline_data")
    rows = {"train-00000.jsonl": rows_of(10, 1), "train-00001.jsonl": rows_of(10, 2),
            "part-0.parquet": rows_of(8, 3), "a-1.jsonl": rows_of(5, 4), "a-2.jsonl": rows_of(5, 5)}
    write_jsonl(root / "jsonl" / "train-00000.jsonl", rows["train-00000.jsonl"])
    write_jsonl(root / "jsonl" / "sub" / "train-00001.jsonl", rows["train-00001.jsonl"])
    write_jsonl(root / "jsonl" / ".hidden.jsonl", rows_of(2, 9))
    (root / "jsonl" / "_SUCCESS").write_text("")
    (root / "jsonl" / "README.md").write_text("not data")
    write_parquet(root / "pq" / "part-0.parquet", rows["part-0.parquet"])
    write_jsonl(root / "glob" / "a-1.jsonl", rows["a-1.jsonl"])
    write_jsonl(root / "glob" / "a-2.jsonl", rows["a-2.jsonl"])
    (root / "glob" / "b.txt").write_text("not matched by the glob")
    return {"root": root, "rows": rows}


def build(files, tokenizer, **overrides):
    from ray_dpo.data.pipeline import build_pair_data

    chat_template = overrides.pop("chat_template", None)
    # Two tokenize tasks at most: each new worker process imports transformers (and torch),
    # which dominates a cold build on a 2-core machine.
    return build_pair_data(files, tokenizer_path=tokenizer, data=data_config(**overrides),
                           chat_template=chat_template, name="train", max_tokenize_tasks=2)


def all_rows(pair_data):
    return list(pair_data.dataset.iter_rows())


# --------------------------------------------------------------------------- expand_files


def test_expand_files_dirs_globs_and_files_in_pattern_order(tree):
    from ray_dpo.data.files import expand_files

    root = tree["root"]
    files = expand_files([str(root / "pq" / "part-0.parquet"), str(root / "jsonl"),
                          str(root / "glob" / "a-*.jsonl"), str(root / "jsonl")], key="data.train_files")
    assert [os.path.relpath(f, root) for f in files] == [
        "pq/part-0.parquet",
        "jsonl/sub/train-00001.jsonl", "jsonl/train-00000.jsonl",  # recursive, sorted by path
        "glob/a-1.jsonl", "glob/a-2.jsonl",
    ]  # hidden files, _SUCCESS and README.md skipped; the repeated directory adds nothing
    assert all(os.path.isabs(f) for f in files)


def test_expand_files_file_uris_use_pyarrow_fs(tree):
    from ray_dpo.data.files import expand_files

    root = str(tree["root"])
    assert expand_files([f"file://{root}/glob/a-?.jsonl"], key="k") == [
        f"file://{root}/glob/a-1.jsonl", f"file://{root}/glob/a-2.jsonl"]
    assert expand_files([f"file://{root}/jsonl"], key="k") == [
        f"file://{root}/jsonl/sub/train-00001.jsonl", f"file://{root}/jsonl/train-00000.jsonl"]
    assert expand_files([f"file://{root}/**/*.parquet"], key="k") == [f"file://{root}/pq/part-0.parquet"]


@pytest.mark.parametrize("pattern, match", [
    ("nope/missing.jsonl", r"data\.eval_files: '.*nope/missing\.jsonl' matches no"),
    ("glob/zzz-*.jsonl", r"data\.eval_files: '.*zzz-\*\.jsonl' matches no"),
    ("glob/b.txt", r"data\.eval_files: '.*b\.txt'.*unsupported extension"),
    ("glob/*", r"data\.eval_files: '.*b\.txt' \(from '.*glob/\*'\) has an unsupported extension"),
])
def test_expand_files_errors_name_key_and_pattern(tree, pattern, match):
    from ray_dpo.data.errors import DataError
    from ray_dpo.data.files import expand_files

    with pytest.raises(DataError, match=match):
        expand_files([str(tree["root"] / pattern)], key="data.eval_files")


def test_expand_files_errors_for_uri_and_empty_dir(tree, tmp_path):
    from ray_dpo.data.errors import DataError
    from ray_dpo.data.files import expand_files

    with pytest.raises(DataError, match=r"k: 'file://.*/nothing-here' matches no"):
        expand_files([f"file://{tree['root']}/nothing-here"], key="k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"k: '.*empty' matches no"):
        expand_files([str(tmp_path / "empty")], key="k")
    with pytest.raises(DataError, match="k: no files given"):
        expand_files([], key="k")


# --------------------------------------------------------------------------- building


def test_mixed_inputs_counters_order_and_tokens(ray_cluster, tiny_assets, tree):
    """JSONL directory + Parquet file + glob in one dataset: every row, in file order,
    tokenized exactly as PairTokenizer does in-process."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from ray_dpo.data.files import expand_files
    from ray_dpo.data.tokenize import PairTokenizer

    root = tree["root"]
    files = expand_files([str(root / "jsonl" / "train-00000.jsonl"), str(root / "jsonl" / "sub"),
                          str(root / "pq"), str(root / "glob" / "a-*.jsonl")], key="data.train_files")
    data = build(files, tiny_assets["tokenizer"])

    order = ["train-00000.jsonl", "train-00001.jsonl", "part-0.parquet", "a-1.jsonl", "a-2.jsonl"]
    expected_ids = [f"{name}:{i}" for name in order for i in range(1, len(tree["rows"][name]) + 1)]
    c = data.counters
    assert (c.read, c.ok + c.truncated, c.dropped, c.skipped) == (38, 38, 0, 0)
    assert data.num_pairs == data.dataset.count() == 38
    rows = all_rows(data)
    assert [r["pair_id"] for r in rows] == expected_ids
    schema = data.dataset.schema().base_schema
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert schema.field(column).type == pa.list_(pa.int32())

    tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(tiny_assets["tokenizer"]), data_config())
    for k in (0, 12, 20, 27, 37):  # first row, jsonl in a subdir, parquet rows 1 and 8, last
        name, line = expected_ids[k].rsplit(":", 1)
        want = tokenizer.tokenize_raw_row(tree["rows"][name][int(line) - 1], source=name, line=int(line))
        assert rows[k] == want.row


def test_dropped_truncated_skipped_and_empty_files_are_counted(ray_cluster, tiny_assets, tmp_path):
    long_words = " ".join(["river"] * 40)
    good = rows_of(2, 7)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        good[0],                                                      # 1 ok
        "",                                                           # 2 blank: not a row
        '{"prompt": "describe the river", "chosen": "calm"',           # 3 malformed JSON
        {"prompt": "describe", "chosen": "calm"},                      # 4 missing field
        {"prompt": long_words, "chosen": "calm", "rejected": "rude"},  # 5 prompt too long: dropped
        {**good[1], "chosen": long_words},                             # 6 response cut: truncated
    ])
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", ["[1, 2]", '{"chosen": "x"}'])
    (tmp_path / "empty.jsonl").write_text("")
    files = [mixed, all_bad, str(tmp_path / "empty.jsonl")]
    data = build(files, tiny_assets["tokenizer"], on_bad_row="skip", over_length="truncate_response",
                 max_length=32, max_prompt_length=16)

    c = data.counters
    assert (c.read, c.ok, c.truncated, c.dropped, c.skipped) == (7, 1, 1, 1, 4)
    assert c.read == c.ok + c.truncated + c.dropped + c.skipped
    assert c.skip_reasons[0].startswith("mixed.jsonl:3: malformed JSON")
    assert c.skip_reasons[1].startswith("mixed.jsonl:4: missing field 'rejected'")
    assert [r.split(":")[0] for r in c.skip_reasons[2:]] == ["all_bad.jsonl", "all_bad.jsonl"]
    assert c.drop_reasons == [c.drop_reasons[0]] and c.drop_reasons[0].startswith("mixed.jsonl:5:")
    # Why, per cause, merged across blocks (files are separate blocks).
    assert c.truncated_by == {"response_cut": 1} and c.dropped_by == {"prompt_over_limit": 1}
    assert c.skipped_by == {"malformed_json": 1, "bad_row": 3}
    assert c.lengths["prompt"].n == 3 and c.lengths["prompt"].max == 41  # BOS + 40 words, before fitting
    rows = all_rows(data)
    assert [(r["pair_id"], r["truncated"]) for r in rows] == [
        ("mixed.jsonl:1", False), ("mixed.jsonl:6", True)]
    assert len(rows[1]["prompt_ids"]) + len(rows[1]["chosen_ids"]) == 32
    assert data.num_pairs == 2 and data.token_stats["chosen"]["max"] == 32 - len(rows[1]["prompt_ids"])


@pytest.mark.parametrize("name, lines, match", [
    ("train-00001.jsonl", ["GOOD", "GOOD", {"prompt": "describe", "chosen": "calm"}, "GOOD"],
     r"^train-00001\.jsonl:3: missing field 'rejected'.*set data\.on_bad_row=skip"),
    ("bad.jsonl", ["GOOD", '{"prompt": "a", "chosen": ', "GOOD"],
     r"^bad\.jsonl:2: malformed JSON \(.*\); fix the line"),
    ("bad.parquet", [{"prompt": "p", "chosen": "calm", "rejected": "rude"},
                     {"prompt": "p", "chosen": "same", "rejected": "same"}],
     r"^bad\.parquet:2: chosen and rejected are identical"),
])
def test_bad_row_with_on_bad_row_error_raises_clean_data_error(ray_cluster, tiny_assets, tmp_path, capfd,
                                                               name, lines, match):
    from ray_dpo.data.errors import DataError

    good = iter(rows_of(4, 11))
    lines = [next(good) if line == "GOOD" else line for line in lines]
    first = write_jsonl(tmp_path / "train-00000.jsonl", rows_of(3, 12))
    writer = write_parquet if name.endswith(".parquet") else write_jsonl
    bad = writer(tmp_path / name, lines)
    with pytest.raises(DataError, match=match) as info:
        build([first, bad], tiny_assets["tokenizer"], on_bad_row="error")
    assert type(info.value) is DataError  # not Ray's RayTaskError wrapper
    assert "Failed to apply UDF" not in str(info.value) and "\n" not in str(info.value)
    # The one line is all the console gets: Ray Data's traceback of the failed task stays in its log.
    printed = capfd.readouterr()
    printed = printed.err + printed.out
    for ray_data_report in ("Dataset execution will now abort", "Exception occurred in", "open an issue"):
        assert ray_data_report not in printed, printed[-3000:]


def test_file_vanished_after_expansion_is_a_data_error(ray_cluster, tiny_assets, tmp_path):
    from ray_dpo.data.errors import DataError

    gone = write_jsonl(tmp_path / "gone.jsonl", rows_of(2, 1))
    os.remove(gone)
    with pytest.raises(DataError, match=r"^gone\.jsonl: cannot read .*gone\.jsonl"):
        build([gone], tiny_assets["tokenizer"])


def test_fingerprint_is_stable_and_sees_one_token_change(ray_cluster, tiny_assets, tree, tmp_path):
    files = [str(tree["root"] / "glob" / "a-1.jsonl"), str(tree["root"] / "glob" / "a-2.jsonl")]
    first = build(files, tiny_assets["tokenizer"])
    again = build(files, tiny_assets["tokenizer"])
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 64

    rows = [dict(r) for r in tree["rows"]["a-2.jsonl"]]
    words = rows[3]["chosen"].split()
    words[0] = "bright" if words[0] != "bright" else "calm"  # one token differs
    rows[3]["chosen"] = " ".join(words)
    changed_dir = tmp_path / "changed"
    changed_dir.mkdir()
    shutil.copy(files[0], changed_dir / "a-1.jsonl")
    changed = build([str(changed_dir / "a-1.jsonl"), write_jsonl(changed_dir / "a-2.jsonl", rows)],
                    tiny_assets["tokenizer"])
    assert changed.num_pairs == first.num_pairs
    assert changed.fingerprint != first.fingerprint
    swapped = build(files[::-1], tiny_assets["tokenizer"])  # same pairs, other order
    assert swapped.fingerprint != first.fingerprint


def test_chat_template_file_and_report(ray_cluster, tiny_assets, tmp_path):
    from ray_dpo.data.errors import DataError
    from ray_dpo.data.pipeline import build_pair_data
    from ray_dpo.data.report import data_report, format_report
    from ray_dpo.testing.assets import CHAT_TEMPLATE, make_preference_rows

    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    conv = write_jsonl(tmp_path / "conv.jsonl", make_preference_rows(6, seed=3, fmt="conversational"))
    data = build([conv], tiny_assets["tokenizer"], chat_template=str(template))
    assert data.num_pairs == 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    header = tok("<|assistant|>", add_special_tokens=False)["input_ids"]
    assert all(r["prompt_ids"][-len(header):] == header for r in all_rows(data))
    assert all(r["chosen_ids"][-1] == tok.eos_token_id for r in all_rows(data))

    report = data_report(data, data)
    assert json.loads(json.dumps(report)) == report
    assert report["train"]["num_pairs"] == 6 and report["eval"]["fingerprint"] == data.fingerprint
    assert report["train"]["counters"]["read"] == 6
    assert "6 pairs from 1 file(s)" in format_report(report)

    # The same template inline (e.g. --set "model.chat_template={{ bos_token }}...") gives the same pairs.
    assert build([conv], tiny_assets["tokenizer"], chat_template=CHAT_TEMPLATE).fingerprint == data.fingerprint
    assert report["train"]["lengths"]["prompt"]["n"] == 6
    assert "tokens before fitting, p50/p90/p99/max: prompt " in format_report(report)

    with pytest.raises(DataError, match="model.chat_template: 'no-such-template.jinja' is not a file"):
        build_pair_data([conv], tokenizer_path=tiny_assets["tokenizer"], data=data_config(),
                        chat_template="no-such-template.jinja")
