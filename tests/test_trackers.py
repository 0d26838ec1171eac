"""`--report-to`: the metrics.jsonl rows go to TensorBoard (or W&B) through Accelerate's trackers."""

from __future__ import annotations

import json

import pytest

from prlhf.config import ConfigError, TrainConfig
from prlhf.train import metrics
from prlhf.train.loop import train
from test_train_resume import config

SHORT = dict(max_steps=4, save_steps=100)


def event_files(run_dir):
    return sorted(run_dir.rglob("events.out.tfevents.*"))


def test_tensorboard_logs_the_metrics_rows(task_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(config(task_dir, run_dir, report_to="tensorboard", **SHORT), show_progress=False)
    files = event_files(run_dir)
    assert files and all(f.is_relative_to(run_dir) for f in files)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = {}
    for f in files:
        events = EventAccumulator(str(f.parent)).Reload()
        scalars |= {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    assert set(scalars) == set(rows[0]) - {"step"}  # the same keys as metrics.jsonl, none per user
    assert not any("user_0" in tag for tag in scalars)
    assert [e.step for e in scalars["loss"]] == [row["step"] for row in rows] == [2, 4]
    assert [e.value for e in scalars["train_users/worst_accuracy"]] == pytest.approx(
        [row["train_users/worst_accuracy"] for row in rows])


def test_report_to_none_writes_no_event_file(task_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(config(task_dir, run_dir, report_to="none", **SHORT), show_progress=False)
    assert (run_dir / "metrics.jsonl").is_file() and not event_files(run_dir)


def test_auto_means_tensorboard_when_installed(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    assert metrics.tracker_names("auto") == ["tensorboard"]
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert metrics.tracker_names("auto") == []
    assert metrics.tracker_names("none") == [] and metrics.tracker_names("wandb") == ["wandb"]
    assert TrainConfig().report_to == "auto"


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(data="x.jsonl", out="o", report_to="mlflow").validate()


def test_truncate_log_drops_later_steps_and_a_row_cut_short(tmp_path):
    from prlhf.train.metrics import truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 2, "loss": 0.6}\n{"step": 4, "loss": 0.5}\n{"step": 6, "loss": 0.4}\n{"step": 8, "lo')
    truncate_log(log, 4)
    assert log.read_text() == '{"step": 2, "loss": 0.6}\n{"step": 4, "loss": 0.5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # written through a temporary file
    truncate_log(tmp_path / "missing.jsonl", 4)  # nothing logged yet: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
