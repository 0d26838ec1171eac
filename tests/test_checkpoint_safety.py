"""Checkpoints survive a SIGKILL in the middle of being written, and loading one never unpickles code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prlhf.cli.main import main
from prlhf.train.checkpoint import list_checkpoints
from prlhf.train.loop import train
from test_invariants import metric_rows
from test_train_resume import (assert_same_weights, cli_flags, config, interrupt_after_step_2,
                               sigkill_train_when)

# The child runs `prlhf train` through the real CLI; writing checkpoint step-4 stops right after its weights file
# (the temporary folder then holds the RNG state and model.safetensors, no optimizer, no trainer_state.json) and
# waits there to be killed.
PAUSE_INSIDE_SAVE_OF_STEP_4 = """
import sys, time
import prlhf.train.checkpoint as checkpoint
from prlhf.cli.main import main
save_file = checkpoint.save_file
def save_then_wait(tensors, path, *args, **kwargs):
    save_file(tensors, path, *args, **kwargs)
    if ".tmp-step-4" in str(path):
        time.sleep(300)
checkpoint.save_file = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def kill_inside_save_of_step_4(cfg) -> None:
    partial = Path(cfg.out) / "checkpoints" / ".tmp-step-4" / "model.safetensors"
    # settle: let safetensors finish the file; the child then sleeps inside the save
    sigkill_train_when(PAUSE_INSIDE_SAVE_OF_STEP_4, cfg, partial, "a partial checkpoint step 4", settle=0.2)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(task_dir, tmp_path, capsys):
    a_cfg = config(task_dir, tmp_path / "A", report_to="none")  # 6 steps, checkpoints at 2, 4, 6
    b_cfg = dataclasses.replace(a_cfg, out=str(tmp_path / "B"))
    train(a_cfg, show_progress=False)

    kill_inside_save_of_step_4(b_cfg)
    b_dir = Path(b_cfg.out)
    folder = b_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-step-4", "step-2"]
    assert not (folder / ".tmp-step-4" / "trainer_state.json").exists()
    assert [step for step, _ in list_checkpoints(b_dir)] == [2]  # the half-written one is invisible
    step_2 = folder / "step-2"
    assert json.loads((step_2 / "trainer_state.json").read_text())["step"] == 2
    assert load_file(step_2 / "model.safetensors")
    for name in ("optimizer.bin", "scheduler.bin", "rng_state_0.bin"):
        assert torch.load(step_2 / name, weights_only=True), name

    capsys.readouterr()
    assert main(["train", *cli_flags(b_cfg), "--resume", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 6
    assert sorted(p.name for p in folder.iterdir()) == ["step-4", "step-6"]  # the leftover is cleaned up
    assert_same_weights(tmp_path / "A", b_dir)
    rows = [json.loads(line) for line in (b_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]  # step 4 was logged before the kill, and only once
    # the same rows; values up to float32 noise (a resumed step sums in another order: measured 1.7e-7 relative on
    # the loss, 7.5e-9 on the weights, on the 2-core machine of 2026-12-02; 0 on the one before)
    uninterrupted, resumed = metric_rows(tmp_path / "A"), metric_rows(b_dir)
    assert [sorted(r) for r in uninterrupted] == [sorted(r) for r in resumed]
    for a, b in zip(uninterrupted, resumed):
        # rewards/* are small differences of log-probs of size |logps/*|, so their noise is that of the log-probs:
        # on the AMD EPYC of 2026-12-04 the child's step 4 (logged before the kill) differed from the in-process
        # run's by 2^-19 on rewards of 0.02-0.06 (5e-5 relative): rounding of the log-probs, not of the rewards
        logp_ulps = 1e-6 * max(abs(a["logps/chosen"]), abs(a["logps/rejected"]))  # about 8 float32 ulps
        for key in a:
            tolerance = max(1e-7, logp_ulps) if key.startswith("rewards/") else 1e-7
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=tolerance), (a["step"], key)


def test_resume_never_unpickles_code(task_dir, tmp_path, monkeypatch):
    cfg = config(task_dir, tmp_path / "run", report_to="none")
    interrupt_after_step_2(cfg, monkeypatch)
    assert not list((tmp_path / "run" / "checkpoints").rglob("*.pkl"))

    flags, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        flags.append(kwargs.get("weights_only", "default"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert train(dataclasses.replace(cfg, resume=True), show_progress=False)["steps"] == 6
    assert flags.count(True) >= 3  # optimizer, scheduler, RNG state
    assert False not in flags and "default" not in flags, flags


def test_a_nan_loss_stops_the_run_before_anything_takes_the_nan_weights(task_dir, tmp_path, monkeypatch, capsys):
    import prlhf.train.loop as loop

    calls = {"n": 0}
    real_loss = loop.p_dpo_loss

    def nan_from_step_3(*args, **kwargs):  # batch_size 4, no accumulation: call n is step n
        calls["n"] += 1
        out, generic = real_loss(*args, **kwargs)
        if calls["n"] >= 3:
            out = out._replace(losses=out.losses * float("nan"))
        return out, generic

    monkeypatch.setattr(loop, "p_dpo_loss", nan_from_step_3)
    cfg = config(task_dir, tmp_path / "run")
    assert main(["train", *cli_flags(cfg)]) == 2
    message, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prlhf: error:")]
    assert "NaN or infinite at step 3" in message and "last checkpoint: step-2" in message
    assert [step for step, _ in list_checkpoints(Path(cfg.out))] == [2]
    assert not (Path(cfg.out) / "run.json").exists()  # no finished run was written from NaN weights
    saved = load_file(str(Path(cfg.out) / "checkpoints" / "step-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
