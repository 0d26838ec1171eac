"""The reproduced failures of "nothing a user does loses a run": a run directory is a transaction, no command
writes into what it does not own, --resume continues only the run it was trained as, and a run whose files or
tensors are damaged is refused on load with a one-line way back."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import assert_same_weights, interrupt_after_step_2
from transaction_helpers import TINY, fresh_copy, run_forked, start_forked, train_argv, version_state, wait_forked

from prlhf.cli.main import main
from prlhf.config import TrainConfig
from prlhf.runs.directory import RunError, current_version, load_run
from prlhf.runs.users import delete_user, read_user_table, write_user_table
from prlhf.safe_io import TMP_PREFIX
from prlhf.train.loop import train


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prlhf: error:")]
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tiny_config(task_dir: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(data=str(task_dir / "train.jsonl"), out=str(out), **(TINY | overrides))


@pytest.fixture(scope="module")
def finished(task_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("transactions") / "run"
    train(tiny_config(task_dir, run_dir), show_progress=False)
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return fresh_copy(finished, tmp_path / "run")


# ------------------------------------------------------------------------------------ writing into a run


def test_users_export_into_the_runs_own_users_json_is_refused(run_copy, capsys):
    before = version_state(run_copy)
    code = main(["users", "export", "--run", str(run_copy), "--users", "user_01,user_02", "--out",
                 str(run_copy / "users")])
    one_line_error(capsys, code, "users.json")
    code = main(["users", "export", "--run", str(run_copy), "--users", "user_01", "--out", str(run_copy / "users"),
                 "--overwrite"])  # a run's own file is never an export target
    one_line_error(capsys, code, "own users.json")
    assert not (run_copy / "users.json").exists() and not (run_copy / "users.safetensors").exists()
    assert version_state(run_copy) == before


def test_data_build_into_a_run_is_refused(run_copy, capsys):
    before = version_state(run_copy)
    for extra in ([], ["--overwrite"]):
        code = main(["data", "build", "style", "--out", str(run_copy), "--users", "3", "--unseen", "1", *extra])
        one_line_error(capsys, code, str(run_copy), "run directory")
    assert not (run_copy / "train.jsonl").exists()
    assert version_state(run_copy) == before


def test_data_build_refuses_a_foreign_folder_and_a_file_but_rewrites_its_own(tmp_path, capsys):
    args = ["data", "build", "length", "--users", "3", "--unseen", "1", "--train-pairs-per-user", "4",
            "--test-pairs-per-user", "2"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine\n")
    one_line_error(capsys, main([*args, "--out", str(foreign)]), "--overwrite")
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]
    assert main([*args, "--out", str(foreign), "--overwrite"]) == 0
    assert (foreign / "todo.txt").read_text() == "mine\n" and (foreign / "train.jsonl").is_file()
    own = tmp_path / "data"
    assert main([*args, "--out", str(own)]) == 0
    assert main([*args, "--out", str(own), "--seed", "1"]) == 0  # its own folder: rebuilt without --overwrite
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, main([*args, "--out", str(tmp_path / "file")]), "is a file")
    capsys.readouterr()


def test_train_resume_into_a_data_folder_is_refused(task_dir, tmp_path, capsys):
    data = fresh_copy(task_dir, tmp_path / "data")
    users_before = (data / "users.json").read_text()
    code = main(train_argv(data / "train.jsonl", data, resume=True))
    one_line_error(capsys, code, "not a run directory")
    assert (data / "users.json").read_text() == users_before
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in task_dir.iterdir())


def test_train_out_that_is_a_file_is_one_line(task_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    one_line_error(capsys, main(train_argv(task_dir / "train.jsonl", tmp_path / "out")), "is a file")


def test_eval_out_refuses_a_runs_own_file_and_foreign_files(run_copy, task_dir, tmp_path, capsys):
    before = version_state(run_copy)
    base = ["eval", "--run", str(run_copy), "--data", str(task_dir / "test.jsonl"), "--threads", "1"]
    for name in ("run.json", "config.yaml", "metrics.jsonl"):
        saved = (run_copy / name).read_bytes()
        one_line_error(capsys, main([*base, "--out", str(run_copy / name), "--overwrite"]), name)
        assert (run_copy / name).read_bytes() == saved
    one_line_error(capsys, main([*base, "--out", str(run_copy / "versions")]), "folder")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    one_line_error(capsys, main([*base, "--out", str(notes)]), "--overwrite")
    assert notes.read_text() == '{"mine": 1}\n'
    assert main([*base, "--out", str(run_copy / "eval.json")]) == 0  # the README's place for it
    assert main([*base, "--out", str(run_copy / "eval.json")]) == 0  # its own output: replaced
    assert main([*base, "--out", str(notes), "--overwrite"]) == 0 and "per_user" in json.loads(notes.read_text())
    assert version_state(run_copy) == before


def test_eval_plot_is_checked_like_out(run_copy, task_dir, tmp_path, capsys):
    before = version_state(run_copy)
    base = ["eval", "--run", str(run_copy), "--data", str(task_dir / "test.jsonl"), "--threads", "1"]
    saved = (run_copy / "config.yaml").read_bytes()
    one_line_error(capsys, main([*base, "--plot", str(run_copy / "config.yaml"), "--overwrite"]), "config.yaml")
    assert (run_copy / "config.yaml").read_bytes() == saved
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    one_line_error(capsys, main([*base, "--plot", str(notes)]), "--overwrite")
    assert notes.read_text() == "mine\n"
    one_line_error(capsys, main([*base, "--out", str(notes), "--plot", str(notes), "--overwrite"]), "same file")
    plot = tmp_path / "acc.png"
    assert main([*base, "--plot", str(plot)]) == 0 and plot.read_bytes().startswith(b"\x89PNG")
    assert main([*base, "--plot", str(plot)]) == 0  # its own output: replaced without --overwrite
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert version_state(run_copy) == before


def test_users_export_never_writes_through_a_planted_symlink(finished, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    prefix = tmp_path / "exp" / "two"
    prefix.parent.mkdir()
    for name in ("two.json.tmp", "two.safetensors.tmp"):  # the names the export used to write first
        os.symlink(victim, prefix.parent / name)
    assert main(["users", "export", "--run", str(finished), "--users", "user_01,user_02", "--out", str(prefix)]) == 0
    assert victim.read_text() == "precious\n"
    assert json.loads(prefix.with_name("two.json").read_text())["users"] == ["user_01", "user_02"]
    os.symlink(victim, tmp_path / "exp" / "link.json")  # a symlink at the target itself is refused
    code = main(["users", "export", "--run", str(finished), "--users", "user_01", "--out",
                 str(tmp_path / "exp" / "link"), "--overwrite"])
    one_line_error(capsys, code, "symlink")
    assert victim.read_text() == "precious\n"


# ------------------------------------------------------------------------------------------------ resume


def test_resume_with_other_user_ids_is_refused_naming_them(task_dir, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(task_dir, tmp_path / "run", max_steps=4, save_steps=2)
    interrupt_after_step_2(cfg, monkeypatch)
    renamed = tmp_path / "renamed.jsonl"  # the same pairs; user_01 is now user_99 (sorted last, not first)
    renamed.write_text((task_dir / "train.jsonl").read_text().replace('"user_01"', '"user_99"'))
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    code = main(train_argv(renamed, tmp_path / "run", resume=True, max_steps=4, save_steps=2))
    one_line_error(capsys, code, "the user ids", "step-2")
    assert not (tmp_path / "run" / "run.json").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before
    code = main(train_argv(task_dir / "train.jsonl", tmp_path / "run", resume=True, max_steps=4, save_steps=2,
                           lora_r=4))
    one_line_error(capsys, code, "lora_r (8 then, 4 now)")
    assert main(train_argv(task_dir / "train.jsonl", tmp_path / "run", resume=True, max_steps=4, save_steps=2)) == 0


def test_continuing_after_users_delete_is_refused(run_copy, task_dir, capsys):
    delete_user(run_copy, "user_02")
    before = version_state(run_copy)
    code = main(train_argv(task_dir / "train.jsonl", run_copy, resume=True, max_steps=3))
    one_line_error(capsys, code, "users delete", "undo")
    assert version_state(run_copy) == before


def test_resume_of_an_adapted_run_is_refused(finished, task_dir, tmp_path, capsys):
    out = tmp_path / "adapted"
    assert main(["adapt", "--run", str(finished), "--data", str(task_dir / "test.jsonl"), "--out", str(out),
                 "--steps", "1", "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    before = version_state(out)
    one_line_error(capsys, main(train_argv(task_dir / "train.jsonl", out, resume=True)), "without checkpoints")
    assert version_state(out) == before


@pytest.mark.slow
def test_restart_before_the_first_checkpoint_gives_the_uninterrupted_weights(task_dir, tmp_path, monkeypatch):
    """A base with dropout (GPT-2's 0.1 during the warm-up) consumes the global RNG in the warm-up; a --resume that
    reuses the saved base without that RNG state started LoRA from other random numbers (max difference 0.34
    here). It must give the uninterrupted run's weights, bitwise."""
    from conftest import TEXTS, save_tiny_architecture

    import prlhf.train.loop as loop
    import prlhf.train.setup as setup
    from prlhf.model.tiny import build_tiny_tokenizer

    model = save_tiny_architecture("gpt2", build_tiny_tokenizer(TEXTS, vocab_size=300), tmp_path / "gpt2")
    a_cfg = tiny_config(task_dir, tmp_path / "A", model=str(model), sft_steps=3, max_steps=3, save_steps=2,
                        lora_dropout=0.05)
    train(a_cfg, show_progress=False)
    b_cfg = dataclasses.replace(a_cfg, out=str(tmp_path / "B"))

    class Killed(Exception):
        pass

    def die(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:  # killed before checkpoint step-2: only base/ and config.yaml are there
        m.setattr(loop, "save_checkpoint", die)
        with pytest.raises(Killed):
            train(b_cfg, show_progress=False)
    assert (tmp_path / "B" / "base").is_dir() and not (tmp_path / "B" / "checkpoints").exists()
    with monkeypatch.context() as m:  # the saved base is reused, not warmed up again
        m.setattr(setup, "supervised_warmup", die)
        train(dataclasses.replace(b_cfg, resume=True), show_progress=False)
    a, b = (load_file(current_version(tmp_path / n) / "adapter" / "adapter_model.safetensors") for n in "AB")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_same_weights(tmp_path / "A", tmp_path / "B")
    assert (tmp_path / "B" / "base" / "manifest.json").is_file()  # reused: complete, and built from the same data


def test_a_half_written_base_is_never_reused(task_dir, tmp_path):
    """A kill while base/ is written leaves no base/ (only a temporary folder), so --resume builds it again."""
    cfg = tiny_config(task_dir, tmp_path / "run")
    argv = train_argv(task_dir / "train.jsonl", tmp_path / "run")
    assert run_forked(argv, tmp_path / "kill.log", PRLHF_FAULT_AT="2", PRLHF_FAULT_SCOPE="base") == 137
    assert not (tmp_path / "run" / "base").exists()
    assert any(p.name.startswith(TMP_PREFIX) for p in (tmp_path / "run").iterdir())
    summary = train(dataclasses.replace(cfg, resume=True), show_progress=False)
    assert summary["steps"] == 2 and not any(p.name.startswith(TMP_PREFIX) for p in (tmp_path / "run").iterdir())
    load_run(tmp_path / "run")


def test_an_unfinished_run_without_checkpoints_asks_for_resume(task_dir, tmp_path, capsys):
    argv = train_argv(task_dir / "train.jsonl", tmp_path / "run")
    assert run_forked(argv, tmp_path / "kill.log", PRLHF_FAULT_AT="1", PRLHF_FAULT_SCOPE="checkpoint") == 137
    one_line_error(capsys, main(argv), "unfinished run", "--resume")


# ------------------------------------------------------------------------------------------- two writers


def test_a_second_writer_is_refused_while_one_holds_the_run(run_copy, task_dir, capsys):
    before = version_state(run_copy)
    fd = os.open(run_copy, os.O_RDONLY | os.O_DIRECTORY)  # what a running `prlhf train --out run` holds
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        metrics = (run_copy / "metrics.jsonl").read_text()
        code = main(train_argv(task_dir / "train.jsonl", run_copy, resume=True, max_steps=3))
        one_line_error(capsys, code, "another prlhf process is writing it")
        assert (run_copy / "metrics.jsonl").read_text() == metrics
        one_line_error(capsys, main(["users", "delete", "--run", str(run_copy), "--user", "user_02"]),
                       "another prlhf process")
    finally:
        os.close(fd)
    assert version_state(run_copy) == before
    assert main(["users", "delete", "--run", str(run_copy), "--user", "user_02"]) == 0


def test_two_trains_on_the_same_out(task_dir, tmp_path):
    """The second start, while the first trains, is refused and writes nothing; the first finishes alone. (Both
    used to succeed and interleave their metrics.jsonl.)"""
    import time

    out, marker = tmp_path / "run", tmp_path / "step-1-saved"

    def pause_after_each_checkpoint() -> None:  # in the first child only
        import prlhf.train.loop as loop

        save = loop.save_checkpoint

        def save_then_wait(*args, **kwargs):
            save(*args, **kwargs)
            marker.touch()
            time.sleep(3)

        loop.save_checkpoint = save_then_wait

    first = start_forked(train_argv(task_dir / "train.jsonl", out), tmp_path / "first.log",
                         setup=pause_after_each_checkpoint)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert os.waitpid(first, os.WNOHANG) == (0, 0), (tmp_path / "first.log").read_text()[-2000:]
            assert time.time() < deadline, "the first training never reached its first checkpoint"
            time.sleep(0.05)
        for second in (train_argv(task_dir / "train.jsonl", out), train_argv(task_dir / "train.jsonl", out,
                                                                               resume=True)):
            assert run_forked(second, tmp_path / "second.log") == 2
            assert "another prlhf process is writing it" in (tmp_path / "second.log").read_text()
    finally:
        code = wait_forked(first)
    assert code == 0, (tmp_path / "first.log").read_text()[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert version_state(out)["steps"] == 2


# ------------------------------------------------------------------------------------- damaged on disk


def test_a_damaged_version_is_refused_with_the_previous_one_as_the_way_back(run_copy, capsys, task_dir):
    delete_user(run_copy, "user_02")  # v2; v1 is the previous version
    damaged = current_version(run_copy) / "user_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with pytest.raises(RunError, match="version v2 is damaged .*user_model.safetensors") as info:
        load_run(run_copy)
    assert str(run_copy / "versions" / "v1") in str(info.value) and "\n" not in str(info.value)
    code = main(["eval", "--run", str(run_copy), "--data", str(task_dir / "test.jsonl"), "--threads", "1"])
    one_line_error(capsys, code, "damaged", "versions/v1")
    assert load_run(run_copy / "versions" / "v1").registry.user_ids == ["user_01", "user_02", "user_03"]
    one_line_error(capsys, main(["users", "delete", "--run", str(run_copy), "--user", "user_01"]), "damaged")


def test_a_missing_file_or_a_changed_base_is_refused(run_copy, tmp_path):
    other = fresh_copy(run_copy, tmp_path / "other")
    (current_version(run_copy) / "users.json").unlink()
    with pytest.raises(RunError, match="users.json is missing"):
        load_run(run_copy)
    weights = other / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RunError, match="base/model.safetensors does not match"):
        load_run(other)


def test_a_run_with_nan_weights_is_refused_on_load(run_copy):
    table = read_user_table(run_copy)
    table.state["offsets.weight"][2, 0] = float("nan")  # user_02's row, written as a whole, valid version
    write_user_table(run_copy, table)
    with pytest.raises(RunError, match="NaN or infinite") as info:
        load_run(run_copy)
    assert "versions/v1" in str(info.value)  # the previous, finite version


def test_a_run_written_before_versions_still_loads_and_is_upgraded_by_a_change(run_copy):
    """The flat layout of earlier prlhf (artifacts in RUN_DIR, run.json without a version) loads; its first change
    writes versions/v1 and removes the flat files."""
    version = current_version(run_copy)
    for entry in version.iterdir():
        if entry.name not in ("manifest.json", "config.yaml"):
            shutil.move(str(entry), run_copy / entry.name)
    shutil.rmtree(run_copy / "versions")
    pointer = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({k: v for k, v in pointer.items()
                                                   if k not in ("format", "version", "previous", "written_by")}))
    assert load_run(run_copy).registry.user_ids == ["user_01", "user_02", "user_03"]
    delete_user(run_copy, "user_02")
    assert current_version(run_copy) == run_copy / "versions" / "v1"
    assert not (run_copy / "users.json").exists() and not (run_copy / "adapter").exists()
    assert load_run(run_copy).registry.user_ids == ["user_01", "user_03"]


def test_a_temp_folder_left_by_a_kill_is_removed_and_a_live_one_kept(tmp_path):
    from prlhf.safe_io import held_temp_dir, remove_stale_temp_dirs

    pid = os.fork()
    if pid == 0:  # the child dies holding its temp folder, as a killed `adapt` does
        with held_temp_dir(tmp_path, "out") as tmp:
            (tmp / "part").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    with held_temp_dir(tmp_path, "out") as live:
        assert remove_stale_temp_dirs(tmp_path, "out") == [left]
        assert not left.exists() and live.is_dir()  # the folder a live process holds stays
        assert remove_stale_temp_dirs(tmp_path, "out") == []


def test_bench_out_refuses_what_a_benchmark_did_not_write(tmp_path):
    from prlhf.bench.tldr import OUTPUTS
    from prlhf.safe_io import results_folder_problem

    def problem(folder, bench="tldr"):
        return results_folder_problem(folder, bench, OUTPUTS)

    assert problem(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert problem(tmp_path / "empty") is None
    (tmp_path / "file").write_text("x")
    assert "is a file" in problem(tmp_path / "file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert "run directory" in problem(run)
    assert "run directory" in problem(run / "versions" / "x")
    for name, files in {"notes": ["notes.txt"], "lone_work": ["work/"],
                        "legacy": ["results.json", "report.md", "COMMAND.md", "work/"]}.items():
        for f in files:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).mkdir() if f.endswith("/") else (tmp_path / name / f).write_text("x")
    assert "'notes.txt', which bench tldr does not write" in problem(tmp_path / "notes")
    assert "holds no results.json" in problem(tmp_path / "lone_work")  # a `work` nobody says a bench made
    assert problem(tmp_path / "legacy") is None  # results committed before the marker existed
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert "symlink" in problem(tmp_path / "link")


def test_bench_out_is_marked_and_held_while_a_benchmark_runs(tmp_path):
    from prlhf.safe_io import results_folder, results_folder_problem

    out = tmp_path / "out"
    with results_folder(out, "polis", ("results.json", "work")):
        (out / "work").mkdir()  # a killed run leaves only this behind; its marker still says whose it is
        with pytest.raises(ValueError, match="another prlhf process is writing it"):
            with results_folder(out, "polis", ("results.json", "work")):
                pass
    assert results_folder_problem(out, "polis", ("results.json", "work")) is None  # --reuse-runs goes on
    assert "another benchmark (polis)" in results_folder_problem(out, "tldr", ("results.json", "work"))


def test_bench_into_a_foreign_folder_or_a_run_is_one_line_and_touches_nothing(run_copy, tmp_path, capsys):
    foreign = tmp_path / "mine"
    (foreign / "work").mkdir(parents=True)
    (foreign / "work" / "thesis.tex").write_text("months of work")
    (foreign / "results.json").write_text("{}")
    (foreign / "notes.txt").write_text("x")
    before = version_state(run_copy)
    for out, needle in ((foreign, "notes.txt"), (run_copy, "run directory")):
        code = main(["bench", "length", "--quick", "--shares", "0.7", "--threads", "1", "--out", str(out)])
        one_line_error(capsys, code, "bench length", str(out), needle)
    assert (foreign / "work" / "thesis.tex").read_text() == "months of work"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "results.json", "work"]
    assert version_state(run_copy) == before
