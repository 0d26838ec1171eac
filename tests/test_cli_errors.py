"""Bad input through the `prlhf` CLI: every malformed file or config is rejected with exit code 2 and ONE
stderr line `prlhf: error: FILE, line N, field 'F': ...`, no traceback, and nothing written to --out.

Most cases call `prlhf.cli.main.main([...])` in-process (fast); a few run `python -m prlhf` as a real
subprocess to prove that no traceback reaches the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prlhf.cli.main import main

GOOD = {"user_id": "u1", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}
GOOD_LINE = json.dumps(GOOD)
PREFIX = "prlhf: error: "


def jsonl_after_good(bad) -> bytes:
    """One good record on line 1, the bad one on line 2 (so the reported line number means something)."""
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    return (GOOD_LINE + "\n" + bad_line + "\n").encode()


def write_parquet_int_user_id(path: Path) -> None:
    table = pa.table({"user_id": [7, 8], "prompt": ["Say hi.", "Say bye."], "chosen": ["Hi!", "Bye!"],
                      "rejected": ["Go away.", "Stay."]})
    pq.write_table(table, path)


@dataclass(frozen=True)
class Bad:
    id: str
    name: str  # file name inside tmp_path
    content: bytes | Callable[[Path], None] | None  # None: do not create the file
    fragments: tuple[str, ...]  # besides the file name, each must appear in the error line


BAD_INPUTS = [
    Bad("unparsable_json_line", "bad.jsonl", jsonl_after_good('{"user_id": "u1", "prompt": '),
        ("line 2", "invalid JSON")),
    Bad("json_array_line", "bad.jsonl", jsonl_after_good('["u1", "Say hi.", "Hi!", "Go away."]'),
        ("line 2", "expected an object", "found list")),
    Bad("missing_user_id", "bad.jsonl", jsonl_after_good({k: v for k, v in GOOD.items() if k != "user_id"}),
        ("line 2", "field 'user_id'", "missing required field")),
    Bad("missing_chosen", "bad.jsonl", jsonl_after_good({k: v for k, v in GOOD.items() if k != "chosen"}),
        ("line 2", "field 'chosen'", "missing required field")),
    Bad("null_prompt", "bad.jsonl", jsonl_after_good(GOOD | {"prompt": None}),
        ("line 2", "field 'prompt'", "null")),
    Bad("prompt_is_number", "bad.jsonl", jsonl_after_good(GOOD | {"prompt": 42}),
        ("line 2", "field 'prompt'", "integer 42")),
    Bad("empty_chosen", "bad.jsonl", jsonl_after_good(GOOD | {"chosen": ""}),
        ("line 2", "field 'chosen'", "non-empty")),
    Bad("whitespace_rejected", "bad.jsonl", jsonl_after_good(GOOD | {"rejected": "   "}),
        ("line 2", "field 'rejected'", "non-empty")),
    Bad("int_user_id", "bad.jsonl", jsonl_after_good(GOOD | {"user_id": 17}),
        ("line 2", "field 'user_id'", "integer 17", "quote the id")),
    Bad("empty_user_id", "bad.jsonl", jsonl_after_good(GOOD | {"user_id": ""}),
        ("line 2", "field 'user_id'", "non-empty")),
    Bad("chosen_identical_to_rejected", "bad.jsonl", jsonl_after_good(GOOD | {"rejected": " Hi! "}),
        ("line 2", "field 'rejected'", "identical")),
    Bad("user_text_wrong_type", "bad.jsonl", jsonl_after_good(GOOD | {"user_text": ["short", "answers"]}),
        ("line 2", "field 'user_text'", "list")),
    Bad("message_missing_role", "bad.jsonl", jsonl_after_good(GOOD | {"prompt": [{"content": "Say hi."}]}),
        ("line 2", "field 'prompt'", "message 1", "'role'")),
    Bad("bad_role", "bad.jsonl",
        jsonl_after_good(GOOD | {"prompt": [{"role": "robot", "content": "Say hi."}]}),
        ("line 2", "field 'prompt'", "message 1", "'robot'")),
    Bad("csv_missing_column", "bad.csv", b"user_id,prompt,chosen\nu1,Say hi.,Hi!\n",
        ("line 1", "missing required column", "'rejected'")),
    Bad("csv_wrong_field_count", "bad.csv",
        b"user_id,prompt,chosen,rejected\nu1,Say hi.,Hi!,Go away.\nu2,Say hi.,Hi!\n",
        ("line 3", "expected 4 fields", "found 3")),
    Bad("invalid_utf8", "bad.jsonl", GOOD_LINE.encode() + b'\n{"user_id": "u\xff1"}\n',
        ("line 2", "not valid UTF-8", "0xff")),
    Bad("json_array_bad_row", "bad.json", json.dumps([GOOD, GOOD | {"chosen": None}]).encode(),
        ("row 2", "field 'chosen'", "null")),
    Bad("empty_file", "empty.jsonl", b"", ("no records found",)),
    Bad("blank_lines_only", "blank.jsonl", b"\n   \n\n", ("no records found",)),
    Bad("unsupported_extension", "data.txt", GOOD_LINE.encode() + b"\n", ("unsupported format", "'.txt'")),
    Bad("file_not_found", "missing.jsonl", None, ("file not found",)),
    Bad("parquet_int_user_id", "bad.parquet", write_parquet_int_user_id,
        ("row 1", "field 'user_id'", "integer 7")),
]


def make_bad(tmp_path: Path, case: Bad) -> Path:
    path = tmp_path / case.name
    if callable(case.content):
        case.content(path)
    elif case.content is not None:
        path.write_bytes(case.content)
    return path


def assert_one_line_error(err: str, *fragments: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(PREFIX), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything captured before
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to prove that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def good_data(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    rows = [GOOD, GOOD | {"user_id": "u2", "chosen": "Hello there!"}, GOOD | {"prompt": "Say bye.", "chosen": "Bye!"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------------
# Malformed data through `prlhf train`


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_train_rejects_bad_data_with_one_located_line(tmp_path, capsys, case):
    data = make_bad(tmp_path, case)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, ["train", "--data", str(data), "--out", str(out_dir), "--quiet"])
    assert code == 2
    assert out == ""
    line = assert_one_line_error(err, case.name, *case.fragments)
    assert line.startswith(PREFIX + str(data))  # the full path, as given on the command line
    assert not out_dir.exists(), "nothing may be written for bad input"


def test_at_least_fifteen_kinds_of_bad_data():
    assert len({c.id for c in BAD_INPUTS}) >= 18


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["unparsable_json_line", "csv_wrong_field_count", "parquet_int_user_id"])
def test_train_bad_data_in_a_real_process_prints_no_traceback(tmp_path, case_id):
    case = next(c for c in BAD_INPUTS if c.id == case_id)
    data = make_bad(tmp_path, case)
    out_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "prlhf", "train", "--data", str(data), "--out", str(out_dir),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, case.name, *case.fragments)
    assert not out_dir.exists()


# ------------------------------------------------------------------------------------------------------
# Bad config files and flags


CONFIG_CASES = [
    ("unknown_key", "alhpa: 0.5\n", ("cfg.yaml", "unknown key 'alhpa'")),
    ("wrong_type", "alpha: high\n", ("cfg.yaml", "key 'alpha'", "expected float", "'high'")),
    ("bool_for_int", "batch_size: true\n", ("cfg.yaml", "key 'batch_size'", "expected int")),
    ("invalid_yaml", "alpha: 0.5\nbeta: [1, 2\n", ("cfg.yaml", "line", "not valid YAML")),
    ("not_a_mapping", "- alpha\n- beta\n", ("cfg.yaml", "expected a mapping")),
]


@pytest.mark.parametrize("text,fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_train_rejects_bad_config_file(tmp_path, capsys, good_data, text, fragments):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, ["train", "--config", str(cfg), "--data", str(good_data),
                                      "--out", str(out_dir), "--quiet"])
    assert code == 2
    assert out == ""
    assert_one_line_error(err, *fragments)
    assert not out_dir.exists()


def test_train_rejects_missing_config_file(tmp_path, capsys, good_data):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, ["train", "--config", str(tmp_path / "nope.yaml"), "--data", str(good_data),
                                    "--out", str(out_dir)])
    assert code == 2
    assert_one_line_error(err, "nope.yaml", "config file not found")
    assert not out_dir.exists()


@pytest.mark.parametrize("flags,fragments", [
    (["--alpha", "1.5"], ("alpha", "[0, 1]")),
    (["--user-model", "bogus"], ("user_model", "individual")),
    (["--beta", "0"], ("beta", "> 0")),
    (["--user-tokens", "0"], ("user_tokens",)),
    (["--max-length", "64", "--max-prompt-length", "64"], ("max_length",)),
    (["--objective", "rm", "--beta", "0.1"], ("beta", "objective dpo only")),
], ids=["alpha_out_of_range", "unknown_user_model", "beta_zero", "no_user_tokens", "prompt_not_shorter",
        "beta_under_rm"])
def test_train_rejects_bad_flag_values(tmp_path, capsys, good_data, flags, fragments):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(out_dir), "--quiet", *flags])
    assert code == 2
    assert out == ""
    assert_one_line_error(err, *fragments)
    assert not out_dir.exists()


def test_bad_flag_in_config_file_is_rejected_too(tmp_path, capsys, good_data):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("alpha: 1.5\n")
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg), "--data", str(good_data), "--out", str(out_dir)])
    assert code == 2
    assert_one_line_error(err, "alpha must be in [0, 1]")
    assert not out_dir.exists()


# ------------------------------------------------------------------------------------------------------
# Existing --out directories


def test_train_refuses_a_non_empty_out_dir_without_resume(tmp_path, capsys, good_data):
    out_dir = tmp_path / "run"
    (out_dir / "sub").mkdir(parents=True)
    (out_dir / "notes.txt").write_text("keep me\n")
    (out_dir / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    before = tree(out_dir)
    code, out, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(out_dir), "--quiet"])
    assert code == 2
    assert out == ""
    assert_one_line_error(err, str(out_dir), "not empty", "another --out")
    assert tree(out_dir) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt", "sub"]


def test_train_refuses_an_unfinished_run_without_resume(tmp_path, capsys, good_data):
    out_dir = tmp_path / "run"
    (out_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (out_dir / "config.yaml").write_text("alpha: 0.5\n")
    before = tree(out_dir)
    code, _, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(out_dir), "--quiet"])
    assert code == 2
    assert_one_line_error(err, str(out_dir), "unfinished run", "--resume")
    assert tree(out_dir) == before


def test_bad_data_is_reported_before_touching_an_empty_out_dir(tmp_path, capsys):
    data = make_bad(tmp_path, BAD_INPUTS[0])
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, ["train", "--data", str(data), "--out", str(out_dir), "--quiet"])
    assert code == 2
    assert_one_line_error(err, "line 2")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------------
# `prlhf data validate` and `prlhf eval`


@pytest.mark.parametrize("case_id", ["missing_user_id", "csv_wrong_field_count", "invalid_utf8",
                                     "parquet_int_user_id", "file_not_found"])
def test_data_validate_rejects_bad_data_with_one_line(tmp_path, capsys, case_id):
    case = next(c for c in BAD_INPUTS if c.id == case_id)
    data = make_bad(tmp_path, case)
    code, out, err = run_cli(capsys, ["data", "validate", str(data)])
    assert code == 2
    assert out == ""
    assert_one_line_error(err, case.name, *case.fragments)


def test_data_validate_prints_a_summary_of_good_data(capsys, good_data):
    code, out, err = run_cli(capsys, ["data", "validate", str(good_data)])
    assert code == 0
    assert err == ""
    first = out.splitlines()[0]
    assert str(good_data) in first
    assert "3 rows" in first and "2 users" in first
    assert "pairs/user" in out


def test_eval_with_a_missing_run_dir_is_one_line(tmp_path, capsys, good_data):
    missing = tmp_path / "missing_dir"
    code, out, err = run_cli(capsys, ["eval", "--run", str(missing), "--data", str(good_data)])
    assert code == 2
    assert_one_line_error(err, "missing_dir", "run directory not found")
    assert not missing.exists()


def test_eval_with_an_unfinished_run_dir_is_one_line(tmp_path, capsys, good_data):
    run_dir = tmp_path / "half"
    (run_dir / "checkpoints").mkdir(parents=True)
    code, _, err = run_cli(capsys, ["eval", "--run", str(run_dir), "--data", str(good_data)])
    assert code == 2
    assert_one_line_error(err, "half", "run.json")


def test_eval_with_bad_data_is_one_line(tmp_path, capsys):
    case = next(c for c in BAD_INPUTS if c.id == "null_prompt")
    data = make_bad(tmp_path, case)
    out_json = tmp_path / "m.json"
    code, _, err = run_cli(capsys, ["eval", "--run", str(tmp_path / "missing_dir"), "--data", str(data),
                                    "--out", str(out_json)])
    assert code == 2
    assert_one_line_error(err, case.name, *case.fragments)
    assert not out_json.exists()
