"""TL;DR labelers: reading the comparisons schema, duplicates, the post-disjoint split, unseen labelers,
one-line errors, `prlhf data build tldr` and `prlhf bench tldr` on the tiny model."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from prlhf.cli.main import main
from prlhf.data.loading import load_records
from prlhf.data.schema import DataError
from prlhf.data.tasks import TASKS
from prlhf.data.tasks.tldr import build_tldr_task, load_comparisons, render_prompt

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "summarize-from-feedback"
WORDS = "the cat dog went home late because rain work friend told me about it again soon".split()


def comparison(worker: str, post_id: str, post: str, long_text: str, short_text: str, long_first: bool,
               choose_long: bool) -> dict:
    """One line of the official schema (fields the builder ignores included, as in the release)."""
    texts = [long_text, short_text] if long_first else [short_text, long_text]
    choice = texts.index(long_text if choose_long else short_text)
    return {"info": {"id": post_id, "post": post, "title": f"title of {post_id}", "subreddit": "relationships"},
            "split": "valid1", "summaries": [{"text": t, "policy": "ref", "note": None} for t in texts],
            "choice": choice, "worker": worker, "batch": "batch1", "extra": {"confidence": 7}}


def write_comparisons(folder: Path, n_workers: int = 6, own_posts: int = 12, shared_posts: int = 4,
                      seed: int = 0) -> Path:
    """`n_workers` labelers (even index: choose the longer summary, odd: the shorter), each with `own_posts`
    posts of their own and two of `shared_posts` posts rated by several labelers; plus one exact duplicate line
    and one CNN/DM record (an `article`, no post) in a second file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def post(i: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(30)) + f" post {i}."

    shared = {f"t3_s{i}": post(i) for i in range(shared_posts)}
    lines = []
    for w in range(n_workers):
        mine = {f"t3_{w}_{i}": post(100 * w + i) for i in range(own_posts)}
        mine.update({pid: shared[pid] for pid in rng.sample(sorted(shared), 2)})
        for pid, text in mine.items():
            long_text = " " + " ".join(rng.choice(WORDS) for _ in range(12))
            short_text = " " + " ".join(rng.choice(WORDS) for _ in range(4))
            lines.append(comparison(f"worker{w}", pid, text, long_text, short_text, rng.random() < 0.5,
                                    choose_long=w % 2 == 0))
    lines.append(lines[0])  # an exact duplicate
    (folder / "batch1.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cnn = {"info": {"id": "cnn1", "article": "an article", "site": "cnn"}, "summaries": [{"text": " a"}, {"text": " b"}],
           "choice": 0, "worker": "worker0", "batch": "cnndm1"}
    (folder / "batch2.jsonl").write_text(json.dumps(cnn) + "\n\n")
    (folder / "README.md").write_text("not read")
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_comparisons(tmp_path_factory.mktemp("tldr"))


def test_reads_the_schema_drops_duplicates_and_articles(source) -> None:
    comparisons, counts = load_comparisons(source)
    assert counts["files"] == ["batch1.json", "batch2.jsonl"]  # README.md is not read
    assert counts["n_read"] == 6 * 14 + 1 + 1 and counts["n_duplicates"] == 1 and counts["n_without_post"] == 1
    assert len(comparisons) == 6 * 14
    first = json.loads((source / "batch1.json").read_text().splitlines()[0])
    rec = comparisons[0].record
    assert rec.user_id == "worker0"
    assert rec.prompt == render_prompt("relationships", first["info"]["title"], first["info"]["post"])
    assert rec.prompt.startswith("SUBREDDIT: r/relationships\nTITLE: title of ") and rec.prompt.endswith("\nTL;DR:")
    assert rec.chosen == first["summaries"][first["choice"]]["text"]
    assert rec.rejected == first["summaries"][1 - first["choice"]]["text"]
    assert comparisons[0].chosen_longer is True  # worker0 chooses the longer summary


def test_split_is_post_disjoint_with_unseen_labelers(source) -> None:
    task = build_tldr_task(source=source, n_unseen_users=2, seed=0)
    seen, unseen = set(task.seen_users), set(task.unseen_users)
    assert len(unseen) >= 2 and seen and not seen & unseen
    assert {r.user_id for r in task.train} == seen
    assert {r.user_id for r in task.test} >= unseen
    assert not {r.prompt for r in task.train} & {r.prompt for r in task.test}  # content-disjoint, all labelers
    per_user = defaultdict(int)
    for r in task.train + task.test:
        per_user[r.user_id] += 1
    for uid, info in task.users.items():
        assert info["n_train"] + info["n_test"] == info["n_comparisons"] == per_user[uid]
        assert info["seen"] == (info["n_train"] > 0)
    # the even workers choose the longer summary every time, the odd ones never
    assert all(task.users[f"worker{w}"]["long_rate"] == float(w % 2 == 0) for w in range(6))
    assert task.meta["n_duplicates"] == 1 and task.meta["n_without_post"] == 1
    assert "Modified MIT" in task.meta["attribution"] and "CC BY 4.0" in task.meta["attribution"]
    again = build_tldr_task(source=source, n_unseen_users=2, seed=0)
    assert again.train == task.train and again.test == task.test  # deterministic
    assert build_tldr_task(source=source, n_unseen_users=2, seed=1).test != task.test


def test_named_unseen_labelers_and_caps(source) -> None:
    task = build_tldr_task(source=source, unseen_users=["worker5"], max_train_pairs_per_user=3, seed=0)
    assert "worker5" in task.unseen_users and not any(r.user_id == "worker5" for r in task.train)
    assert all(info["n_train"] <= 3 for info in task.users.values())
    with pytest.raises(ValueError, match="not in the data"):
        build_tldr_task(source=source, unseen_users=["nobody"])
    with pytest.raises(ValueError, match="labelers kept"):
        build_tldr_task(source=source, min_comparisons=15)  # every labeler has 14: none kept


@pytest.mark.parametrize("mutate, field", [
    (lambda row: row.pop("worker"), "field 'worker'"),
    (lambda row: row.update(choice=2), "field 'choice'"),
    (lambda row: row.update(choice=True), "field 'choice'"),
    (lambda row: row["summaries"].pop(), "field 'summaries'"),
    (lambda row: row["summaries"][1].update(text=3), "field 'summaries[1].text'"),
    (lambda row: row["info"].update(title=None), "field 'info.title'"),
    (lambda row: row.update(info="x"), "field 'info'"),
])
def test_bad_lines_give_one_line_errors(tmp_path, mutate, field) -> None:
    good = comparison("w", "t3_1", "a post", " long summary text", " short", True, True)
    bad = json.loads(json.dumps(good))
    mutate(bad)
    (tmp_path / "b.json").write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        load_comparisons(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'b.json'}, line 3, {field}")


def test_bad_json_and_missing_folder(tmp_path) -> None:
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: invalid JSON"):
        load_comparisons(tmp_path)
    with pytest.raises(DataError, match="comparisons folder not found"):
        load_comparisons(tmp_path / "absent")
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(DataError, match=r"no \*\.json or \*\.jsonl"):
        load_comparisons(tmp_path)


def test_registered_and_cli_build(source, tmp_path, capsys) -> None:
    assert TASKS["tldr"] is build_tldr_task
    out = tmp_path / "out"
    assert main(["data", "build", "tldr", "--source", str(source), "--out", str(out), "--unseen", "2"]) == 0
    assert "tldr:" in capsys.readouterr().out
    users = json.loads((out / "users.json").read_text())
    assert users["task"] == "tldr" and users["meta"]["source"] == str(source)
    train, test = load_records(str(out / "train.jsonl")), load_records(str(out / "test.jsonl"))
    assert {r.user_id for r in train} == {u for u, i in users["users"].items() if i["seen"]}
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    # a flag that means nothing for real labelers is refused in one line
    assert main(["data", "build", "tldr", "--source", str(source), "--out", str(out), "--majority-share",
                 "0.7"]) == 2
    assert "--majority-share" in capsys.readouterr().err


def test_cli_build_bad_source(tmp_path, capsys) -> None:
    (tmp_path / "b.json").write_text('{"info": {}}\n')
    assert main(["data", "build", "tldr", "--source", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'b.json'}, line 1, field 'info.post'" in err


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/summarize-from-feedback not present")
def test_real_data_counts() -> None:
    comparisons, counts = load_comparisons(REAL_DATA)
    assert len(comparisons) == 1771 and counts["n_duplicates"] == 0 and counts["n_without_post"] == 0
    assert len({c.record.user_id for c in comparisons}) == 30
    task = build_tldr_task(source=REAL_DATA, seed=0)
    assert len(task.users) == 30 and len(task.train) + len(task.test) == 1771
    assert not {r.prompt for r in task.train} & {r.prompt for r in task.test}
    rates = [info["long_rate"] for info in task.users.values()]
    assert min(rates) < 0.5 < 0.8 < max(rates)  # labelers differ on the length axis


# ----------------------------------------------------------------------------------------------- the bench


def test_ranks_and_spearman_by_hand() -> None:
    from prlhf.bench.tldr import ranks, spearman

    assert ranks([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]  # the tied pair shares ranks 2 and 3
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1,2,3 and y = 1,3,2: d = 0,-1,1, rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert spearman([1, 2, 3], [1, 1, 1]) is None and spearman([1, 2], [1, 2]) is None


def test_bootstrap_is_paired_and_brackets_the_mean() -> None:
    from prlhf.bench.tldr import bootstrap_mean_difference

    same = {"u": [True, False, True], "v": [False, True]}
    out = bootstrap_mean_difference(same, same, draws=200)
    assert out["mean_difference"] == 0.0 and out["ci95"] == [0.0, 0.0]  # paired: identical models never differ
    # u: a always right, b right on 1 of 4 -> +0.75; v: a and b alike -> 0; mean over users 0.375
    a = {"u": [True] * 4, "v": [True, False]}
    b = {"u": [True, False, False, False], "v": [True, False]}
    out = bootstrap_mean_difference(a, b, draws=500, seed=1)
    assert out["mean_difference"] == pytest.approx(0.375) and out["n_comparisons"] == 6
    assert 0.0 <= out["ci95"][0] <= 0.375 <= out["ci95"][1] <= 0.5


def test_long_rates_and_adapt_split() -> None:
    from prlhf.bench.tldr import MIN_RATE_PAIRS, adapt_split, long_rates
    from prlhf.data.schema import PreferenceRecord

    recs = [PreferenceRecord("u", "p1", " long one", " s"), PreferenceRecord("u", "p2", " s", " long one"),
            PreferenceRecord("u", "p3", " same", " emas")]  # equal lengths: left out
    rates = long_rates(recs, [1.0, 1.0, -1.0])
    assert rates["u"] == {"n": 2, "observed": 0.5, "predicted": 0.5}  # the model prefers chosen both times
    assert long_rates(recs, [1.0, -1.0, 0.0])["u"]["predicted"] == 1.0  # it prefers the longer one both times
    many = [PreferenceRecord("u", f"post{i // 2}", " a", " b") for i in range(20)]
    pools, evals = adapt_split(many, 5, seed=0)
    assert len(pools["u"]) == 5 and len(evals["u"]) >= MIN_RATE_PAIRS
    assert not {r.prompt for r in pools["u"]} & {r.prompt for r in evals["u"]}  # fitted posts never evaluated
    assert adapt_split(many[:8], 5, seed=0) == ({}, {})  # too few left to evaluate


@pytest.mark.slow
def test_bench_tldr_quick_on_tiny(source, tmp_path) -> None:
    """`prlhf bench tldr --quick` end to end on the synthetic labelers: the results.json schema, and a second
    call that reuses the finished method of a first (cut-short) one."""
    out = tmp_path / "bench"
    args = ["bench", "tldr", "--quick", "--source", str(source), "--out", str(out), "--threads", "1"]
    assert main(args + ["--methods", "vanilla_dpo", "--keep-runs"]) == 0
    first = json.loads((out / "results.json").read_text())["methods"]["vanilla_dpo"]
    assert main(args + ["--reuse-runs"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["methods"]["vanilla_dpo"] == first  # loaded from OUT/work, not trained again
    assert doc["task"] == "tldr" and doc["model"] == "tiny"
    assert set(doc["methods"]) == {"vanilla_dpo", "p_dpo_individual", "p_dpo_cluster", "p_rm_individual",
                                   "rm_uniform"}
    seen = {u for u, i in doc["users"].items() if i["seen"]}
    for result in doc["methods"].values():  # prlhf eval's JSON, plus the long rates
        assert {"accuracy", "mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy", "per_user"} <= set(result)
        assert {u for u, v in result["per_user"].items() if v["seen"]} == seen
        assert result["unseen_accuracy"] is not None
        for info in result["per_user"].values():
            assert 0.0 <= info["long_rate"]["predicted"] <= 1.0
        assert set(result["long_rate_correlation"]) == {"seen", "unseen"}
    assert set(doc["personalization"]) == {"p_dpo_individual - vanilla_dpo", "p_dpo_cluster - vanilla_dpo",
                                           "p_rm_individual - rm_uniform"}
    for p in doc["personalization"].values():
        assert -1.0 <= p["ci95"][0] <= p["ci95"][1] <= 1.0 and p["n_users"] == len(seen)
    assert set(doc["new_labelers"]["ks"]) == {"0", "2"}
    assert (out / "report.md").is_file() and (out / "labelers.png").is_file()
    assert not (out / "work").exists()  # the derived data is removed without --keep-runs
