"""`prlhf bench persona` and `prlhf bench length` at toy sizes: the documented result files and their schema."""

from __future__ import annotations

import json

import pytest
from conftest import write_persona_traits

from prlhf.bench import experiment, persona
from prlhf.bench.length import run_length_bench
from prlhf.cli.main import main
from prlhf.runs.directory import current_version


@pytest.fixture
def toy_persona(tmp_path, monkeypatch):
    """(trait folder, output folder) for `bench persona --quick` at a toy size: 6 seen users, 12 pairs each."""
    monkeypatch.setattr(persona, "QUICK", persona.PersonaSize(6, 2, 10, 12, 4, 1, 2, 2))
    return write_persona_traits(tmp_path / "traits"), tmp_path / "out"


@pytest.mark.slow
def test_persona_bench_writes_both_splits(toy_persona, monkeypatch):
    data, out = toy_persona
    configs = []

    def recording_train(cfg, **kwargs):
        configs.append(cfg)
        return real_train(cfg, **kwargs)

    real_train = persona.train
    monkeypatch.setattr(persona, "train", recording_train)  # prompting's base
    monkeypatch.setattr(experiment, "train", recording_train)  # the trained methods
    code = main(["bench", "persona", "--quick", "--out", str(out), "--threads", "1", "--persona-dir", str(data),
                 "--methods", "vanilla_dpo,p_dpo_individual,p_dpo_cluster,prompting", "--curve-points", "3",
                 "--user-lr", "0.02"])
    assert code == 0
    assert [c.user_lr for c in configs] == [0.02] * 3
    doc = json.loads((out / "results.json").read_text())
    assert doc["split"] == "pairs" and doc["model"] == "tiny" and doc["n_users"] == 6 and doc["user_lr"] == 0.02
    assert "torch " in doc["machine"] and "transformers " in doc["machine"]  # versions that change the numbers
    # prompting right after the first trained method: a run cut short still has it
    assert list(doc["methods"]) == ["vanilla_dpo", "prompting", "p_dpo_individual", "p_dpo_cluster"]
    for r in doc["methods"].values():
        for key in ("mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy", "train_seconds"):
            assert isinstance(r[key], float), key
        assert set(r["per_dimension_accuracy"]) == {"politics", "risk", "time"}
    assert doc["methods"]["prompting"]["train_seconds"] == 0.0
    assert "CC-BY-4.0" in doc["attribution"]
    statements = json.loads((out / "statements" / "results.json").read_text())
    assert statements["split"] == "statements" and set(statements["methods"]) == set(doc["methods"])
    curves = json.loads((out / "curves.json").read_text())
    assert {row["split"] for row in curves["p_dpo_individual"]} == {"curve_pairs", "curve_statements"}
    # 5 steps, 3 points: every 2 steps and at the end (steps 2, 4, 5), not 1, 2, 3, 4, 5
    assert [row["step"] for row in curves["p_dpo_individual"] if row["split"] == "curve_pairs"] == [2, 4, 5]
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    assert not (out / "work").exists()  # neither runs nor data derived from the persona files stay behind
    assert main(["bench", "persona", "--quick", "--out", str(out), "--methods", "dpo_magic",
                 "--persona-dir", str(data)]) == 2


@pytest.mark.slow
def test_persona_bench_profile_ids_and_batch_size(toy_persona, monkeypatch):
    """--profile-ids trains on one id per profile but scores every real user; --batch-size, --grad-accum and
    --train-pairs-per-user set the step count; --mixed-precision and --user-weight-decay are passed to training;
    --majority-share reaches the task builder."""
    data, out = toy_persona
    scored = []

    def recording_accuracy(records, margins, seen):
        scored.append({r.user_id for r in records})
        return real_accuracy(records, margins, seen)

    real_accuracy = persona.per_user_accuracy
    monkeypatch.setattr(persona, "per_user_accuracy", recording_accuracy)
    code = main(["bench", "persona", "--quick", "--out", str(out), "--threads", "1", "--persona-dir", str(data),
                 "--methods", "p_dpo_individual,p_dpo_lowrank", "--profile-ids", "--batch-size", "4",
                 "--grad-accum", "2",
                 "--train-pairs-per-user", "10", "--majority-share", "0.5",
                 "--mixed-precision", "bf16", "--user-weight-decay", "0.1", "--user-code-lr", "0.05",
                 "--keep-runs"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["profile_ids"] is True and doc["batch_size"] == 8 and doc["grad_accum"] == 2  # 8 pairs per step
    assert doc["data"]["train_pairs_per_user"] == 10 and doc["n_train_pairs"] == 60 and doc["steps"] == 8  # 60 / 8
    assert doc["data"]["majority_share"] == 0.5  # task.meta: the builder drew the profiles with it
    assert set(doc["methods"]) == {"p_dpo_individual", "p_dpo_lowrank"}
    # bf16 autocast on the CPU reaches the training runs and the record
    assert doc["mixed_precision"] == "bf16"
    run_config = (out / "work" / "runs" / "p_dpo_individual" / "config.yaml").read_text()
    assert "mixed_precision: bf16" in run_config and "user_weight_decay: 0.1" in run_config
    assert "user_code_lr: 0.05" in run_config and "grad_accum: 2" in run_config and "batch_size: 4" in run_config
    metrics = out / "work" / "runs" / "p_dpo_individual" / "metrics.jsonl"
    logged = [json.loads(line)["step"] for line in metrics.open()]
    assert logged[-1] == 8  # optimizer steps, not micro-batches
    assert doc["user_weight_decay"] == 0.1 and doc["user_code_lr"] == 0.05
    users = json.loads((out / "work" / "data" / "users.json").read_text())["users"]
    profiles = {f"profile-{info['profile_id']}" for info in users.values() if info["seen"]}
    trained_ids = {json.loads(line)["user_id"] for line in (out / "work" / "data" / "train.jsonl").open()}
    assert trained_ids == profiles
    run_files = current_version(out / "work" / "runs" / "p_dpo_individual")  # RUN/versions/vN
    registry = json.loads((run_files / "users.json").read_text())["users"]
    assert set(registry) == profiles
    assert scored and all(ids <= set(users) for ids in scored)  # real user ids, seen and unseen
    assert any(ids & {u for u, info in users.items() if info["seen"]} for ids in scored)
    assert "--profile-ids" in (out / "report.md").read_text()


@pytest.mark.slow
def test_length_bench_table(tmp_path):
    doc = run_length_bench(tmp_path, shares=(0.7,), quick=True, threads=1, n_users=4)
    res = doc["shares"]["0.7"]
    assert set(res["methods"]) == {"vanilla_dpo", "p_dpo_individual", "p_dpo_cluster"}
    assert sum(res["n_seen_users_by_group"].values()) == 4
    for r in res["methods"].values():
        assert 0.0 <= r["majority_accuracy"] <= 1.0 and 0.0 <= r["minority_accuracy"] <= 1.0
    assert "| 0.7 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "minority_vs_share.png").is_file()


def test_pretrained_defaults_are_the_recipe_that_was_measured(monkeypatch, tmp_path):
    """`bench persona --model smollm2-135m` with no training flags runs the settings of
    benchmarks/results/persona_smollm2_h200_48pairs/; tiny keeps its own; a given flag wins."""
    got = {}
    monkeypatch.setattr(persona, "run_persona_bench", lambda out, **kwargs: got.update(kwargs))
    assert main(["bench", "persona", "--model", "smollm2-135m", "--out", str(tmp_path)]) == 0
    flags = ("threads", "lr", "user_lr", "user_code_lr", "user_tokens", "batch_size", "grad_accum")
    options = persona.bench_train_options(got.pop("model"), {k: got[k] for k in flags}, "cuda")
    assert options == {"threads": 2, "batch_size": 64, "user_tokens": 4, "lr": 1e-3, "user_lr": 3e-3,
                       "user_code_lr": 3e-2}
    size = persona.FULL_PRETRAINED
    assert (size.n_seen, size.train_pairs_per_user, size.epochs) == (64, 48, 12)
    tiny = persona.bench_train_options("tiny", {"batch_size": None, "user_lr": 0.02})
    assert tiny == {"threads": 2, "batch_size": 16, "user_tokens": 10, "lr": 0.0, "user_lr": 0.02}
    # on a GPU one 64-pair batch; on a CPU the same 64 pairs per step in 4 micro-batches, unless a size is given
    assert persona.bench_train_options("smollm2-135m", {}, "cuda")["batch_size"] == 64
    cpu = persona.bench_train_options("smollm2-135m", {}, "cpu")
    assert (cpu["batch_size"], cpu["grad_accum"]) == (16, 4)
    assert "grad_accum" not in persona.bench_train_options("smollm2-135m", {"batch_size": 32}, "cpu")


def test_persona_bench_refuses_unknown_training_options(tmp_path):
    with pytest.raises(ValueError, match="user_lrr"):
        persona.run_persona_bench(tmp_path / "out", quick=True, user_lrr=1e-3)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_bench_leaves_an_experiment_record_that_reruns_it(tmp_path, monkeypatch, capsys):
    from functools import partial

    from prlhf.bench import length

    # seconds, not minutes: 4 users, one method
    monkeypatch.setattr(length, "run_length_bench", partial(length.run_length_bench, n_users=4))
    monkeypatch.setattr(length, "METHODS", {"p_dpo_individual": length.METHODS["p_dpo_individual"]})
    first, again = tmp_path / "first", tmp_path / "again"
    command = ["bench", "length", "--quick", "--shares", "0.7", "--threads", "1", "--out", str(first)]
    assert main(command) == 0
    record = (first / "experiment.yaml").read_text()
    assert record.splitlines()[0] == "# prlhf " + " ".join(command)  # the command in its header
    assert "bench: length" in record and "shares:\n  - 0.7" in record

    assert main(["bench", "rerun", str(first / "experiment.yaml"), "--out", str(again)]) == 0
    a, b = (json.loads((d / "results.json").read_text())["shares"] for d in (first, again))
    drop_times = lambda doc: {m: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                              for m, r in doc["0.7"]["methods"].items()}
    assert drop_times(a) == drop_times(b)  # same arguments, same seed: the same figures
    assert (again / "experiment.yaml").read_text().splitlines()[0].startswith("# prlhf bench rerun ")


def test_rerun_refuses_what_is_not_an_experiment_record(tmp_path, capsys):
    not_a_record = tmp_path / "results.json"
    not_a_record.write_text("{}\n")
    assert main(["bench", "rerun", str(not_a_record), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an experiment record" in err and "results.json" in err
    edited = tmp_path / "experiment.yaml"
    edited.write_text("format: prlhf-experiment/1\nbench: length\narguments: {shares: [0.7], colour: red}\n")
    assert main(["bench", "rerun", str(edited), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes no argument(s) colour" in err
    assert not (tmp_path / "o").exists()
