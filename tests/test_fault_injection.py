"""A kill (or a full disk) at every write, rename and removal of every multi-file command leaves the run at its old
version or at its new one, and both load as `prlhf eval` loads them: train's final save, continuing a finished
run, adapt, users delete and users import.

Each command runs in a forked child with PRLHF_FAULT_AT=N (prlhf.safe_io.fault_point: the N-th write/rename/
removal of the process ends it with os._exit(137), as SIGKILL would; with PRLHF_FAULT_KIND=enospc it raises
OSError(ENOSPC) instead), for N = 1, 2, ... until the command finishes without reaching point N. Every point is
tried, not a sample.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transaction_helpers import TINY, committed_entries, fresh_copy, run_forked, train_argv, version_state

from prlhf.config import TrainConfig
from prlhf.runs.directory import RunError, load_run, version_names
from prlhf.runs.users import delete_user, export_users
from prlhf.safe_io import TMP_PREFIX, remove_stale_temp_dirs
from prlhf.train.loop import train

pytestmark = pytest.mark.slow  # about 2-4 minutes in all on 2 busy cores: five commands, ~90 kills
# Files that name the run's own path (config.yaml's `out`, the adapter's base_model_name_or_path): they differ
# between a run trained in one folder and the same run trained in another
PATH_FILES = ("config.yaml", "adapter/adapter_config.json", "adapter/README.md")


@pytest.fixture(scope="module")
def runs(task_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    data = task_dir / "train.jsonl"
    finished = root / "finished"  # v1, 2 steps
    train(TrainConfig(data=str(data), out=str(finished), **TINY), show_progress=False)
    unsaved = root / "unsaved"  # trained to its last checkpoint, killed at the first point of its final save
    assert run_forked(train_argv(data, unsaved), root / "unsaved.log", PRLHF_FAULT_AT="1",
                      PRLHF_FAULT_SCOPE="version") == 137
    without_02 = fresh_copy(finished, root / "without_02")
    delete_user(without_02, "user_02")
    export_users(finished, ["user_02"], root / "export" / "u2")
    return {"root": root, "data": data, "test": task_dir / "test.jsonl", "finished": finished, "unsaved": unsaved,
            "without_02": without_02, "export": root / "export" / "u2"}


def expected_state(runs, pristine: Path, argv_for, name: str, ignore: tuple[str, ...] = ()) -> dict:
    """The state the command leaves when nothing goes wrong (run once, on a copy)."""
    done = fresh_copy(pristine, runs["root"] / f"{name}-reference")
    log = runs["root"] / f"{name}-reference.log"
    assert run_forked(argv_for(done), log) == 0, log.read_text()[-3000:]
    return state_without(target_of(done, argv_for), ignore)


def target_of(run_dir: Path, argv_for) -> Path:
    argv = argv_for(run_dir)
    return Path(argv[argv.index("--out") + 1]) if argv[0] == "adapt" else run_dir


def state_without(run_dir: Path, ignore: tuple[str, ...]) -> dict:
    state = version_state(run_dir)
    state["files"] = {k: v for k, v in state["files"].items() if k not in ignore}
    return state


def kill_at_every_point(runs, name: str, pristine: Path, argv_for, check, **env) -> int:
    """Run the command on a fresh copy of `pristine` with a fault at point N = 1, 2, ... and `check(copy, code)`
    after each, until it finishes without reaching N; returns how many points it has."""
    n = 0
    while True:
        n += 1
        assert n < 200, f"{name}: no end to the fault points"
        run_dir = fresh_copy(pristine, runs["root"] / f"{name}-{n}")
        log = runs["root"] / f"{name}-{n}.log"
        code = run_forked(argv_for(run_dir), log, PRLHF_FAULT_AT=str(n), **env)
        check(run_dir, code, log)
        shutil.rmtree(run_dir)
        out = target_of(run_dir, argv_for)
        if out != run_dir and out.exists():
            shutil.rmtree(out)
        if code == 0:
            print(f"{name}: {n - 1} fault points, each one tried")  # shown with pytest -s
            return n - 1


def same_content(state: dict, expected: dict) -> bool:
    """The same files and summary, whatever the version's number."""
    return {**state, "version": None} == {**expected, "version": None}


def old_or_new(old: dict, new: dict, ignore: tuple[str, ...] = ()):
    def check(run_dir: Path, code: int, log: Path) -> None:
        assert code in (0, 137), log.read_text()[-3000:]
        state = state_without(run_dir, ignore)
        assert state in (old, new), f"after a kill at {log.name}: {state['version']}, {state['steps']} steps"
        if code == 0:
            assert state == new
    return check


def test_users_delete_killed_at_every_point(runs):
    argv_for = lambda run: ["users", "delete", "--run", str(run), "--user", "user_02"]  # noqa: E731
    old, new = version_state(runs["finished"]), expected_state(runs, runs["finished"], argv_for, "delete")
    assert new["version"] == "v2" and new["n_users"] == 2
    points = kill_at_every_point(runs, "delete", runs["finished"], argv_for, old_or_new(old, new))
    assert points >= 10  # copies of adapter/ and tokenizer/, the user files, manifest, rename, run.json


def test_users_import_killed_at_every_point(runs):
    argv_for = lambda run: ["users", "import", "--run", str(run), "--from", str(runs["export"])]  # noqa: E731
    old = version_state(runs["without_02"])
    new = expected_state(runs, runs["without_02"], argv_for, "import")
    assert new["version"] == "v3" and new["n_users"] == 3
    points = kill_at_every_point(runs, "import", runs["without_02"], argv_for, old_or_new(old, new))
    assert points >= 10  # ... and the removal of v1, older than the previous version


def test_adapt_killed_at_every_point(runs):
    def argv_for(run: Path) -> list[str]:
        return ["adapt", "--run", str(run), "--data", str(runs["test"]), "--out", str(run.parent / f"{run.name}-out"),
                "--steps", "2", "--quiet", "--threads", "1"]

    ignore = ("adapt.json",)  # holds the fitting time
    source = version_state(runs["finished"])
    new = expected_state(runs, runs["finished"], argv_for, "adapt", ignore)
    assert new["version"] == "v1" and new["n_users"] == 4  # the unseen user was added

    def check(run_dir: Path, code: int, log: Path) -> None:
        assert code in (0, 137), log.read_text()[-3000:]
        assert version_state(run_dir) == source  # the source run is never touched
        out = target_of(run_dir, argv_for)
        if code == 137 and not out.exists():  # killed before the one rename that makes --out appear
            remove_stale_temp_dirs(out.parent, out.name)  # what the next adapt to this --out does first
            assert not [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX + out.name + "-")]
            return
        assert state_without(out, ignore) == new

    assert kill_at_every_point(runs, "adapt", runs["finished"], argv_for, check) >= 20


def test_train_final_save_killed_at_every_point(runs):
    """The run is unfinished (refused, resumable) or finished; a --resume after any kill finishes it."""
    argv_for = lambda run: train_argv(runs["data"], run, resume=True)  # noqa: E731
    new = expected_state(runs, runs["unsaved"], argv_for, "final", PATH_FILES)
    assert new["version"] == "v1" and new["steps"] == 2

    def check(run_dir: Path, code: int, log: Path) -> None:
        assert code in (0, 137), log.read_text()[-3000:]
        if not (run_dir / "run.json").exists():
            with pytest.raises(RunError, match="no run.json"):
                load_run(run_dir)
            assert run_forked(argv_for(run_dir), log.with_suffix(".resume.log")) == 0
        assert same_content(state_without(run_dir, PATH_FILES), new)

    points = kill_at_every_point(runs, "final", runs["unsaved"], argv_for, check, PRLHF_FAULT_SCOPE="version")
    assert points >= 9


def test_continuing_a_finished_run_killed_at_every_point(runs):
    """--resume --max-steps 3 on a finished 2-step run: checkpoint step-3, then version v2; any kill leaves v1
    (2 steps) or v2 (3 steps), and a --resume after it reaches v2."""
    argv_for = lambda run: train_argv(runs["data"], run, resume=True, max_steps=3)  # noqa: E731
    old = state_without(runs["finished"], PATH_FILES)
    new = expected_state(runs, runs["finished"], argv_for, "continue", PATH_FILES)
    assert (old["version"], old["steps"], new["version"], new["steps"]) == ("v1", 2, "v2", 3)

    def check(run_dir: Path, code: int, log: Path) -> None:
        old_or_new(old, new, PATH_FILES)(run_dir, code, log)
        if code == 137:
            assert run_forked(argv_for(run_dir), log.with_suffix(".resume.log")) == 0
            assert same_content(state_without(run_dir, PATH_FILES), new)

    assert kill_at_every_point(runs, "continue", runs["finished"], argv_for, check) >= 15


def test_base_save_killed_at_every_point(runs):
    """A kill while the warmed-up base is written leaves no base/ (only a temporary folder); `--resume` then builds
    it again and finishes with the uninterrupted run's weights. (A partial base/ with only config.json made every
    --resume crash, and a rerun was refused.)"""
    empty = runs["root"] / "empty"
    empty.mkdir(exist_ok=True)
    argv_for = lambda run: train_argv(runs["data"], run, resume=True)  # noqa: E731  (into an empty folder: a start)
    new = expected_state(runs, empty, argv_for, "base", PATH_FILES)

    def check(run_dir: Path, code: int, log: Path) -> None:
        assert code in (0, 137), log.read_text()[-3000:]
        if code == 137:
            assert not (run_dir / "base").exists() or (run_dir / "base" / "manifest.json").is_file()
            assert run_forked(argv_for(run_dir), log.with_suffix(".resume.log")) == 0
        assert same_content(state_without(run_dir, PATH_FILES), new)

    assert kill_at_every_point(runs, "base", empty, argv_for, check, PRLHF_FAULT_SCOPE="base") >= 4


@pytest.mark.parametrize("command", ["delete", "import", "final", "base"])
def test_a_full_disk_at_every_write_leaves_the_old_version_and_one_line(runs, command):
    """OSError(ENOSPC) at each write or rename of a version: exit 2 with one line, the run as it was, nothing
    half-written left in versions/."""
    pristine, argv_for = {
        "delete": (runs["finished"], lambda run: ["users", "delete", "--run", str(run), "--user", "user_02"]),
        "import": (runs["without_02"], lambda run: ["users", "import", "--run", str(run), "--from",
                                                   str(runs["export"])]),
        "final": (runs["unsaved"], lambda run: train_argv(runs["data"], run, resume=True)),
        "base": (runs["root"] / "empty", lambda run: train_argv(runs["data"], run)),
    }[command]
    pristine.mkdir(exist_ok=True)
    scope = "base" if command == "base" else "version"
    old_entries = version_names(pristine)  # committed versions only: what a killed writer left is cleaned up
    old = version_state(pristine) if (pristine / "run.json").exists() else None

    def check(run_dir: Path, code: int, log: Path) -> None:
        if code == 0:
            return
        lines = [line for line in log.read_text().splitlines() if line.startswith("prlhf: error:")]
        assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], log.read_text()[-3000:]
        assert "Traceback" not in log.read_text()
        assert committed_entries(run_dir) == old_entries
        if command == "base":  # nothing but the config: a rerun starts again
            assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
        elif old is None:
            assert not (run_dir / "run.json").exists()
        else:
            assert version_state(run_dir) == old

    points = kill_at_every_point(runs, f"enospc-{command}", pristine, argv_for, check, PRLHF_FAULT_KIND="enospc",
                                 PRLHF_FAULT_SCOPE=scope)
    assert points >= (4 if command == "base" else 9)
