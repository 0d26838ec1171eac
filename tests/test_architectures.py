"""Any causal LM, end to end through the CLI: train, eval, generate on a local folder of each architecture."""

from __future__ import annotations

import json
import math

import pytest
from conftest import ARCHITECTURES, save_tiny_architecture

from prlhf.cli.main import main


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_train_eval_generate_from_a_model_folder(arch, task_dir, tmp_path, tiny_tokenizer, capsys):
    folder, run = save_tiny_architecture(arch, tiny_tokenizer, tmp_path / arch), tmp_path / "run"
    assert main(["train", "--data", str(task_dir / "train.jsonl"), "--model", str(folder), "--out", str(run),
                 "--max-steps", "2", "--batch-size", "6", "--user-tokens", "2", "--threads", "1",
                 "--report-to", "none", "--reference-cache", "none"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]
    assert losses and all(0 < loss < 5 for loss in losses)  # finite: a DPO loss is positive, and near log 2 this early

    assert main(["eval", "--run", str(run), "--data", str(task_dir / "test.jsonl"), "--out",
                 str(tmp_path / "eval.json"), "--threads", "1"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= result["mean_user_accuracy"] <= 1.0
    assert result["unseen_accuracy"] is not None  # the task's user_04 never trained: scored with e_0

    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--user", "user_01", "--prompt", "Summarize: the cat ran home.",
                 "--max-new-tokens", "4", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip()  # some text came back


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_model_trains_and_scores_on_each_architecture(arch, task_dir, tmp_path, tiny_tokenizer, capsys):
    folder, run = save_tiny_architecture(arch, tiny_tokenizer, tmp_path / arch), tmp_path / "rm"
    assert main(["train", "--objective", "rm", "--data", str(task_dir / "train.jsonl"), "--model", str(folder),
                 "--out", str(run), "--max-steps", "2", "--batch-size", "6", "--user-tokens", "2", "--threads", "1",
                 "--report-to", "none"]) == 0
    capsys.readouterr()
    assert main(["score", "--run", str(run), "--user", "user_01", "--prompt", "Summarize: the cat ran home.",
                 "--response", "A cat ran.", "--response", "The cat ran home and then it ran home again.",
                 "--threads", "1"]) == 0
    rewards = [float(line) for line in capsys.readouterr().out.split()]
    assert len(rewards) == 2 and all(map(math.isfinite, rewards)) and rewards[0] != rewards[1]
