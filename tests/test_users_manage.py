"""`prlhf users list|delete|export|import` on finished tiny runs: row surgery keeps every other user's outputs
bitwise, a deleted id falls back to the generic user, and mismatches are refused with one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prlhf.cli.main import main
from prlhf.config import TrainConfig
from prlhf.data.collate import collate_pairs
from prlhf.data.loading import load_records
from prlhf.data.tasks import build_length_task
from prlhf.data.tokenize import encode_records
from prlhf.runs.directory import RunError, current_version, load_run
from prlhf.runs.users import delete_user, export_users, import_users, list_users, read_user_table
from prlhf.train.loop import train

TINY = dict(sft_steps=5, epochs=1, max_steps=4, batch_size=4, user_tokens=2, threads=1, seed=0, lora_dropout=0.0)
USERS = ["user_01", "user_02", "user_03"]


def _task_dir(root: Path, seed: int) -> Path:
    task = build_length_task(n_seen_users=3, n_unseen_users=2, n_prompts=40, train_pairs_per_user=12,
                             test_pairs_per_user=8, seed=seed)
    task.write(root / f"data{seed}")
    return root / f"data{seed}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Pristine finished runs (tests copy them before editing): individual, cluster, uniform, individual with
    other shapes, and individual on another base (the tiny base is built from other data)."""
    root = tmp_path_factory.mktemp("manage")
    data, other = _task_dir(root, 0), _task_dir(root, 1)
    specs = {"individual": (data, {}), "cluster": (data, {"user_model": "cluster", "clusters": 3}),
             "uniform": (data, {"user_model": "uniform", "max_steps": 1}), "tokens3": (data, {"user_tokens": 3}),
             "other_base": (other, {})}
    out = {"data": data}
    for name, (d, overrides) in specs.items():
        out[name] = root / name
        train(TrainConfig(data=str(d / "train.jsonl"), out=str(out[name]), **(TINY | overrides)),
              show_progress=False)
    return out


def copy_run(src: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def logps(run_dir: Path, records, user_ids) -> dict[str, torch.Tensor]:
    """(2P,) policy log-probs of the same batch under each user's embedding (unknown ids: the generic user)."""
    run = load_run(run_dir)
    cfg = run.config
    pairs = encode_records(records, run.tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.use_user_text)
    out = {}
    with torch.no_grad():
        for uid in user_ids:
            batch = collate_pairs(pairs, run.registry.indices([uid] * len(pairs)), torch.arange(len(pairs)),
                                  run.tokenizer.pad_token_id)
            out[uid] = run.model(batch.input_ids, batch.attention_mask, batch.labels, batch.user_idx.repeat(2))
    return out


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prlhf: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def probe(runs):
    return load_records(runs["data"] / "test.jsonl")[:6]


def test_list_users(runs, capsys):
    entries = list_users(runs["individual"])
    table = read_user_table(runs["individual"])
    assert [(e["user_id"], e["index"]) for e in entries] == [(u, i + 1) for i, u in enumerate(USERS)]
    assert entries[1]["norm"] == pytest.approx(float(table.rows[2].norm()))
    assert all(e["n_pairs"] is None for e in entries)
    assert main(["users", "list", "--run", str(runs["individual"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["user_id", "index", "norm", "pairs"] and out[1].split()[-1] == "-"
    assert main(["users", "list", "--run", str(runs["cluster"]), "--data", str(runs["data"] / "train.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == USERS and all(line.split()[-1] == "12" for line in out[1:])


def test_delete_keeps_other_users_bitwise_and_maps_the_id_to_generic(runs, probe, tmp_path, capsys):
    run_dir = copy_run(runs["individual"], tmp_path)
    before = logps(run_dir, probe, USERS + ["nobody"])
    old = read_user_table(run_dir)
    assert main(["users", "delete", "--run", str(run_dir), "--user", "user_02"]) == 0
    capsys.readouterr()
    table = read_user_table(run_dir)
    assert table.registry.to_dict()["users"] == {"user_01": 1, "user_03": 2}
    assert table.config["num_users"] == 2 and table.rows.shape[0] == 3
    assert torch.equal(table.rows, old.rows[[0, 1, 3]]) and torch.equal(table.state["generic"], old.state["generic"])
    assert not list(run_dir.glob(".*.tmp")) and not list((run_dir / "versions").glob(".*"))  # no staging left
    after = logps(run_dir, probe, USERS + ["nobody"])
    for uid in ("user_01", "user_03", "nobody"):
        assert torch.equal(before[uid], after[uid]), uid
    assert torch.equal(after["user_02"], before["nobody"])  # the deleted id is the generic user now
    err = one_line_error(capsys, main(["users", "delete", "--run", str(run_dir), "--user", "user_02"]))
    assert "'user_02'" in err and "not in" in err


def test_delete_in_a_cluster_run(runs, probe, tmp_path):
    run_dir = copy_run(runs["cluster"], tmp_path)
    before = logps(run_dir, probe, USERS)
    delete_user(run_dir, "user_01")
    after = logps(run_dir, probe, USERS)
    assert torch.equal(before["user_02"], after["user_02"]) and torch.equal(before["user_03"], after["user_03"])
    assert read_user_table(run_dir).registry.user_ids == ["user_02", "user_03"]


def test_uniform_run_has_no_users_to_manage(runs, capsys):
    err = one_line_error(capsys, main(["users", "list", "--run", str(runs["uniform"])]))
    assert "uniform" in err
    with pytest.raises(RunError, match="uniform"):
        delete_user(runs["uniform"], "user_01")


def test_export_delete_import_round_trip_is_bitwise(runs, probe, tmp_path, capsys):
    run_dir = copy_run(runs["individual"], tmp_path)
    before = logps(run_dir, probe, USERS)
    prefix = tmp_path / "exp" / "two"
    assert main(["users", "export", "--run", str(run_dir), "--users", "user_02,user_03", "--out", str(prefix)]) == 0
    meta = json.loads(prefix.with_suffix(".json").read_text())
    assert meta["users"] == ["user_02", "user_03"] and meta["base"]["model"] == "tiny"
    assert meta["base"]["embedding_sha256"] and meta["user_model"]["kind"] == "individual"
    delete_user(run_dir, "user_02")
    delete_user(run_dir, "user_03")
    assert json.loads((run_dir / "run.json").read_text())["n_users"] == 1  # the summary follows the registry
    capsys.readouterr()
    assert main(["users", "import", "--run", str(run_dir), "--from", str(prefix)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"added": ["user_02", "user_03"], "replaced": [], "rebased": False}
    assert json.loads((run_dir / "run.json").read_text())["n_users"] == 3
    after = logps(run_dir, probe, USERS)
    assert all(torch.equal(before[u], after[u]) for u in USERS)
    # importing ids that exist is refused, unless --overwrite (which keeps the index)
    err = one_line_error(capsys, main(["users", "import", "--run", str(run_dir), "--from", str(prefix)]))
    assert "--overwrite" in err and "'user_02'" in err
    assert main(["users", "import", "--run", str(run_dir), "--from", str(prefix), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["replaced"] == ["user_02", "user_03"]
    assert read_user_table(run_dir).registry.to_dict()["users"] == {"user_01": 1, "user_02": 2, "user_03": 3}


def test_import_refuses_mismatches(runs, tmp_path, capsys):
    prefix = tmp_path / "u1"
    export_users(runs["individual"], ["user_01"], prefix)
    checks = {"tokens3": "shape mismatch", "cluster": "'individual' users", "other_base": "another base model",
              "uniform": "uniform"}
    for name, needle in checks.items():
        run_dir = copy_run(runs[name], tmp_path, name)
        users_before = (current_version(run_dir) / "users.json").read_text()  # the registry of the current version
        err = one_line_error(capsys, main(["users", "import", "--run", str(run_dir), "--from", str(prefix)]))
        assert needle in err, (name, err)
        assert (current_version(run_dir) / "users.json").read_text() == users_before
    err = one_line_error(capsys, main(["users", "import", "--run", str(runs["individual"]), "--from",
                                       str(tmp_path / "missing")]))
    assert "users export" in err
    err = one_line_error(capsys, main(["users", "export", "--run", str(runs["individual"]), "--users", "ghost",
                                       "--out", str(tmp_path / "g")]))
    assert "'ghost'" in err


def test_import_into_a_run_with_another_generic_keeps_the_embedding(runs, probe, tmp_path):
    """Same base, other shared e_0 (a second run on the same base): the user's full embedding e_i is kept."""
    src = copy_run(runs["individual"], tmp_path, "src")
    dst = copy_run(runs["individual"], tmp_path, "dst")
    table = read_user_table(dst)  # shift e_0 of the target run, as another training run would
    table.state["generic"] = table.state["generic"] + 0.25
    from prlhf.runs.users import write_user_table

    write_user_table(dst, table)
    delete_user(dst, "user_02")
    export_users(src, ["user_02"], tmp_path / "u2")
    assert import_users(dst, tmp_path / "u2")["rebased"] is True
    emb_src = load_run(src).model.user_model(torch.tensor([2]))
    dst_run = load_run(dst)
    emb_dst = dst_run.model.user_model(torch.tensor([dst_run.registry.index("user_02")]))
    torch.testing.assert_close(emb_dst, emb_src)


def test_the_prlhf_parser_has_the_user_commands():
    from prlhf.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["users", "delete", "--run", "R", "--user", "u"])
    assert args.func.__name__ == "cmd_users_delete" and args.user == "u"
    args = parser.parse_args(["adapt", "--run", "R", "--data", "D", "--out", "O", "--warm-start", "text"])
    assert args.warm_start == "text" and args.steps > 0
