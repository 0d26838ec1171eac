"""Few-shot adaptation of new users on a finished tiny run: only the new rows move, known users' outputs are
bitwise unchanged, the new run directory is a full copy written atomically, and errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prlhf.cli.main import main
from prlhf.config import ADAPT_LR_FACTOR, ConfigError, TrainConfig
from prlhf.data.collate import collate_pairs
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks import build_length_task
from prlhf.data.tokenize import encode_records
from prlhf.runs.directory import RunError, current_version, load_run
from prlhf.runs.users import read_user_table, save_adapted_run
from prlhf.safe_io import TMP_PREFIX
from prlhf.train.adapt import (adapt_users, default_adapt_lr, initial_rows, jaccard, split_holdout,
                               text_neighbours)
from prlhf.train.loop import train

TINY = dict(sft_steps=5, epochs=1, max_steps=6, batch_size=4, user_tokens=2, threads=1, seed=0, lora_dropout=0.0)


@pytest.fixture(scope="module")
def task():
    return build_length_task(n_seen_users=3, n_unseen_users=2, n_prompts=40, train_pairs_per_user=12,
                             test_pairs_per_user=8, seed=0)


@pytest.fixture(scope="module")
def data_dir(task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapt_task") / "data"
    task.write(out)
    return out


def _run(data_dir: Path, tmp_path_factory, name: str, **overrides) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train(TrainConfig(data=str(data_dir / "train.jsonl"), out=str(run_dir), **(TINY | overrides)),
          show_progress=False)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    return _run(data_dir, tmp_path_factory, "individual")


@pytest.fixture(scope="module")
def cluster_dir(data_dir, tmp_path_factory) -> Path:
    return _run(data_dir, tmp_path_factory, "cluster", user_model="cluster", clusters=3)


def unseen(task) -> list[PreferenceRecord]:
    return [r for r in task.test if r.user_id.startswith("unseen_")]


def logps_by_user(run, records, user_ids) -> dict[str, torch.Tensor]:
    """(2P,) policy log-probs of `records` under each user's embedding (the same batch for every user)."""
    cfg = run.config
    pairs = encode_records(records, run.tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.use_user_text)
    out = {}
    with torch.no_grad():
        for uid in user_ids:
            idx = run.registry.indices([uid] * len(pairs))
            batch = collate_pairs(pairs, idx, torch.arange(len(pairs)), run.tokenizer.pad_token_id)
            out[uid] = run.model(batch.input_ids, batch.attention_mask, batch.labels, batch.user_idx.repeat(2))
    return out


def test_adapt_fits_only_the_new_rows(run_dir, task):
    run = load_run(run_dir)
    known = run.registry.user_ids
    lm_before = {k: v.clone() for k, v in run.model.lm.state_dict().items()}
    grads_before = [p.requires_grad for p in run.model.parameters()]
    probe = task.test[:6]
    before = logps_by_user(run, probe, known + ["nobody"])

    new_run, report = adapt_users(run, unseen(task), steps=15, lr=0.1, holdout=0.5, seed=0, show_progress=False)

    # registry: known users keep 1..N, new users get N+1.. in sorted order
    assert new_run.registry.user_ids == known + ["unseen_01", "unseen_02"]
    assert [new_run.registry.index(u) for u in ("unseen_01", "unseen_02")] == [4, 5]
    # shared parameters and known rows copied bitwise; the new rows started at o = 0 and moved
    old = read_user_table(run_dir)
    new_state = new_run.model.user_model.state_dict()
    assert torch.equal(new_state["generic"], old.state["generic"])
    assert torch.equal(new_state["offsets.weight"][:4], old.rows)
    assert new_state["offsets.weight"][4:].abs().sum() > 0
    # the LM and adapters did not move, and the loaded run's flags are restored
    assert all(torch.equal(v, lm_before[k]) for k, v in run.model.lm.state_dict().items())
    assert [p.requires_grad for p in run.model.parameters()] == grads_before
    # known users' (and the generic user's) outputs are bitwise unchanged
    after = logps_by_user(new_run, probe, known + ["nobody"])
    for uid in known + ["nobody"]:
        assert torch.equal(before[uid], after[uid]), uid
    # the report: 4 fitting and 4 held-out pairs per user, before/after accuracies, loss went down
    for uid in ("unseen_01", "unseen_02"):
        entry = report["users"][uid]
        assert entry["n_fit"] == 4 and entry["n_eval"] == 4 and entry["init"] == "generic"
        assert 0.0 <= entry["before"] <= 1.0 and 0.0 <= entry["after"] <= 1.0
    assert report["final_loss"] < report["initial_loss"]
    assert report["seconds_per_user"] < 30


def test_holdout_split_is_seeded_and_per_user(task):
    records = unseen(task)
    fit, held = split_holdout(records, ["unseen_01", "unseen_02"], 0.25, seed=3)
    assert len(fit) == 12 and len(held) == 4
    assert split_holdout(records, ["unseen_01", "unseen_02"], 0.25, seed=3) == (fit, held)
    assert split_holdout(records, ["unseen_01", "unseen_02"], 0.25, seed=4) != (fit, held)
    assert {r.user_id for r in held} == {"unseen_01", "unseen_02"}
    assert split_holdout(records, ["unseen_01"], 0.0, seed=0) == ([r for r in records if r.user_id == "unseen_01"],
                                                                  [])


def test_adapt_one_user_and_errors(run_dir, task):
    run = load_run(run_dir)
    new_run, report = adapt_users(run, unseen(task), steps=2, user="unseen_02", show_progress=False)
    assert list(report["users"]) == ["unseen_02"] and "unseen_01" not in new_run.registry
    with pytest.raises(ConfigError, match="already known"):
        adapt_users(run, task.train, steps=2, show_progress=False)
    with pytest.raises(RunError, match="already in the run"):
        adapt_users(run, unseen(task), steps=2, user="user_01", show_progress=False)
    with pytest.raises(ConfigError, match="--known-data"):
        adapt_users(run, unseen(task), steps=2, warm_start="text", show_progress=False)


def test_cluster_rows_start_from_the_generic_weights(cluster_dir, task):
    run = load_run(cluster_dir)
    old = read_user_table(cluster_dir)
    new_run, _ = adapt_users(run, unseen(task), steps=1, lr=1e-9, show_progress=False)
    rows = new_run.model.user_model.state_dict()["weights.weight"]
    assert torch.equal(rows[:4], old.rows)
    torch.testing.assert_close(rows[4:], old.rows[0].expand(2, -1), rtol=0, atol=1e-6)  # w_0, moved by ~lr
    assert torch.equal(new_run.model.user_model.state_dict()["prototypes"], old.state["prototypes"])


def test_text_warm_start_helpers(cluster_dir):
    known = {"a": "I prefer  SHORT answers.", "b": "i prefer short answers.", "c": "I like long stories"}
    assert text_neighbours("I prefer short answers.", known) == (["a", "b"], "exact")
    assert text_neighbours("I like long answers", known)[0] == ["c"]  # 3/5 shared words vs 2/5 (a, b: 3/6)
    assert text_neighbours("zebra", known) == ([], "none")
    assert jaccard("a b", "b c") == pytest.approx(1 / 3)
    # cluster: the warm start's mixture is the mean of the matched users' mixtures (= their mean embedding)
    table = read_user_table(cluster_dir)
    row = table.to_module().mean_row(table.rows[[1, 2]].float())
    mixes = torch.softmax(table.rows[[1, 2]], dim=-1)
    torch.testing.assert_close(torch.softmax(row, dim=-1), mixes.mean(0))
    rows, source = initial_rows(table, ["new_a", "new_b"], "text", {"new_a": "likes X"},
                                {"user_01": "likes X", "user_02": "other"})
    torch.testing.assert_close(torch.softmax(rows[0], -1), torch.softmax(table.rows[1], -1))  # a single match
    assert torch.equal(rows[1], table.rows[0]) and source["new_b"].startswith("generic")


def test_save_adapted_run_is_a_full_copy(run_dir, task, tmp_path):
    run = load_run(run_dir)
    new_run, report = adapt_users(run, unseen(task), steps=3, show_progress=False)
    out = save_adapted_run(run_dir, new_run, tmp_path / "adapted", report)
    names = {p.name for p in out.iterdir()}  # the artifacts live in the run's version v1 (prlhf.runs.directory)
    version = current_version(out)
    assert version == out / "versions" / "v1"
    assert {"base", "config.yaml", "run.json", "versions"} <= names
    assert {"adapter", "tokenizer", "config.yaml", "users.json", "user_model.json", "user_model.safetensors",
            "adapt.json", "manifest.json"} <= {p.name for p in version.iterdir()}
    assert "checkpoints" not in names and not any(n.startswith(TMP_PREFIX) for n in names)
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))  # the temporary build folder was renamed away
    assert (out / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert json.loads((version / "adapt.json").read_text())["adapted_from"] == str(run_dir)
    assert json.loads((out / "run.json").read_text())["n_users"] == len(new_run.registry)
    reloaded = load_run(out)
    assert reloaded.registry.user_ids == new_run.registry.user_ids
    probe = unseen(task)[:4]
    a = logps_by_user(new_run, probe, ["unseen_01", "user_01"])
    b = logps_by_user(reloaded, probe, ["unseen_01", "user_01"])
    assert all(torch.equal(a[u], b[u]) for u in a)
    with pytest.raises(ConfigError, match="not empty"):
        save_adapted_run(run_dir, new_run, out, report)


def test_default_rate_follows_the_rate_the_users_rows_were_trained_with():
    """A fixed rate does not carry across models (0.1 pushed SmolLM2's new soft tokens, trained at 3e-3, to 5x a
    trained user's norm); the default scales with the run's own."""
    cfg = TrainConfig(data="d.jsonl", out="o", model="some/model", lr=1e-3, user_lr=3e-3, user_code_lr=3e-2)
    assert default_adapt_lr(cfg, "individual") == pytest.approx(ADAPT_LR_FACTOR * 3e-3)
    code_lr = pytest.approx(ADAPT_LR_FACTOR * 3e-2)
    assert default_adapt_lr(cfg, "cluster") == code_lr and default_adapt_lr(cfg, "lowrank") == code_lr
    tiny = TrainConfig(data="d.jsonl", out="o", model="tiny")  # user_lr 0 = 30x lr; user_code_lr 0 = user_lr
    assert default_adapt_lr(tiny, "cluster") == pytest.approx(ADAPT_LR_FACTOR * 30 * tiny.resolved_lr())


def test_cli_adapt(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "new"
    code = main(["adapt", "--run", str(run_dir), "--data", str(data_dir / "test.jsonl"), "--out", str(out),
                 "--steps", "3", "--holdout", "0.5", "--quiet", "--threads", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "unseen_01" in text and "before (generic)" in text
    expected = default_adapt_lr(load_run(run_dir).config, "individual")
    assert f"(3 steps at lr {expected:.3g})" in text
    assert json.loads((current_version(out) / "adapt.json").read_text())["lr"] == pytest.approx(expected)
    assert load_run(out).registry.user_ids[-2:] == ["unseen_01", "unseen_02"]
    code = main(["adapt", "--run", str(run_dir), "--data", str(data_dir / "test.jsonl"), "--out", str(out),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prlhf: error: ") and err.count("\n") == 1 and "not empty" in err


def test_cli_adapt_refuses_a_uniform_run(data_dir, tmp_path_factory, tmp_path, capsys):
    uniform = _run(data_dir, tmp_path_factory, "uniform", user_model="uniform", max_steps=1)
    code = main(["adapt", "--run", str(uniform), "--data", str(data_dir / "test.jsonl"), "--out",
                 str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "uniform" in err
    assert not (tmp_path / "x").exists()
