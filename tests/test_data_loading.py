"""Loading personalized preference data: formats, TRL layouts, one-line validation errors, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prlhf.data.loading import load_records
from prlhf.data.schema import DataError, PreferenceRecord
from prlhf.data.summary import format_summary, summarize

GOOD = {"user_id": "u1", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}
USER = {"role": "user", "content": "Say hi."}
SYSTEM = {"role": "system", "content": "Be kind."}


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def assert_one_line_error(err: DataError, source: Path | str, location: str | None, field: str | None,
                          *fragments: str) -> None:
    text = str(err)
    assert "\n" not in text
    assert text.startswith(str(source))
    assert (err.location, err.field) == (location, field)
    if location:
        assert f", {location}" in text
    if field:
        assert f"field '{field}'" in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# ------------------------------------------------------------------------------------------------------
# Round trips


def test_jsonl_round_trip_skips_blank_lines_and_normalises_user_text(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([
        json.dumps(GOOD | {"extra": 1}),
        "",
        "   ",
        json.dumps(GOOD | {"user_id": "u2", "user_text": "I like short answers."}),
        json.dumps(GOOD | {"user_id": "u3", "user_text": "  "}),
        json.dumps(GOOD | {"user_id": "u4", "user_text": None}),
    ]) + "\n")
    records = load_records(path)
    assert records == [
        PreferenceRecord("u1", "Say hi.", "Hi!", "Go away."),
        PreferenceRecord("u2", "Say hi.", "Hi!", "Go away.", "I like short answers."),
        PreferenceRecord("u3", "Say hi.", "Hi!", "Go away."),
        PreferenceRecord("u4", "Say hi.", "Hi!", "Go away."),
    ]


def test_json_array_and_json_lines(tmp_path):
    rows = [GOOD, GOOD | {"user_id": "u2"}]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, indent=2))
    lines = write_jsonl(tmp_path / "lines.json", rows)
    expected = [PreferenceRecord(user, "Say hi.", "Hi!", "Go away.") for user in ("u1", "u2")]
    assert load_records(array) == expected
    assert load_records(lines) == expected
    assert load_records(str(lines)) == expected


def test_csv_round_trip_with_multiline_field_bom_and_extra_column(tmp_path):
    path = tmp_path / "data.csv"
    text = ('user_id,prompt,chosen,rejected,user_text,notes\r\n'
            'u1,"Say hi,\nplease.",Hi!,Go away.,,x\r\n'
            '\r\n'
            '7,Say hi.,Hi!,Go away.,I am terse.,y\r\n')
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_records(path) == [
        PreferenceRecord("u1", "Say hi,\nplease.", "Hi!", "Go away."),
        PreferenceRecord("7", "Say hi.", "Hi!", "Go away.", "I am terse."),
    ]


def test_parquet_round_trip_plain_and_conversational(tmp_path):
    path = tmp_path / "data.parquet"
    rows = [
        {"user_id": "u1", "prompt": [USER], "chosen": [msg("assistant", "Hi!")],
         "rejected": [msg("assistant", "No.")], "user_text": None},
        {"user_id": "u2", "prompt": [SYSTEM, USER], "chosen": [msg("assistant", "Hello.")],
         "rejected": [msg("assistant", "Bye.")], "user_text": "Be brief."},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_records(path)
    assert records == [
        PreferenceRecord("u1", [USER], [msg("assistant", "Hi!")], [msg("assistant", "No.")]),
        PreferenceRecord("u2", [SYSTEM, USER], [msg("assistant", "Hello.")], [msg("assistant", "Bye.")], "Be brief."),
    ]


def test_parquet_plain_strings(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD | {"user_id": "u2"}]), path)
    assert [r.user_id for r in load_records(path)] == ["u1", "u2"]


def test_datasets_dataset_and_datasetdict_with_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list([GOOD, GOOD | {"user_id": "u2"}]).save_to_disk(str(single))
    assert [r.user_id for r in load_records(single)] == ["u1", "u2"]

    splits = tmp_path / "splits"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([GOOD]),
        "test": datasets.Dataset.from_list([GOOD | {"user_id": "t1"}, GOOD | {"user_id": "t2"}]),
    }).save_to_disk(str(splits))
    assert [r.user_id for r in load_records(splits)] == ["u1"]
    assert [r.user_id for r in load_records(f"{splits}::test")] == ["t1", "t2"]


def test_trl_explicit_conversational_via_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"user_id": "u1", "prompt": [USER], "chosen": [msg("assistant", "Hi!")],
             "rejected": [msg("assistant", "No.")]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == [
        PreferenceRecord("u1", [USER], [msg("assistant", "Hi!")], [msg("assistant", "No.")])]


def test_trl_explicit_conversational_prompt_with_plain_responses(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD | {"prompt": [USER]}])
    assert load_records(path) == [PreferenceRecord("u1", [USER], "Hi!", "Go away.")]


def test_trl_implicit_prompt_is_longest_common_prefix(tmp_path):
    follow_up = [USER, msg("assistant", "Hi!"), msg("user", "Again?")]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"user_id": "u1", "chosen": [SYSTEM, USER, msg("assistant", "Hello!")],
         "rejected": [SYSTEM, USER, msg("assistant", "No.")]},
        {"user_id": "u2", "chosen": follow_up + [msg("assistant", "Hi again!")],
         "rejected": follow_up + [msg("assistant", "No."), msg("user", "?")]},
    ])
    assert load_records(path) == [
        PreferenceRecord("u1", [SYSTEM, USER], [msg("assistant", "Hello!")], [msg("assistant", "No.")]),
        PreferenceRecord("u2", follow_up, [msg("assistant", "Hi again!")], [msg("assistant", "No."), msg("user", "?")]),
    ]


def test_trl_implicit_via_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"user_id": "u1", "chosen": [USER, msg("assistant", "A")], "rejected": [USER, msg("assistant", "B")]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(path) == [PreferenceRecord("u1", [USER], [msg("assistant", "A")], [msg("assistant", "B")])]


# ------------------------------------------------------------------------------------------------------
# Row validation (one rule per case; the bad record is always on line 2)

CONV = {"user_id": "u1", "prompt": [USER], "chosen": [msg("assistant", "A")], "rejected": [msg("assistant", "B")]}

ROW_CASES = {
    "missing field": ({k: v for k, v in GOOD.items() if k != "chosen"}, "chosen",
                      ["missing required field", "'prompt'"]),
    "missing user_id": ({k: v for k, v in GOOD.items() if k != "user_id"}, "user_id", ["missing required field"]),
    "null prompt": (GOOD | {"prompt": None}, "prompt", ["found null"]),
    "null user_id": (GOOD | {"user_id": None}, "user_id", ["expected a string", "found null"]),
    "number prompt": (GOOD | {"prompt": 5}, "prompt", ["expected a string or a list", "found integer 5"]),
    "dict prompt": (GOOD | {"prompt": {"text": "hi"}}, "prompt", ["found object {'text': 'hi'}"]),
    "empty chosen": (GOOD | {"chosen": ""}, "chosen", ["expected non-empty text", "found string ''"]),
    "blank rejected": (GOOD | {"rejected": " \t"}, "rejected", ["expected non-empty text"]),
    "blank prompt": (GOOD | {"prompt": "\n"}, "prompt", ["expected non-empty text"]),
    "blank user_id": (GOOD | {"user_id": "  "}, "user_id", ["expected a non-empty string"]),
    "int user_id": (GOOD | {"user_id": 7}, "user_id",
                    ["expected a string, found integer 7", 'quote the id (e.g. "7")']),
    "identical strings": (GOOD | {"chosen": "Same ", "rejected": " Same"}, "rejected", ["identical to 'chosen'"]),
    "identical messages": (CONV | {"rejected": [msg("assistant", "A ")]}, "rejected", ["identical to 'chosen'"]),
    "message not a dict": (CONV | {"prompt": ["hi"]}, "prompt", ["message 1", "found string 'hi'"]),
    "bad role": (CONV | {"prompt": [SYSTEM, msg("human", "hi")]}, "prompt", ["message 2", "one of system, user",
                                                                            "found string 'human'"]),
    "missing role": (CONV | {"chosen": [{"content": "A"}]}, "chosen", ["message 1", "'role'", "found null"]),
    "sharegpt": (CONV | {"prompt": [{"from": "human", "value": "hi"}]}, "prompt", ["ShareGPT"]),
    "content not str": (CONV | {"rejected": [{"role": "assistant", "content": 3}]}, "rejected",
                        ["'content' to be a string", "found integer 3"]),
    "empty conversation": (CONV | {"chosen": []}, "chosen", ["non-empty list of messages"]),
    "empty contents": (CONV | {"prompt": [msg("user", " ")]}, "prompt", ["only empty message contents"]),
    "plain prompt, message response": (GOOD | {"chosen": [msg("assistant", "A")]}, "chosen", ["plain text"]),
    "user_text type": (GOOD | {"user_text": ["short"]}, "user_text", ["expected a string or null", "found list"]),
    "implicit without conversations": ({k: v for k, v in GOOD.items() if k != "prompt"}, "prompt",
                                       ["missing required field", "full conversations"]),
    "implicit no common prefix": ({"user_id": "u1", "chosen": [msg("user", "a"), msg("assistant", "b")],
                                   "rejected": [msg("user", "x"), msg("assistant", "y")]}, "prompt",
                                  ["share no leading messages"]),
    "implicit nothing after prefix": ({"user_id": "u1", "chosen": [USER],
                                       "rejected": [USER, msg("assistant", "y")]}, "chosen",
                                      ["at least one message after the 1 prompt message"]),
}


@pytest.mark.parametrize("row, field, fragments", ROW_CASES.values(), ids=ROW_CASES.keys())
def test_row_validation(tmp_path, row, field, fragments):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert_one_line_error(info.value, path, "line 2", field, *fragments)


def test_long_values_are_truncated(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD | {"prompt": {"text": "x" * 500}}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert_one_line_error(info.value, path, "line 1", "prompt", "...")
    assert len(info.value.detail) < 120


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", "", GOOD | {"user_id": 7}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert_one_line_error(info.value, path, "line 4", "user_id")


# ------------------------------------------------------------------------------------------------------
# File-level errors


def load_error(path: Path | str) -> DataError:
    with pytest.raises(DataError) as info:
        load_records(path)
    return info.value


def test_file_not_found(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert_one_line_error(load_error(path), path, None, None, "file not found")


def test_unsupported_format(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    assert_one_line_error(load_error(path), path, None, None, "unsupported format '.txt'", ".jsonl", ".parquet",
                          "save_to_disk")


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"), ("e.csv", ""),
                                        ("h.csv", "user_id,prompt,chosen,rejected\n")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert_one_line_error(load_error(path), path, None, None, "no records found")


def test_invalid_json_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '{"user_id": "u1", "prompt": }'])
    assert_one_line_error(load_error(path), path, "line 2", None, "invalid JSON", "Expecting value", "column 29")


def test_json_line_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '["u1", "p", "a", "b"]'])
    assert_one_line_error(load_error(path), path, "line 2", None, "expected an object", "found list")


def test_json_array_element_not_an_object(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, "oops"]))
    assert_one_line_error(load_error(path), path, "row 2", None, "expected an object", "found string 'oops'")


def test_json_array_row_error_uses_row_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, GOOD | {"chosen": None}], indent=2))
    assert_one_line_error(load_error(path), path, "row 3", "chosen", "found null")


def test_invalid_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"user_id": "u1"},\n  {"user_id": }\n]\n')
    assert_one_line_error(load_error(path), path, "line 3", None, "invalid JSON", "Expecting value")


def test_invalid_json_lines_in_json_file(tmp_path):
    path = write_jsonl(tmp_path / "data.json", [GOOD, GOOD, "{nope"])
    assert_one_line_error(load_error(path), path, "line 3", None, "invalid JSON")


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + b'{"user_id": "u\xff"}\n')
    assert_one_line_error(load_error(path), path, "line 3", None, "not valid UTF-8", "0xff", "column 15")


def test_csv_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"user_id,prompt,chosen,rejected\nu1,p,a,b\nu2,p\xe9,a,b\n")
    assert_one_line_error(load_error(path), path, "line 3", None, "not valid UTF-8", "0xe9")


def test_csv_wrong_number_of_fields_counts_physical_lines(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('user_id,prompt,chosen,rejected\nu1,"two\nlines",a,b\nu2,p,a,b,extra\n')
    assert_one_line_error(load_error(path), path, "line 4", None, "expected 4 fields", "found 5")


def test_csv_row_error_line_number(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("user_id,prompt,chosen,rejected\nu1,p,a,b\nu2,p,same,same\n")
    assert_one_line_error(load_error(path), path, "line 3", "rejected", "identical")


def test_csv_empty_cell(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("user_id,prompt,chosen,rejected\n,p,a,b\n")
    assert_one_line_error(load_error(path), path, "line 2", "user_id", "non-empty")


def test_csv_header_missing_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("user,question,chosen,rejected\nu1,p,a,b\n")
    assert_one_line_error(load_error(path), path, "line 1", None, "missing required column(s) 'user_id', 'prompt'",
                          "found columns: 'user', 'question', 'chosen', 'rejected'")


def test_parquet_int_user_id(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "prompt": ["p", "p"],
                             "chosen": ["a", "a"], "rejected": ["b", "b"]}), path)
    assert_one_line_error(load_error(path), path, "row 1", "user_id", "expected a string, found integer 1", "quote")


def test_parquet_row_numbers(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD | {"prompt": ""}]), path)
    assert_one_line_error(load_error(path), path, "row 2", "prompt", "non-empty")


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    assert_one_line_error(load_error(path), path, None, None, "not a readable Parquet file")


def test_datasetdict_unknown_split_lists_available(tmp_path):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "ds"
    datasets.DatasetDict({"dev": datasets.Dataset.from_list([GOOD]),
                          "test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(directory))
    assert_one_line_error(load_error(directory), directory, None, None, "split 'train' not found", "DIR::SPLIT",
                          "available splits: 'dev', 'test'")
    source = f"{directory}::validation"
    assert_one_line_error(load_error(source), source, None, None, "split 'validation' not found", "'dev', 'test'")


def test_datasets_row_error_and_split_on_single_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "ds"
    datasets.Dataset.from_list([GOOD, GOOD | {"rejected": "Hi!"}]).save_to_disk(str(directory))
    assert_one_line_error(load_error(directory), directory, "row 2", "rejected", "identical")
    source = f"{directory}::test"
    assert_one_line_error(load_error(source), source, None, None, "not a DatasetDict")


def test_directory_that_is_not_a_dataset(tmp_path):
    assert_one_line_error(load_error(tmp_path), tmp_path, None, None, "not a dataset saved with")


def test_split_of_missing_directory(tmp_path):
    source = f"{tmp_path / 'missing'}::train"
    assert_one_line_error(load_error(source), source, None, None, "file not found")


# ------------------------------------------------------------------------------------------------------
# Summary


def test_summarize_and_format():
    records = [
        PreferenceRecord("u1", "abcd", "ab", "abcdef", "likes short"),
        PreferenceRecord("u1", "ab", "abcd", "a"),
        PreferenceRecord("u1", [msg("system", "ab"), msg("user", "cd")], [msg("assistant", "xyz")], "b"),
        PreferenceRecord("u2", "abcdefgh", "a", "ab", "x"),
    ]
    summary = summarize(records)
    assert summary == {
        "rows": 4,
        "users": 2,
        "pairs_per_user": {"min": 1, "median": 2, "max": 3},
        "has_user_text": 2,
        "conversational": 1,
        "chars": {
            "prompt": {"min": 2, "median": 4.5, "max": 8},  # the conversation counts "ab\ncd" = 5
            "chosen": {"min": 1, "median": 2.5, "max": 4},
            "rejected": {"min": 1, "median": 1.5, "max": 6},
        },
    }
    text = format_summary(summary, "data.jsonl")
    assert text.splitlines()[0] == "data.jsonl: 4 rows, 2 users"
    assert "pairs/user: min 1, median 2, max 3" in text
    assert "prompt chars: min 2, median 4.5, max 8" in text
    assert len(text.splitlines()) == 6


def test_summarize_empty():
    summary = summarize([])
    assert summary["rows"] == 0 and summary["pairs_per_user"] == {"min": None, "median": None, "max": None}
    assert "0 rows, 0 users" in format_summary(summary, "x")
