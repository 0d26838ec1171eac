"""End-to-end training on the built-in tiny model: run-dir artifacts, checkpoint rotation, exact resume after a
SIGKILL, loading and evaluating the finished run, and the `prlhf eval` / `prlhf generate` commands."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prlhf.cli.main import main
from prlhf.config import TrainConfig, load_config_file
from prlhf.data.loading import load_records
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import current_version, load_run
from prlhf.train.checkpoint import list_checkpoints
from prlhf.train.loop import train

# 3 seen users x 12 train pairs = 36 pairs = 9 batches of 4 per epoch; max_steps=6 stays inside epoch 0.
TINY = dict(sft_steps=5, epochs=2, max_steps=6, batch_size=4, save_steps=2, keep_checkpoints=2, log_steps=2,
            user_tokens=2, threads=1, seed=0)
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")
# Same CPU kernels in the same order on the same machine give bit-identical weights; atol=1e-6 leaves room only
# for float noise, never for a different batch, dropout mask or learning rate (those move weights by ~1e-3).
ATOL = 1e-6


def config(task_dir: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(data=str(task_dir / "train.jsonl"), out=str(out), **(TINY | overrides))


def cli_flags(cfg: TrainConfig) -> list[str]:
    """The `prlhf train` flags that reproduce `cfg` exactly."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


@pytest.fixture(scope="module")
def finished_run(task_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    summary = train(config(task_dir, run_dir), show_progress=False)
    assert summary["steps"] == 6
    return run_dir


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = current_version(run_dir)  # RUN_DIR/versions/vN
    weights = {f"user_model.{k}": v for k, v in load_file(files / "user_model.safetensors").items()}
    weights |= {f"adapter.{k}": v for k, v in load_file(files / "adapter" / "adapter_model.safetensors").items()}
    return weights


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = trained_weights(a_dir), trained_weights(b_dir)
    assert a.keys() == b.keys()
    assert any(k.startswith("user_model.") for k in a) and any("lora_A" in k for k in a)
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    bad = {k: d for k, d in diffs.items() if not torch.allclose(a[k], b[k], atol=ATOL, rtol=0)}
    assert not bad, f"{len(bad)}/{len(a)} tensors differ after resume, worst {max(bad.values()):.2e}: {sorted(bad)[:3]}"


# ------------------------------------------------------------------------------------------------------
# (a) What a finished run directory holds


def test_run_dir_holds_every_artifact(finished_run):
    version = finished_run / "versions" / "v1"  # the artifacts live in the current version (prlhf.runs.directory)
    assert current_version(finished_run) == version
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "user_model.safetensors",
                 "user_model.json", "users.json", "config.yaml", "tokenizer/tokenizer.json", "manifest.json"):
        assert (version / name).is_file(), name
    for name in ("config.yaml", "metrics.jsonl", "run.json", "base/config.json"):
        assert (finished_run / name).is_file(), name
    assert sorted(p.name for p in (finished_run / "versions").iterdir()) == ["v1"]  # no staging leftover

    run = json.loads((finished_run / "run.json").read_text())
    assert run["steps"] == 6 and run["n_pairs"] == 36 and run["n_users"] == 3
    assert run["user_model"] == "individual" and run["model"] == "tiny"

    users = json.loads((version / "users.json").read_text())
    assert users == {"generic_index": 0, "users": {"user_01": 1, "user_02": 2, "user_03": 3}}
    user_model = json.loads((version / "user_model.json").read_text())
    assert user_model["kind"] == "individual"
    assert user_model["num_users"] == 3 and user_model["num_tokens"] == 2

    saved = load_config_file(TrainConfig, finished_run / "config.yaml")
    assert TrainConfig(**saved) == config(Path(saved["data"]).parent, finished_run)


def test_metrics_log_has_the_dpo_keys(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]  # log_steps=2
    for row in rows:
        for key in ("loss", *METRIC_KEYS):
            assert key in row and isinstance(row[key], float), key
        assert 0.0 <= row["rewards/accuracies"] <= 1.0
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-5)


def test_checkpoints_are_rotated(finished_run):
    folder = finished_run / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step-4", "step-6"]  # keep_checkpoints=2 of steps 2, 4, 6; no leftover .tmp-step-N
    assert len(list_checkpoints(finished_run)) <= TINY["keep_checkpoints"]
    for name in names:
        state = json.loads((folder / name / "trainer_state.json").read_text())
        assert state["step"] == int(name.split("-")[1]) and state["epoch"] == 0
        assert (folder / name / "model.safetensors").is_file()
        assert (folder / name / "optimizer.bin").is_file()
    # only the trainable tensors (LoRA + user model) are checkpointed, not the frozen base
    keys = load_file(folder / "step-6" / "model.safetensors").keys()
    assert keys and all("lora_" in k or k.startswith("user_model.") for k in keys)


# ------------------------------------------------------------------------------------------------------
# (b) Resume equivalence

# The killed child runs `prlhf train` through the real CLI, but waits after writing checkpoint step-2: a step
# takes ~30 ms here, so a parent merely polling for step-2 would race the child to the end of the run.
PAUSE_AFTER_STEP_2 = """
import sys, time
import prlhf.train.loop as loop
from prlhf.cli.main import main
save = loop.save_checkpoint
def save_then_wait(accelerator, run_dir, step, state, keep):
    save(accelerator, run_dir, step, state, keep)
    if step == 2:
        time.sleep(300)
loop.save_checkpoint = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def sigkill_train_when(script: str, cfg: TrainConfig, marker: Path, what: str, settle: float = 0.0) -> None:
    """Run `prlhf train` through `script` (which pauses the child at some point), wait until `marker` exists,
    then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", script, "train", *cli_flags(cfg), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.is_file():
            if proc.poll() is not None:
                pytest.fail(f"training exited with {proc.returncode} before {what}:\n{proc.stderr.read()}")
            assert time.time() < deadline, f"no {what} after 120 s"
            time.sleep(0.02)
        time.sleep(settle)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def kill_after_step_2(cfg: TrainConfig) -> None:
    sigkill_train_when(PAUSE_AFTER_STEP_2, cfg, Path(cfg.out) / "checkpoints" / "step-2" / "trainer_state.json",
                       "checkpoint step-2")


class _Interrupted(Exception):
    pass


def interrupt_after_step_2(cfg: TrainConfig, monkeypatch) -> None:
    """In-process stand-in for a kill: raise right after checkpoint step-2 is written."""
    import prlhf.train.loop as loop

    save = loop.save_checkpoint

    def save_then_die(accelerator, run_dir, step, state, keep):
        save(accelerator, run_dir, step, state, keep)
        if step == 2:
            raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_then_die)
        with pytest.raises(_Interrupted):
            train(cfg, show_progress=False)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(task_dir, tmp_path, capsys):
    # Default LoRA dropout and a run that crosses into epoch 1: weights, AdamW moments, LR schedule, skipped
    # batches, dropout RNG and the next epoch's batch order must all be restored exactly.
    a_cfg = config(task_dir, tmp_path / "A", max_steps=12)
    b_cfg = dataclasses.replace(a_cfg, out=str(tmp_path / "B"))
    train(a_cfg, show_progress=False)

    kill_after_step_2(b_cfg)
    b_dir = Path(b_cfg.out)
    assert not (b_dir / "run.json").exists()
    assert [step for step, _ in list_checkpoints(b_dir)] == [2]

    # without --resume the half-written run is refused, untouched
    capsys.readouterr()
    code = main(["train", *cli_flags(b_cfg), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--resume" in err
    assert not (b_dir / "run.json").exists()

    code = main(["train", *cli_flags(b_cfg), "--resume", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 12
    assert (b_dir / "run.json").is_file()
    assert_same_weights(tmp_path / "A", b_dir)
    rows = [json.loads(line) for line in (b_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12]


def test_resume_without_dropout_in_process(task_dir, tmp_path, monkeypatch):
    a_cfg = config(task_dir, tmp_path / "A", lora_dropout=0.0)
    b_cfg = dataclasses.replace(a_cfg, out=str(tmp_path / "B"))
    train(a_cfg, show_progress=False)
    interrupt_after_step_2(b_cfg, monkeypatch)
    train(dataclasses.replace(b_cfg, resume=True), show_progress=False)
    assert_same_weights(tmp_path / "A", tmp_path / "B")


def test_resume_restores_the_dropout_rng_exactly(task_dir, tmp_path, monkeypatch):
    a_cfg = config(task_dir, tmp_path / "A")  # default lora_dropout=0.05
    b_cfg = dataclasses.replace(a_cfg, out=str(tmp_path / "B"))
    train(a_cfg, show_progress=False)
    interrupt_after_step_2(b_cfg, monkeypatch)
    train(dataclasses.replace(b_cfg, resume=True), show_progress=False)
    assert_same_weights(tmp_path / "A", tmp_path / "B")


def test_resume_keeps_the_batch_order_across_epochs(task_dir, tmp_path, monkeypatch):
    a_cfg = config(task_dir, tmp_path / "A", lora_dropout=0.0, max_steps=12)  # 9 steps per epoch
    b_cfg = dataclasses.replace(a_cfg, out=str(tmp_path / "B"))
    train(a_cfg, show_progress=False)
    interrupt_after_step_2(b_cfg, monkeypatch)
    train(dataclasses.replace(b_cfg, resume=True), show_progress=False)
    assert_same_weights(tmp_path / "A", tmp_path / "B")


def test_resume_of_a_finished_run_changes_nothing(task_dir, tmp_path):
    cfg = config(task_dir, tmp_path / "run", lora_dropout=0.0)
    train(cfg, show_progress=False)
    before = trained_weights(tmp_path / "run")
    summary = train(dataclasses.replace(cfg, resume=True), show_progress=False)
    assert summary["steps"] == 6
    after = trained_weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------------
# (c) Loading and evaluating the finished run


def test_load_run_and_evaluate_per_user(finished_run, task_dir):
    run = load_run(finished_run)
    assert run.registry.user_ids == ["user_01", "user_02", "user_03"]
    assert run.config.user_tokens == 2 and not run.model.training
    records = load_records(task_dir / "test.jsonl")
    result = evaluate_run(run, records)
    per_user = result["per_user"]
    assert set(per_user) == {"user_01", "user_02", "user_03", "unseen_01"}
    for user, entry in per_user.items():
        assert entry["seen"] is (not user.startswith("unseen_")), user
        assert entry["n"] == 4 and 0.0 <= entry["accuracy"] <= 1.0
    assert result["n_pairs"] == len(records) == 16
    seen = [per_user[u]["accuracy"] for u in ("user_01", "user_02", "user_03")]
    assert result["mean_user_accuracy"] == pytest.approx(sum(seen) / 3)
    assert result["worst_user_accuracy"] == min(seen)
    assert result["unseen_accuracy"] == per_user["unseen_01"]["accuracy"]
    # deterministic: a second evaluation gives the same numbers
    assert evaluate_run(run, records) == result


# ------------------------------------------------------------------------------------------------------
# (d) `prlhf eval` and `prlhf generate`


def test_cli_eval_writes_the_metrics_json(finished_run, task_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["eval", "--run", str(finished_run), "--data", str(task_dir / "test.jsonl"), "--out", str(out),
                 "--threads", "1"])
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in ("accuracy", "mean_user_accuracy", "worst_user_accuracy", "per_user"):
        assert key in metrics, key
    assert set(metrics["per_user"]) == {"user_01", "user_02", "user_03", "unseen_01"}
    assert metrics["per_user"]["unseen_01"]["seen"] is False
    assert "run" in capsys.readouterr().out  # the accuracy table names the run folder


def test_cli_generate_for_a_seen_user(finished_run, capsys):
    code = main(["generate", "--run", str(finished_run), "--user", "user_01", "--prompt", "Summarize: the cat.",
                 "--max-new-tokens", "5", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip(), "expected generated text on stdout"
    assert len(out.rstrip("\n").split("\n")) == 1
    assert "note" not in err


def test_cli_generate_for_an_unknown_user_notes_it_and_succeeds(finished_run, capsys):
    code = main(["generate", "--run", str(finished_run), "--user", "nobody", "--prompt", "Summarize: the cat.",
                 "--max-new-tokens", "5", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.endswith("\n")  # the text, one line (a 5-step model may stop at once: it can be empty)
    assert "prlhf: note:" in err and "'nobody'" in err and "generic user" in err
    # an unseen user is served by the generic embedding e_0: the same text as any other unknown id
    code = main(["generate", "--run", str(finished_run), "--user", "someone_else", "--prompt",
                 "Summarize: the cat.", "--max-new-tokens", "5", "--threads", "1"])
    assert code == 0 and capsys.readouterr().out == out


def test_cli_generate_with_a_missing_run_is_one_line(tmp_path, capsys):
    code = main(["generate", "--run", str(tmp_path / "nope"), "--user", "user_01", "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("prlhf: error: ") and err.count("\n") == 1 and "nope" in err
