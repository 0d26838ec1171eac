"""One error boundary: whatever library fails (OSError, JSON, safetensors, Arrow, YAML, torch), a command ends
with ONE stderr line `prlhf: error: ...` of bounded size and exit code 2; `prlhf -v` adds the traceback. Every
flag is range-checked before any work, so a mistake never costs the warm-up nor leaves a run folder behind.

The CLI runs in-process (`prlhf.cli.main.main`); only the flag that used to segfault runs in a real process.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from test_cli_errors import GOOD, PREFIX, assert_one_line_error, good_data, run_cli  # noqa: F401 (a fixture)
from test_train_resume import finished_run  # noqa: F401 (a fixture: a tiny trained run, shared, never modified)

import prlhf.train.setup
from prlhf.data.loading import load_records
from prlhf.runs.directory import load_run
from prlhf.train.adapt import adapt_users
from prlhf.train.loop import TrainingDiverged

# Longest line an error may print: the prefix, the bounded message and the `(in prlhf ...)` place and hint.
MAX_LINE = 1100
# Flags are checked before any work: in-process, an error takes milliseconds; the tiny model's warm-up, which
# these mistakes used to crash after, takes far longer (and the spy below proves it never started).
FAST_S = 10.0


class WarmupStarted(BaseException):
    """Raised by the spy on the warm-up: a BaseException, so no error boundary turns it into an exit code."""


@pytest.fixture
def no_warmup(monkeypatch):
    def spy(*args, **kwargs):
        raise WarmupStarted("the supervised warm-up started: the flag was not checked before the work")

    monkeypatch.setattr(prlhf.train.setup, "supervised_warmup", spy)


def damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def run_file(run: Path, name: str) -> Path:
    """A run's artifact wherever the run layout keeps it (the run's top level or its current version)."""
    found = [p for p in run.rglob(name) if "checkpoints" not in p.relative_to(run).parts]
    assert found, f"{name} not in {run}"
    return found[0]


def assert_nothing_trained(out: Path) -> None:
    """No warm-up and no training left anything in --out (a bare config.yaml or a lock is allowed)."""
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    assert not names & {"base", "checkpoints", "run.json", "adapter", "metrics.jsonl", "versions"}, names


# ------------------------------------------------------------------------------------------------------
# Damaged files: each library's own error becomes one line


def test_truncated_user_model_file_is_one_line(finished_run, tmp_path, capsys, task_dir):
    run = damaged_copy(finished_run, tmp_path)
    weights = run_file(run, "user_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:50])
    code, out, err = run_cli(capsys, ["eval", "--run", str(run), "--data", str(task_dir / "test.jsonl")])
    assert code == 2 and out == ""
    assert len(assert_one_line_error(err, str(run))) <= MAX_LINE


def test_deleted_user_model_file_is_one_line(finished_run, tmp_path, capsys, task_dir):
    run = damaged_copy(finished_run, tmp_path)
    run_file(run, "user_model.safetensors").unlink()
    code, out, err = run_cli(capsys, ["generate", "--run", str(run), "--user", "user_01", "--prompt", "Hi"])
    assert code == 2 and out == ""
    assert_one_line_error(err, str(run))


def test_corrupt_datasets_folder_is_one_line(tmp_path, capsys):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(folder))
    (folder / "state.json").write_text("{")  # truncated JSON
    code, out, err = run_cli(capsys, ["data", "validate", str(folder)])
    assert code == 2 and out == ""
    assert_one_line_error(err, str(folder))


def test_truncated_arrow_file_is_one_line(tmp_path, capsys):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD] * 20).save_to_disk(str(folder))
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    code, _, err = run_cli(capsys, ["train", "--data", str(folder), "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    assert_one_line_error(err, str(folder))
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_data_file_is_one_line(good_data, tmp_path, capsys):  # noqa: F811
    good_data.chmod(0)
    try:
        code, _, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(tmp_path / "r")])
    finally:
        good_data.chmod(0o644)
    assert code == 2
    assert_one_line_error(err, str(good_data))
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_is_one_line(good_data, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    code, _, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(target), "--quiet"])
    assert code == 2
    assert_one_line_error(err, str(target))
    assert target.read_text() == "keep me\n"


def test_missing_local_model_folder_is_one_line(good_data, tmp_path, capsys, no_warmup):  # noqa: F811
    missing = tmp_path / "models" / "no_such_model"
    out_dir = tmp_path / "r"
    code, _, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(out_dir), "--model",
                                    str(missing), "--quiet"])
    assert code == 2
    assert_one_line_error(err, str(missing), "not found")
    assert_nothing_trained(out_dir)


# ------------------------------------------------------------------------------------------------------
# YAML config files


def test_non_utf8_config_file_is_one_line(good_data, tmp_path, capsys):  # noqa: F811
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"alpha: 0.5\nbeta: \xff\n")
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg), "--data", str(good_data),
                                    "--out", str(tmp_path / "r")])
    assert code == 2
    assert_one_line_error(err, str(cfg), "line 2", "UTF-8")
    assert not (tmp_path / "r").exists()


def billion_laughs(levels: int) -> str:
    """A YAML list under a known key whose nested aliases stand for 9**levels strings."""
    rows = ["lora_targets:", "  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(rows) + "\n"


def test_billion_laughs_config_is_refused_at_once(good_data, tmp_path, capsys):  # noqa: F811
    # 6 levels (531,441 strings) keep the old behaviour (a multi-megabyte message) cheap to observe; the loader
    # refuses the first alias, so the 9-level original (387 million) is refused just as fast.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(billion_laughs(6))
    start = time.perf_counter()
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg), "--data", str(good_data),
                                    "--out", str(tmp_path / "r")])
    assert time.perf_counter() - start < 2.0
    assert code == 2
    line = assert_one_line_error(err, str(cfg), "alias")
    assert len(line) <= MAX_LINE
    assert not (tmp_path / "r").exists()


def test_a_huge_wrong_value_is_not_copied_into_the_message(good_data, tmp_path, capsys):  # noqa: F811
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("alpha: '" + "x" * 100_000 + "'\n")
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg), "--data", str(good_data),
                                    "--out", str(tmp_path / "r")])
    assert code == 2
    line = assert_one_line_error(err, "key 'alpha'", "expected float")
    assert len(line) <= 300


# ------------------------------------------------------------------------------------------------------
# `prlhf train` flags: checked before any work


BAD_TRAIN_FLAGS = [
    (["--lora-r", "0"], "lora_r"),
    (["--lora-alpha", "0"], "lora_alpha"),
    (["--lora-dropout", "2"], "lora_dropout"),
    (["--lora-dropout", "nan"], "lora_dropout"),
    (["--lora-targets", "nonexistent_mod"], "nonexistent_mod"),
    (["--lora-targets", "model"], "cannot wrap"),
    (["--log-steps", "0"], "log_steps"),
    (["--save-steps", "-1"], "save_steps"),
    (["--threads", "-1"], "threads"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**32)], "seed"),
    (["--lr", "inf"], "lr"),
    (["--user-lr", "inf"], "user_lr"),
    (["--max-grad-norm", "nan"], "max_grad_norm"),
    (["--epochs", "inf"], "epochs"),
    (["--cluster-logit-std", "inf"], "cluster_logit_std"),
    (["--lowrank-vector-std", "-1"], "lowrank_vector_std"),
    (["--user-start", "kmeans"], "user_start"),
    (["--covote-rank", "0"], "covote_rank"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--max-length", "100000000", "--max-prompt-length", "64"], "max_length"),
    (["--user-tokens", "1000000"], "user_tokens"),
    (["--user-model", "cluster", "--clusters", "1000000000"], "clusters"),
]


@pytest.mark.parametrize("flags,fragment", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flag_fails_before_any_work(good_data, tmp_path, capsys, no_warmup, flags, fragment):  # noqa: F811
    out_dir = tmp_path / "run"
    threads = [] if "--threads" in flags else ["--threads", "1"]
    start = time.perf_counter()
    code, out, err = run_cli(capsys, ["train", "--data", str(good_data), "--out", str(out_dir), "--quiet",
                                      *threads, *flags])
    assert time.perf_counter() - start < FAST_S
    assert code == 2 and out == ""
    assert_one_line_error(err, "train: ", fragment)
    assert_nothing_trained(out_dir)


def test_bad_value_in_a_config_file_fails_before_any_work(good_data, tmp_path, capsys, no_warmup):  # noqa: F811
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lora_r: 0\n")
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg), "--data", str(good_data),
                                    "--out", str(tmp_path / "r"), "--threads", "1"])
    assert code == 2
    assert_one_line_error(err, "lora_r")
    assert_nothing_trained(tmp_path / "r")


@pytest.mark.slow
def test_a_huge_thread_count_is_refused_not_a_segfault(good_data, tmp_path):  # noqa: F811
    """torch.set_num_threads(100000) killed the process with SIGSEGV; a real process shows the exit code."""
    out_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "prlhf", "train", "--data", str(good_data), "--out", str(out_dir),
                           "--quiet", "--threads", "100000"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert_one_line_error(proc.stderr, "threads", "100000")
    assert not out_dir.exists()


# ------------------------------------------------------------------------------------------------------
# Other commands' flags


def test_eval_threads_out_of_range_is_one_line(good_data, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(capsys, ["eval", "--run", str(tmp_path / "missing"), "--data", str(good_data),
                                    "--threads", "-1"])
    assert code == 2
    assert_one_line_error(err, "eval: ", "--threads")


@pytest.mark.parametrize("flags,fragment", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--n", "0"], "--n"),
    (["--seed", "-1"], "--seed"),
], ids=["max_new_tokens_0", "n_0", "seed_negative"])
def test_bad_generate_flag_is_one_line(finished_run, capsys, flags, fragment):
    code, out, err = run_cli(capsys, ["generate", "--run", str(finished_run), "--user", "user_01", "--prompt",
                                      "Say hi.", "--threads", "1", *flags])
    assert code == 2 and out == ""
    assert_one_line_error(err, "generate: ", fragment)


def test_data_build_without_training_pairs_is_refused(tmp_path, capsys):
    out_dir = tmp_path / "data"
    code, _, err = run_cli(capsys, ["data", "build", "length", "--out", str(out_dir), "--train-pairs-per-user", "0"])
    assert code == 2
    assert_one_line_error(err, "data build: ", "--train-pairs-per-user")
    assert not out_dir.exists()


# ------------------------------------------------------------------------------------------------------
# `prlhf adapt`: numbers stay finite


def unseen_records(task_dir: Path, run: Path):
    registry = load_run(run).registry
    return [r for r in load_records(task_dir / "test.jsonl") if r.user_id not in registry]


@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--seed", "-1"], "--seed"),
    (["--threads", "-1"], "--threads"),
], ids=["lr_inf", "lr_nan", "seed_negative", "threads_negative"])
def test_adapt_bad_flag_writes_nothing(finished_run, task_dir, tmp_path, capsys, flags, fragment):
    out_dir = tmp_path / "adapted"
    code, _, err = run_cli(capsys, ["adapt", "--run", str(finished_run), "--data", str(task_dir / "test.jsonl"),
                                    "--out", str(out_dir), "--steps", "2", "--quiet", *flags])
    assert code == 2
    assert_one_line_error(err, "adapt: ", fragment)
    assert not out_dir.exists()


def test_adapt_guard_names_the_step_and_the_user(finished_run, task_dir):
    """The library path has no flag check: the fitting loop's own guard stops a non-finite row (lr inf made
    every row NaN after one step, and `prlhf adapt` saved it with exit 0)."""
    run = load_run(finished_run)
    records = unseen_records(task_dir, finished_run)
    with pytest.raises(TrainingDiverged, match=r"'unseen_01'.*step 1 of 3"):
        adapt_users(run, records, steps=3, lr=math.inf, show_progress=False)


# ------------------------------------------------------------------------------------------------------
# The boundary itself


def test_verbose_flag_shows_the_traceback(finished_run, tmp_path, capsys, task_dir):
    run = damaged_copy(finished_run, tmp_path)
    weights = run_file(run, "user_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:50])
    code, _, err = run_cli(capsys, ["-v", "eval", "--run", str(run), "--data", str(task_dir / "test.jsonl")])
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(PREFIX)


def test_a_foreign_error_names_its_type_the_place_and_the_traceback_hint():
    from prlhf.cli.errors import FOREIGN_MESSAGE_LIMIT, describe, own_error_types

    args = Namespace(command="eval", run="runs/a", data="test.jsonl", out=None)
    line = describe(RuntimeError("boom\n" + "detail " * 10_000), args, own_error_types())
    assert "\n" not in line
    assert line.startswith("RuntimeError: boom detail")
    assert "prlhf eval --run runs/a --data test.jsonl" in line and "-v" in line
    assert len(line) <= FOREIGN_MESSAGE_LIMIT + 400


def test_an_os_error_names_its_file():
    from prlhf.cli.errors import describe, own_error_types

    args = Namespace(command="users", users_command="list", run="r")
    line = describe(PermissionError(13, "Permission denied", "r/users.json"), args, own_error_types())
    assert line.startswith("r/users.json: Permission denied (PermissionError)")
    assert "prlhf users list --run r" in line
