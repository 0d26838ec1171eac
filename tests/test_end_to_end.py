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
    assert all(individual[u]["accuracy"] >= 0.90 for u in seen), {u: individual[u] for u in seen}
    assert sum(vanilla[u]["accuracy"] for u in minority) / len(minority) <= 0.5
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
    assert results["individual"]["worst_user_accuracy"] >= 0.80
    assert results["uniform"]["mean_user_accuracy"] < results["individual"]["mean_user_accuracy"] - 0.15
