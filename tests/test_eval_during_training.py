"""`--eval-data` / `--eval-steps`: learning curves in RUN/eval.jsonl that agree with `prlhf eval` at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prlhf.config import ConfigError, TrainConfig
from prlhf.data.loading import load_records
from prlhf.data.schema import DataError
from prlhf.data.tasks import build_length_task
from prlhf.data.tokenize import encode_records
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.model.scoring import implicit_reward_margins
from prlhf.runs.directory import load_run
from prlhf.train.loop import train

SMALL = dict(sft_steps=5, epochs=1, max_steps=6, batch_size=4, log_steps=2, user_tokens=2, threads=1, seed=0,
             report_to="none")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    task = build_length_task(n_seen_users=3, n_unseen_users=1, n_prompts=40, train_pairs_per_user=12,
                             test_pairs_per_user=4, seed=0)
    out = tmp_path_factory.mktemp("task")
    task.write(out)
    return out


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_eval_rows_every_n_steps_match_final_eval(data, tmp_path, precision):
    # bf16 training must not mean bf16 scoring: rounded log-probs flip the sign of small margins, so the curve
    # would disagree with `prlhf eval` on the same model
    run = tmp_path / "run"
    train(TrainConfig(data=str(data / "train.jsonl"), out=str(run), eval_data=str(data / "test.jsonl"),
                      eval_steps=2, mixed_precision=precision, **SMALL), show_progress=False)
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and {r["split"] for r in rows} == {"test"}
    loaded, records = load_run(run), load_records(str(data / "test.jsonl"))
    final = evaluate_run(loaded, records)
    for key in ("accuracy", "mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy"):
        assert rows[-1][key] == pytest.approx(final[key])
    # accuracies are too coarse to see bf16 rounding on a tiny model; the mean margin is not
    pairs = encode_records(records, loaded.tokenizer, loaded.config.max_length, loaded.config.max_prompt_length)
    margins = implicit_reward_margins(loaded.model, pairs, loaded.registry, loaded.tokenizer.pad_token_id)
    assert rows[-1]["mean_margin"] == pytest.approx(margins.mean().item(), rel=1e-4, abs=1e-6)


def test_bad_eval_file_fails_before_anything_is_written(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "a", "prompt": "p", "chosen": "x"}\n')
    run = tmp_path / "run"
    with pytest.raises(DataError, match="rejected"):
        train(TrainConfig(data=str(data / "train.jsonl"), out=str(run), eval_data=str(bad), **SMALL),
              show_progress=False)
    assert not run.exists()


def test_a_start_that_failed_before_training_can_be_rerun(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="model folder not found"):  # fails after config.yaml was written
        train(TrainConfig(data=str(data / "train.jsonl"), out=str(run), model=str(tmp_path / "no-model"),
                          **{**SMALL, "sft_steps": 0}), show_progress=False)
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    train(TrainConfig(data=str(data / "train.jsonl"), out=str(run), **SMALL), show_progress=False)
    assert (run / "run.json").is_file()
    with pytest.raises(ConfigError, match="already exists"):
        train(TrainConfig(data=str(data / "train.jsonl"), out=str(run), **SMALL), show_progress=False)
