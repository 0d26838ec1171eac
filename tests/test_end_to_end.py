"""End to end on the built-in tasks: the issue's targets, checked on every CI run."""

import json

import pytest

from prlhf.cli.main import main
from prlhf.demo import group_means

pytestmark = pytest.mark.slow


def test_demo_quick_meets_targets(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--threads", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vanilla_dpo", "p_dpo_individual", "p_dpo_cluster"}
    assert (out / "report.md").is_file() and (out / "per_user_accuracy.png").stat().st_size > 1000
    users = metrics["users"]
    seen = [u for u, i in users.items() if i["seen"]]
    minority = [u for u in seen if users[u]["group"] == "short"]
    individual = metrics["methods"]["p_dpo_individual"]["per_user"]
    vanilla = metrics["methods"]["vanilla_dpo"]["per_user"]

    def mean_acc(per_user, users_):
        return sum(per_user[u]["accuracy"] for u in users_) / len(users_)

    # The test stories' subjects and objects never occur in training (since 2026-12-02; before, every seen user
    # was held to >= 0.90 on stories made of training words). On new words the quick demo's P-DPO measured 0.91
    # mean, its short-preferring minority 0.75 against vanilla DPO's 0.10.
    assert mean_acc(individual, seen) >= 0.85, {u: individual[u] for u in seen}
    assert mean_acc(individual, minority) >= mean_acc(vanilla, minority) + 0.4
    assert mean_acc(vanilla, minority) <= 0.5
    lengths = group_means(metrics, "p_dpo_individual")
    assert lengths["long"]["mean_chars"] > lengths["short"]["mean_chars"]
    for u, info in metrics["methods"]["p_dpo_individual"]["per_user"].items():
        assert info["seen"] == users[u]["seen"]


def test_style_task_individual_beats_vanilla(tmp_path):
    """Three opposing style dimensions, 8 seen users: P-DPO individual learns each user's poles."""
    data = tmp_path / "style"
    assert main(["data", "build", "style", "--out", str(data), "--users", "8", "--unseen", "2",
                 "--train-pairs-per-user", "60", "--test-pairs-per-user", "20"]) == 0
    results = {}
    for kind in ("individual", "uniform"):
        run = tmp_path / kind
        assert main(["train", "--data", str(data / "train.jsonl"), "--out", str(run), "--user-model", kind,
                     "--threads", "2", "--quiet", "--user-tokens", "4"]) == 0
        assert main(["eval", "--run", str(run), "--data", str(data / "test.jsonl"),
                     "--out", str(tmp_path / f"{kind}.json")]) == 0
        results[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    assert results["individual"]["mean_user_accuracy"] >= 0.90
    # test notes are about topics no training note mentions (since 2026-12-02); at this small size (8 users x 60
    # pairs) the worst seen user measured 0.75 (15 of 20), where the old split's shared topics gave >= 0.80; the
    # full-size task is held to a worst user of 0.90 in test_generalization.py
    assert results["individual"]["worst_user_accuracy"] >= 0.70
    assert results["uniform"]["mean_user_accuracy"] < results["individual"]["mean_user_accuracy"] - 0.15
