"""How a .json data file is read (ray_dpo/data/readers.py): an array, JSON lines, or one object."""

from __future__ import annotations

import json

from ray_dpo.data.readers import _json_records

ROW = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}


def records(text: str):
    return list(_json_records(text.encode("utf-8")))


def test_an_array_and_json_lines_give_one_record_per_row():
    assert [json.loads(raw) for _, raw, _ in records(json.dumps([ROW, ROW]))] == [ROW, ROW]
    lines = records(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    assert [(n, json.loads(raw)) for n, raw, _ in lines] == [(1, ROW), (3, ROW)]


def test_one_object_over_several_lines_is_one_row_not_malformed_json():
    [(line, raw, error)] = records(json.dumps(ROW, indent=2))
    assert (line, json.loads(raw), error) == (1, ROW, None)


def test_one_object_holding_the_rows_under_a_key_says_where_they_are():
    [(line, raw, error)] = records(json.dumps({"data": [ROW, ROW]}, indent=2))
    assert raw is None and line == 1
    assert "under 'data'" in error and "JSON array" in error and "malformed" not in error


def test_a_broken_json_lines_file_still_names_its_line():
    [(first, _, _), (second, raw, _)] = records(json.dumps(ROW) + "\n{\"prompt\": \n")
    assert (first, second, raw) == (1, 2, '{"prompt": \n')
