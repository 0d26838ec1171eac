"""`prlhf bench serve` end to end on the tiny model, with small sizes: every figure serve.json promises is there
and plausible (the committed results in benchmarks/results/serve_* are the full runs)."""

import json

import pytest

from prlhf.cli.main import main

pytestmark = pytest.mark.slow


def test_bench_serve_quick(tmp_path, capsys):
    out = tmp_path / "serve"
    assert main(["bench", "serve", "--quick", "--out", str(out), "--threads", "1", "--many-users", "2000"]) == 0
    result = json.loads((out / "serve.json").read_text())
    assert [row["clients"] for row in result["throughput"]] == [1, 8, 32]
    for row in result["throughput"]:
        assert row["tokens"] == row["requests"] * result["max_tokens"]  # ignore_eos: every token decoded
        assert 0 < row["p50_s"] <= row["p95_s"]
    assert result["plain_generate"]["tokens"] == 32 * result["max_tokens"]
    # batching across users: 32 clients at once beat the same requests one after another
    assert result["ratios"]["vs_one_after_another"] > 1.5
    many = result["many_users"]
    assert set(many["rows"]) == {"10", "2000"} and many["rows"]["2000"]["table_memory_bytes"] > 0
    assert "| 32 |" in (out / "serve.md").read_text() and (out / "experiment.yaml").is_file()
    assert "plain batched generate" in capsys.readouterr().out
