"""Data parallel: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) equals one process on the same
global batch; and every Accelerate config in configs/ loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prlhf.train.loop import train
from test_invariants import ACCUM_TOL_OF_LR, max_difference_over_lr, max_weight_difference, metric_rows
from test_train_resume import cli_flags, config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# No supervised warm-up (its batches follow --batch-size, which differs per process count) and no dropout (each
# process draws masks for its own rows): both runs then start from the same weights and see the same pairs.
SAME_START = dict(sft_steps=0, lora_dropout=0.0, max_steps=4, save_steps=2, log_steps=2, report_to="none")
# 2 processes x 4 pairs vs 1 process x 8 pairs: the same 8 pairs per step (process p takes batches p, p+2, ... of
# the same permutation), but the gradient is two half-batch means averaged by a gloo all-reduce instead of one
# mean, so float32 sums round in a different order (~1e-7 relative per step), and AdamW's normalisation can carry
# that into a share of a step, which is up to the group's learning rate. Measured max difference after 4 steps:
# 1.2e-6 (adapters) and 3.4e-7 (user model) on the machine of 2026-11; 3.2e-5 on a user row (lr 3e-2), 1.05e-3 of
# its rate, on the 2-core machine of 2026-12-02. The tolerance is test_invariants' 1e-2 of each group's rate, 100x
# below one step: a different batch or a process training alone would fail it.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(cfg, *extra: str) -> None:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # gloo on CPU even on a GPU box
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "prlhf", "train", *cli_flags(cfg), "--quiet", *extra]
    # its own session: on a timeout the launcher *and* its workers are killed (torchrun leaves workers behind)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2-process run timed out:\n{stdout}\n{stderr}"[-4000:])
    assert proc.returncode == 0, stderr[-3000:]
    # the main process prints the summary line (cli)
    steps = re.findall(r'\{"steps": (\d+)', stdout)
    assert steps and all(int(n) == cfg.max_steps for n in steps), stdout[-2000:]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(task_dir, tmp_path):
    one = config(task_dir, tmp_path / "one", batch_size=8, **SAME_START)
    train(one, show_progress=False)
    launch_two_processes(config(task_dir, tmp_path / "two", batch_size=4, **SAME_START))

    diff = max_difference_over_lr(tmp_path / "one", tmp_path / "two", one)
    print(f"1 process x 8 vs 2 processes x 4: max |weight difference| / group lr = {diff:.3e}")
    assert diff <= ACCUM_TOL_OF_LR  # float32 summation order, amplified by AdamW (see test_invariants)
    # metrics gathered from both processes: the same rows as one process on the whole batch, written once
    rows_one, rows_two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [2, 4]
    for r1, r2 in zip(rows_one, rows_two):
        assert r1.keys() == r2.keys()
        for key in r1:
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5), key
    checkpoint = tmp_path / "two" / "checkpoints" / "step-4"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == ["rng_state_0.bin", "rng_state_1.bin"]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_two_processes_resume_exactly(task_dir, tmp_path):
    # default dropout: each process must get its own RNG state back (rng_state_0.bin, rng_state_1.bin)
    cfg = config(task_dir, tmp_path / "run", sft_steps=3, max_steps=4, save_steps=2, report_to="none")
    launch_two_processes(cfg)
    finished = tmp_path / "finished"
    shutil.copytree(tmp_path / "run", finished)
    for name in ("run.json", "versions", "checkpoints/step-4"):  # as if killed at 3
        path = tmp_path / "run" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    launch_two_processes(cfg, "--resume")
    assert max_weight_difference(finished, tmp_path / "run") == 0.0
    assert metric_rows(finished) == metric_rows(tmp_path / "run")  # per-user counts come back too


def test_at_least_the_documented_configs_exist():
    assert {p.name for p in CONFIGS} >= {"ddp.yaml", "ddp_cpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml",
                                         "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_accelerate_loads_every_config(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file configs/" + path.name in text
    assert "User model" in text or "user model" in text  # how its parameters are replicated or sharded
    raw = yaml.safe_load(text)
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "mixed_precision"):
        assert key in raw, key
    loaded = load_config_from_file(str(path))  # rejects unknown top-level keys and enum values
    assert loaded.num_processes >= 2
    # the plugin sections are turned into `accelerate launch --<key>` flags: every key must be one
    flags = {action.dest for action in launch_command_parser()._actions}
    section = {"FSDP": "fsdp_config", "DEEPSPEED": "deepspeed_config"}.get(raw["distributed_type"])
    if section:
        assert raw[section] and set(raw[section]) <= flags, set(raw[section]) - flags


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="FSDP starts on a GPU machine")
def test_fsdp_without_an_accelerator_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """`accelerate launch --config_file configs/fsdp.yaml` sets these; on CPUs Accelerate stops at start-up."""
    from prlhf.cli.main import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"user_id": "u1", "prompt": "Q?", "chosen": " yes", "rejected": " no"}) + "\n")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "true")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "tiny", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prlhf: error: FSDP could not start") and err.count("\n") == 1, err
    assert "configs/ddp_cpu.yaml" in err and not (tmp_path / "run").exists()


def test_fsdp_is_not_silently_replaced_by_cpu_data_parallelism(monkeypatch):
    """Without sync_module_states, Accelerate(cpu=True) under an FSDP launch sets up MULTI_CPU (measured with
    accelerate 1.15 and 2 processes): plain replication, which must not pass for sharding."""
    import accelerate
    from accelerate import DistributedType

    from prlhf.config import ConfigError
    from prlhf.train import distributed

    class Replicated:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType.MULTI_CPU

    monkeypatch.setattr(accelerate, "Accelerator", Replicated)
    monkeypatch.setattr(distributed, "launched_processes", lambda: 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP was asked for but Accelerate set up MULTI_CPU"):
        distributed.start_accelerator(cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # a DDP launch on CPUs is what cpu=True is for
    assert isinstance(distributed.start_accelerator(cpu=True), Replicated)
