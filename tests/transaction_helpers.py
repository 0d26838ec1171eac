"""Shared by test_run_transactions.py and test_fault_injection.py: tiny runs, a command run in a forked child with
a fault injected (prlhf.safe_io.fault_point), and what a run's current version holds."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from prlhf.cli.main import main
from prlhf.runs.directory import load_run, resolve_run
from prlhf.safe_io import MANIFEST

# 2 optimizer steps of 4 pairs, no warm-up, one checkpoint per step: a whole run in about a second
TINY = dict(sft_steps=0, epochs=1, max_steps=2, batch_size=4, save_steps=1, keep_checkpoints=2, log_steps=1,
            user_tokens=2, threads=1, seed=0, lora_dropout=0.0, report_to="none")


def train_argv(data: Path, out: Path, **overrides) -> list[str]:
    """`prlhf train` flags for a TINY run (overrides as keyword=value; True/False become --flag/--no-flag)."""
    argv = ["train", "--data", str(data), "--out", str(out), "--quiet"]
    for key, value in (TINY | overrides).items():
        flag = "--" + key.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv


def run_forked(argv: list[str], log: Path, **env: str) -> int:
    """`prlhf ARGV` in a forked child (the parent's imports are reused: a fresh interpreter costs seconds) with
    `env` set; returns its exit code (137: it was killed by the fault hook, as by SIGKILL)."""
    return wait_forked(start_forked(argv, log, **env))


def start_forked(argv: list[str], log: Path, setup: Callable[[], None] | None = None, **env: str) -> int:
    """Start `prlhf ARGV` in a forked child (after `setup()`, in the child only); returns its pid."""
    import prlhf.safe_io as safe_io

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # pytest's capture objects stay the parent's
            os.environ.update(env)
            safe_io._fault_calls = 0  # counted per process
            if setup is not None:
                setup()
            code = main(argv)
        except BaseException:  # noqa: BLE001 - whatever it is, the child must end here
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            os._exit(code)
    return pid


def wait_forked(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def version_state(run_dir: Path) -> dict:
    """The current version's name and {file: sha256} (from its manifest, which loading has just checked) and the
    run's summary; the run must load as `prlhf eval` loads it."""
    load_run(run_dir)
    run = resolve_run(run_dir)
    files = {rel: entry["sha256"] for rel, entry in json.loads((run.files / MANIFEST).read_text())["files"].items()}
    return {"version": run.version, "files": files, "steps": run.summary.get("steps"),
            "n_users": run.summary.get("n_users")}


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def committed_entries(run_dir: Path) -> list[str]:
    """What versions/ holds: committed versions only once a writer has finished or been cleaned up after."""
    folder = run_dir / "versions"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
